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
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--layout", default="native", help="checkpoint layout: native, compressed-tensors, gptq "
                                                     "(default native)")
    p.add_argument("--resume-dir", default=None, metavar="DIR",
                   help="commit progress to DIR after every decoder block; run the same command again after a "
                        "crash to resume (same model, data and recipe); DIR's resume files are removed after "
                        "a successful save")
    add_calibration_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from .. import api
    from ..checkpoint.io import CheckpointError

    if os.path.exists(args.output) and not args.overwrite:
        raise CheckpointError(f"{args.output} already exists; choose another output folder or pass --overwrite")
    qm = api.quantize(args.model, args.recipe, device=args.device, samples=args.samples, seq_len=args.seq_len,
                      seed=args.seed, batch_size=args.batch_size, resume_dir=args.resume_dir)
    path = qm.save(args.output, overwrite=args.overwrite, layout=args.layout)
    if not qm.is_main_process:  # under torchrun rank 0 writes and reports
        return 0
    qm.clear_resume_state()
    print(f"saved {path}  ({qm.bits_per_weight():.3f} bits/weight over quantized linears, "
          f"{qm.meta['seconds']:.1f} s)")
    return 0
