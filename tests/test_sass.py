"""The inline PTX and the kernels around it compile for the H100 (sm_90) on a machine without a GPU:
Triton's bundled ptxas assembles them (a PTX syntax error, a bad operand count or an unsupported
instruction fails here, in CI, not first on the lent GPU) and the main loops keep the instruction
budgets docs/PERFORMANCE.md relies on. bench/sass_count.py does the compiling and counting, in a
child process: the test session runs Triton's interpreter, under which kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sass_count.py"
VARIANTS = {
    "int_fp32": dict(path="mma"),
    "int_asm": dict(path="mma", asm=True),
    "int_asm_asym_fp16": dict(path="mma", asm=True, zero=True, dtype="fp16"),
    "int_asm_unroll2": dict(path="mma", asm=True, unroll=2),
    "lut_asm": dict(path="mma", mode=1, asm=True),
    "lut_l1": dict(path="mma", mode=1, asm=False),
    "lut_gemv_asm": dict(path="gemv", mode=1, asm=True, bn=128, bkw=16),
    "lut_gemv_l1": dict(path="gemv", mode=1, asm=False, bn=128, bkw=16),
}
CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sass_count", sys.argv[1])
sc = importlib.util.module_from_spec(spec); spec.loader.exec_module(sc)
try:
    sc._bin("nvdisasm"); sc._bin("ptxas")
except SystemExit as e:
    print(json.dumps({"skip": str(e)})); sys.exit(0)
out = {}
for name, kw in json.loads(sys.argv[2]).items():
    ck, sass, per = sc.k_variant(**kw)
    ops = sc.main_loop(sass)
    out[name] = {"per_weight": sum(ops.values()) / per, "ops": dict(ops)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT), json.dumps(VARIANTS)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


def test_int_ptx_dequant_compiles_and_is_cheaper(counts):
    fp32, asm = counts["int_fp32"], counts["int_asm"]
    assert asm["ops"].get("PRMT", 0) >= 16 and asm["ops"].get("HFMA2", 0) >= 16  # the packed dequant runs
    assert asm["per_weight"] < 0.85 * fp32["per_weight"], (asm["per_weight"], fp32["per_weight"])
    assert counts["int_asm_asym_fp16"]["per_weight"] < fp32["per_weight"]
    assert counts["int_asm_unroll2"]["per_weight"] < 1.1 * asm["per_weight"]


def test_lut_lookups_compile_without_memory_loads(counts):
    ops = counts["lut_asm"]["ops"]
    assert ops.get("PRMT", 0) >= 100  # 16 per word of 8 codes
    # no table loads: what global loads remain are the chunk's group scales (weights and x come by
    # cp.async); the L1-lookup variant loads per weight
    assert ops.get("LDG", 0) <= 4 and ops.get("LD", 0) == 0
    assert counts["lut_l1"]["ops"].get("LDG", 0) >= 32
    g, l1 = counts["lut_gemv_asm"], counts["lut_gemv_l1"]
    assert g["ops"].get("LDG", 0) < l1["ops"].get("LDG", 0) / 2 and g["per_weight"] < l1["per_weight"]
