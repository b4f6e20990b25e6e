"""Compare the packed tensors of two quantized runs (bench/gptq_8b.py --save-codes A / B).

    python bench/compare_codes.py A.safetensors B.safetensors

Prints, per tensor kind (qweight, scales, ...), how many elements differ; for 4-bit ``qweight`` also
how many 4-bit codes differ and by how much. Exit status 0 either way: this measures, it does not judge.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from safetensors import safe_open


def main() -> int:
    a_path, b_path = sys.argv[1:3]
    n_el, n_diff = defaultdict(int), defaultdict(int)
    codes = codes_diff = codes_far = 0
    with safe_open(a_path, "pt") as fa, safe_open(b_path, "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            print(f"different tensor sets: {len(ka ^ kb)} names differ, e.g. {sorted(ka ^ kb)[:3]}")
        for k in sorted(ka & kb):
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            kind = k.rsplit(".", 1)[-1]
            if x.shape != y.shape or x.dtype != y.dtype:
                print(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
                continue
            xb = x.view(torch.uint8) if x.dtype != torch.bool else x
            yb = y.view(torch.uint8) if y.dtype != torch.bool else y
            n_el[kind] += x.numel()
            n_diff[kind] += int((x.view(torch.uint8) != y.view(torch.uint8)).sum()) if x.element_size() == 1 \
                else int((x != y).sum())
            if kind == "qweight" and x.dtype == torch.uint8:
                for sh in (0, 4):
                    cx, cy = (xb.int() >> sh) & 15, (yb.int() >> sh) & 15
                    codes += cx.numel()
                    d = (cx - cy).abs()
                    codes_diff += int((d > 0).sum())
                    codes_far += int((d > 1).sum())
    print("| tensor | elements | differing | fraction |")
    print("|---|---|---|---|")
    for kind in sorted(n_el):
        print(f"| {kind} | {n_el[kind]} | {n_diff[kind]} | {n_diff[kind] / max(n_el[kind], 1):.3e} |")
    if codes:
        print(f"| 4-bit codes | {codes} | {codes_diff} (|diff|>1: {codes_far}) | {codes_diff / codes:.3e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
