"""Rebuild docs/QUALITY.md (the headline tables) from the full sections in docs/quality/*.md.

    python bench/quality_index.py
"""

import os
import re

D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs") + "/"
found = open(D + 'quality/foundation.md').read()
lowbit = open(D + 'quality/lowbit.md').read()
kv = open(D + 'quality/kv.md').read()
tasks = open(D + 'quality/tasks.md').read()
formats = open(D + 'quality/formats.md').read()


def first_table(md, start_pat=None):
    lines = md.splitlines()
    i0 = 0
    if start_pat:
        for i, ln in enumerate(lines):
            if re.search(start_pat, ln):
                i0 = i
                break
    out, started = [], False
    for ln in lines[i0:]:
        if ln.startswith('|'):
            out.append(ln)
            started = True
        elif started:
            break
    return "\n".join(out)


parts = [
    "# Quality\n\nMeasured tables, each with model, data, settings, device and date. The full sections (settings,\n"
    "per-layer detail, raw JSON) are in `docs/quality/*.md`; this page holds the headline tables.\n"
    "Figures were measured, never estimated; where a target was missed the text says by how much.\n",
    found,
    "## Low-bit: QuIP incoherence and norm tweaking (issue 3)\n\nsmollm2-135m, INT asymmetric g128, 32 x 512 "
    "calibration, 40 x 512 evaluation windows (same text as\nabove). Measured on the lent NVIDIA H200 (fp32), two rows "
    "cross-checked on this CPU (3-bit GPTQ+QuIP(in): 40.63 CPU vs 40.48 H200). Full section, settings and the anchor "
    "comparison: "
    "[docs/quality/lowbit.md](quality/lowbit.md).\n",
    first_table(lowbit, r'^\| bits \| method'),
    "\n## Number formats at equal bits (issue 4)\n\nFull section: [docs/quality/formats.md](quality/formats.md).\n",
    first_table(formats),
    "\n" + formats.split("## What the table shows", 1)[-1].split("\n\n", 2)[1].strip() + "\n"
    if "## What the table shows" in formats else "",
    "\n## KV-cache quantization (issue 5)\n\nsmollm2-135m with float weights, 40 windows x 512 tokens fed in chunks "
    "of 64 through the quantized\ncache (residual window 32, key groups of 32 tokens, value groups of 32 channels); "
    "measured on the lent\nH200. Full section (allocations per layer, norms, LAMBADA): "
    "[docs/quality/kv.md](quality/kv.md).\n",
    first_table(kv, r'^\| cache'),
    "\n## Zero-shot accuracy of the float model vs published figures (issue 6)\n\nFull section: "
    "[docs/quality/tasks.md](quality/tasks.md).\n",
    first_table(tasks, r'^\| task \(split'),
]
open(D + 'QUALITY.md', 'w').write("\n".join(parts) + "\n")
