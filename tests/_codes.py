"""Packed-code fingerprints of a few built-in recipes on a tiny model (tests/test_architecture.py).

    python tests/_codes.py [OUT_DIR]   # print the fingerprints as JSON; with OUT_DIR also keep the
                                       # checkpoints there (compare two with bench/compare_codes.py)

The fixture tests/codes_reference.json was written by this script on the code before the issue-18
refactor; a refactor that changes what gets stored (a code, a scale, a trained norm weight) fails
tests/test_architecture.py::test_packed_codes_unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the built-in recipes, with groups of 32 so that the tiny model's 64/160 columns hold several groups
RECIPES = ["w4a16-rtn", "w4a16-gptq", "any4-gptq", "w3-quip-normtweak"]
GROUP = 32


def _recipe(name: str) -> dict:
    from quantkit.recipe import load_recipe

    r = load_recipe(name).model_dump()
    r["format"]["group_size"] = GROUP
    return {k: v for k, v in r.items() if k != "source"}


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(name: str, keep_dir: str | None = None) -> dict[str, str]:
    """{tensor name: sha256 of dtype, shape and bytes} of the native checkpoint of recipe ``name``,
    and hashes of its saved layer specs and of the report's figures (times left out)."""
    from safetensors.torch import load_file

    import quantkit

    from conftest import tiny_model

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order on every machine
    try:
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        qm = quantkit.quantize(tiny_model("llama"), _recipe(name), calibration=ids, device="cpu", progress=False)
    finally:
        torch.set_num_threads(n_threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(keep_dir, name) if keep_dir else os.path.join(tmp, "ck")
        qm.save(out, overwrite=True)
        tensors = load_file(os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json")) as f:
            layers = json.load(f)["quantization_config"]["layers"]
    fp = {"config: quantization_config.layers": _h(json.dumps(layers, sort_keys=True)),
          "report: layers": _h(json.dumps(qm.report.layers, sort_keys=True)),
          # the block figures, less the phase times
          "report: blocks": _h(json.dumps([{k: v for k, v in b.items() if not k.endswith("_s")}
                                           for b in qm.report.blocks], sort_keys=True))}
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        fp[k] = h.hexdigest()[:16]
    return fp


if __name__ == "__main__":
    keep = sys.argv[1] if len(sys.argv) > 1 else None
    print(json.dumps({r: fingerprints(r, keep) for r in RECIPES}, indent=1, sort_keys=True))
