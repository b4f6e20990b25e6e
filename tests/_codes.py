"""What a few built-in recipes store for a tiny model, and a comparison that tolerates the machine
(tests/test_architecture.py::test_packed_codes_unchanged).

    python tests/_codes.py --write      # record tests/codes_reference/ from the code as it is now
    python tests/_codes.py [OUT_DIR]    # compare the code as it is now with the record (and keep
                                        # the checkpoints in OUT_DIR for bench/compare_codes.py)

The record holds each recipe's stored tensors (tests/codes_reference/<recipe>.safetensors: packed
codes, scales, tables, trained norm weights) and its layer specs and report figures
(tests/codes_reference/figures.json). A refactor that changes what gets stored fails the test.

Why not hashes: the same code on another CPU (AVX2 vs AVX-512/AMX kernels, another BLAS) rounds
some float sums differently even with one thread, and that moves a few near-tie codes, the fourth
digit of a trained norm weight or a k-means table, and the last digits of the report's errors. CI
found exactly that with bit-exact hashes. So the comparison is exact where it can be (tensor names,
dtypes, shapes, layer specs other than their float figures) and within measured tolerances elsewhere:
the tolerances below are far above what two machine behaviours differ by (here: no code, floats
<= 6e-5, figures <= 2e-5; another CPU family may flip a near-tie code, so codes get 2%) (measured by
``python tests/_codes.py --spread``, which re-runs every recipe under ATEN_CPU_CAPABILITY=default /
avx2 / avx512 and 1 / 2 threads), and far below what a change of the algorithm does (the test checks
that a solve seed moved by one and a damping changed from 0.01 to 0.02 are both caught).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the built-in recipes, with groups of 32 so that the tiny model's 64/160 columns hold several groups
RECIPES = ["w4a16-rtn", "w4a16-gptq", "any4-gptq", "w3-quip-normtweak"]
GROUP = 32
REF_DIR = Path(__file__).with_name("codes_reference")
FIGURES = REF_DIR / "figures.json"

# tolerances (see the module docstring for how they were chosen)
CODE_FRAC = 0.02  # at most this fraction of the bytes of an integer tensor (packed codes) may differ
FLOAT_REL = 5e-3  # ||a - b|| / ||b|| of a float tensor (scales, tables, trained norm weights)
FIGURE_REL = 1e-2  # relative difference of a report figure (layer / block errors)


def _recipe(name: str, **override) -> dict:
    from quantkit.recipe import load_recipe

    r = load_recipe(name).model_dump()
    r["format"]["group_size"] = GROUP
    for path, value in override.items():  # "quantizer__damp" -> r["quantizer"]["damp"]
        *parents, leaf = path.split("__")
        d = r
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[leaf] = value
    return {k: v for k, v in r.items() if k != "source"}


def outputs(name: str, keep_dir: str | None = None, **override) -> tuple[dict[str, torch.Tensor], dict]:
    """The native checkpoint's tensors of recipe ``name`` on the tiny llama, and its figures: the
    saved layer specs and the report's layer and block figures (phase times left out)."""
    from safetensors.torch import load_file

    import quantkit

    from conftest import tiny_model

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order on every run of one machine
    try:
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        qm = quantkit.quantize(tiny_model("llama"), _recipe(name, **override), calibration=ids, device="cpu",
                               progress=False)
    finally:
        torch.set_num_threads(n_threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(keep_dir, name) if keep_dir else os.path.join(tmp, "ck")
        qm.save(out, overwrite=True)
        tensors = load_file(os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json")) as f:
            layers = json.load(f)["quantization_config"]["layers"]
    figures = {"config layers": layers, "report layers": qm.report.layers,
               "report blocks": [{k: v for k, v in b.items() if not k.endswith("_s")} for b in qm.report.blocks]}
    return tensors, json.loads(json.dumps(figures))


def _figure_diffs(want, got, where: str, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(want.keys() | got.keys()):
            if k not in want or k not in got:
                out.append(f"{where}.{k}: only in {'the record' if k in want else 'this run'}")
            else:
                _figure_diffs(want[k], got[k], f"{where}.{k}", out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{where}: {len(got)} entries, recorded {len(want)}")
        for i, (w, g) in enumerate(zip(want, got)):
            _figure_diffs(w, g, f"{where}[{i}]", out)
    elif isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if not math.isclose(want, got, rel_tol=FIGURE_REL, abs_tol=1e-9):
            out.append(f"{where}: {got!r}, recorded {want!r} (relative tolerance {FIGURE_REL})")
    elif want != got:
        out.append(f"{where}: {got!r}, recorded {want!r}")


def compare(want_t: dict[str, torch.Tensor], want_f: dict, got_t: dict[str, torch.Tensor], got_f: dict) -> list[str]:
    """The differences beyond tolerance between a recorded run and this one, one line each."""
    out: list[str] = []
    for k in sorted(want_t.keys() | got_t.keys()):
        if k not in want_t or k not in got_t:
            out.append(f"tensor {k}: only in {'the record' if k in want_t else 'this run'}")
            continue
        w, g = want_t[k], got_t[k]
        if w.dtype != g.dtype or w.shape != g.shape:
            out.append(f"tensor {k}: {g.dtype}{tuple(g.shape)}, recorded {w.dtype}{tuple(w.shape)}")
        elif w.is_floating_point():
            w64, g64 = w.double(), g.double()
            if not torch.equal(torch.isnan(w64), torch.isnan(g64)):
                out.append(f"tensor {k}: NaNs at other places")
                continue
            w64, g64 = torch.nan_to_num(w64), torch.nan_to_num(g64)
            rel = float((w64 - g64).norm() / w64.norm().clamp_min(1e-30))
            if rel > FLOAT_REL:
                out.append(f"tensor {k}: relative difference {rel:.2e} > {FLOAT_REL}")
        else:
            frac = float((w.reshape(-1).view(torch.uint8) != g.reshape(-1).view(torch.uint8)).double().mean()) \
                if w.numel() else 0.0
            if frac > CODE_FRAC:
                out.append(f"tensor {k}: {frac:.2%} of bytes differ > {CODE_FRAC:.0%}")
    _figure_diffs(want_f, got_f, "figures", out)
    return out


def recorded(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(str(REF_DIR / f"{name}.safetensors")), json.loads(FIGURES.read_text())[name]


def write() -> None:
    from safetensors.torch import save_file

    REF_DIR.mkdir(exist_ok=True)
    figures = {}
    for name in RECIPES:
        tensors, figures[name] = outputs(name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(REF_DIR / f"{name}.safetensors"))
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def _worst(want_t, want_f, got_t, got_f) -> dict[str, float]:
    """The largest byte fraction, float difference and figure difference between two runs."""
    worst = {"code bytes": 0.0, "float rel": 0.0, "figure rel": 0.0}
    for k in want_t.keys() & got_t.keys():
        w, g = want_t[k], got_t[k]
        if w.shape != g.shape or not w.numel():
            continue
        if w.is_floating_point():
            d = float((w.double() - g.double()).norm() / w.double().norm().clamp_min(1e-30))
            worst["float rel"] = max(worst["float rel"], d)
        else:
            d = float((w.reshape(-1).view(torch.uint8) != g.reshape(-1).view(torch.uint8)).double().mean())
            worst["code bytes"] = max(worst["code bytes"], d)

    def walk(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a.keys() & b.keys():
                walk(a[k], b[k])
        elif isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b):
                walk(x, y)
        elif isinstance(a, float) and isinstance(b, float) and a:
            worst["figure rel"] = max(worst["figure rel"], abs(a - b) / abs(a))

    walk(want_f, got_f)
    return worst


def spread() -> None:
    """Re-run every recipe under other CPU kernel choices and thread counts; print how far each
    lands from the record (the tolerances above must sit well above these)."""
    settings = [("default", 1), ("avx2", 1), ("avx512", 1), ("avx2", 2), ("avx512", 2)]
    for cap, threads in settings:
        code = (f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import _codes; "
                f"torch.set_num_threads({threads}); _codes.torch.set_num_threads = lambda n: None; "
                "print(json.dumps({r: _codes._worst(*_codes.recorded(r), *_codes.outputs(r)) "
                "for r in _codes.RECIPES}))")
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if res.returncode:
            print(f"{cap} x{threads}: failed\n{res.stderr[-2000:]}")
            continue
        for r, w in json.loads(res.stdout.strip().splitlines()[-1]).items():
            print(f"{cap:8s} threads={threads} {r:18s} " + "  ".join(f"{k} {v:.2e}" for k, v in w.items()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:] == ["--spread"]:
        spread()
    else:
        keep = sys.argv[1] if len(sys.argv) > 1 else None
        bad = {r: compare(*recorded(r), *outputs(r, keep)) for r in RECIPES}
        print(json.dumps(bad, indent=1))
