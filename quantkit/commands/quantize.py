"""quantkit quantize MODEL -r RECIPE -o OUT"""

from __future__ import annotations

from ._common import add_calibration_args


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a recipe and save the checkpoint",
                       description="Quantize MODEL (a bundled name such as smollm2-135m, or a Hugging Face "
                                   "model folder) with RECIPE (a built-in name or a YAML file) and save it.")
    p.add_argument("model", help="bundled model name or local HF model folder")
    p.add_argument("-r", "--recipe", default="w4a16-gptq",
                   help="built-in recipe name or YAML path (default w4a16-gptq)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (atomically) if it is a quantkit checkpoint or empty; "
                        "never the input model's folder")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--layout", default="native", help="checkpoint layout: native, compressed-tensors, gptq "
                                                     "(default native); docs/EXPORT.md says what each holds")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default=None,
                   help="--layout gptq: gptq (v1, stores zero - 1; default) or gptq_v2 (stores the zero point)")
    p.add_argument("--partial-groups", choices=("expand", "error"), default=None,
                   help="--layout compressed-tensors: a shorter last group is exported exactly as smaller groups "
                        "(expand, default) or refused (error)")
    p.add_argument("--resume-dir", default=None, metavar="DIR",
                   help="commit progress to DIR after every decoder block; run the same command again after a "
                        "crash to resume (same model, data and recipe); DIR's resume files are removed after "
                        "a successful save")
    p.add_argument("--allow-unquantized", action="store_true",
                   help="go on with a warning when a large decoder-block tensor would stay float although no "
                        "rule quantizes it and no ignore names it (default: an error)")
    p.add_argument("--load", choices=("stream", "whole"), default=None,
                   help="stream (default for a model folder): read each decoder block from the checkpoint's shards "
                        "when it is reached and, with --layout native, write each quantized block out at once, so "
                        "memory holds about one block; whole (default for a bundled name): load the model first")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="float dtype the weights are read and calibrated in (default float32)")
    p.add_argument("--dist-read", choices=("all", "rank0"), default="all",
                   help="streamed under torchrun: all (default) every rank reads its own copy of each block from "
                        "the shards; rank0: rank 0 reads it and broadcasts it to the others (one reader of the "
                        "disk). Ignored in one process and with --load whole")
    add_calibration_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    if args.deterministic:  # before any GPU work (quantkit.determinism)
        from ..determinism import for_process

        for_process()
    from .. import api
    from ..checkpoint.safety import check_replaceable
    from ..checks import preflight
    from ..models.sources import resolve_model_dir

    options = {k: v for k, v in (("checkpoint_format", args.checkpoint_format),
                                 ("partial_groups", args.partial_groups)) if v is not None}
    # everything that can fail without the weights or the data fails here, before any calibration
    streamed = args.load == "stream" or (args.load is None and os.path.isdir(args.model))
    recipe = preflight(args.model, args.recipe, layout=args.layout, export_options=options, device=args.device,
                       samples=args.samples, seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                       path=args.calibration_data, field=args.calibration_field,
                       streamed=streamed, allow_unquantized=args.allow_unquantized)
    replaced = check_replaceable(os.path.abspath(args.output), args.overwrite, protect=(resolve_model_dir(args.model),))
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.layout == "native":  # streamed: each finished block is written at once (quantkit.stream)
        qm = api.quantize(args.model, recipe, device=args.device, resume_dir=args.resume_dir, load=args.load,
                          dtype=dtype, allow_unquantized=args.allow_unquantized, save_to=args.output,
                          overwrite=args.overwrite, dist_read=args.dist_read,
                          deterministic=args.deterministic)
        path = qm.saved_to
    else:
        qm = api.quantize(args.model, recipe, device=args.device, resume_dir=args.resume_dir, load=args.load,
                          dtype=dtype, allow_unquantized=args.allow_unquantized, dist_read=args.dist_read,
                          deterministic=args.deterministic)
        if options:
            qm.meta["export_options"] = options
        path = qm.save(args.output, overwrite=args.overwrite, layout=args.layout)
    if not qm.is_main_process:  # under torchrun rank 0 writes and reports
        return 0
    qm.clear_resume_state()
    print(f"saved {path}  ({qm.meta['seconds']:.1f} s)" + (f"; replaced {replaced} that was there" if replaced else ""))
    print(f"  {qm.accounting().line()}")
    return 0
