"""Compile a kernel variant for the H100 (sm_90) without a GPU and count the instructions of its main
loop — the instruction budgets quoted in docs/PERFORMANCE.md come from here.

    python bench/sass_count.py mma --mode 1 --asm            # k tensor-core path, lut, inline PTX
    python bench/sass_count.py gemv --bn 128 --bkw 16         # k GEMV, int4
    python bench/sass_count.py gemm --bm 128 --bn 128 --bkw 8 --warps 8 --stages 4 --asm --no-swap  # large M
    python bench/sass_count.py fp8 --swap --f16x              # FP8 W8A16 tensor-core path
    quantkit bench sass ...                                    # the same

Triton compiles the kernel for ``GPUTarget("cuda", 90, 32)`` (its bundled ptxas assembles the PTX,
inline assembly included, so a PTX syntax error shows here too), ``nvdisasm`` (bundled with Triton)
disassembles the cubin, and the longest backward branch is taken as the main loop. Printed: the loop's
instruction count, per weight (loop count / weights a thread handles per iteration), shared memory,
and the most frequent opcodes. Static counts: what the loop issues per iteration, not what it waits on.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _bin(name: str) -> str:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not p.exists():
        raise SystemExit(f"sass_count: {p} not found (Triton's bundled CUDA tools are needed)")
    return str(p)


def compile_sm90(fn, signature: dict, constexprs: dict, divisible: tuple, warps: int, stages: int, maxnreg=None):
    """(compiled kernel, SASS text) of ``fn`` for sm_90."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" for n in names}
    sig.update(signature)
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        cub = Path(d) / "k.cubin"
        cub.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([_bin("nvdisasm"), "-c", str(cub)], capture_output=True, text=True, check=True).stdout
    return ck, sass


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward branch's body (empty when the kernel has no loop)."""
    lines = sass.splitlines()
    labels = {}
    for n, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = n
    best = None
    for n, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < n:
            a = labels[m.group(1)]
            if best is None or n - a > best[1] - best[0]:
                best = (a, n)
    ops: collections.Counter = collections.Counter()
    for line in lines[best[0]:best[1] + 1] if best else []:
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


_INTS = ("M", "N", "K", "KWS", "G", "CPS", "SPLIT")
_K_DIV = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "lut_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "K", "KWS")


def k_variant(path: str, mode: int = 0, asm: bool = False, bm: int = 16, bn: int = 64, bkw: int = 16,
              warps: int = 4, stages: int = 3, unroll: int = 1, dtype: str = "bf16", zero: bool = False,
              swap: bool = True, gs: int = 128, maxnreg=None):
    """Compile one variant of the default W4A16 kernels (kernels/src/w4a16_jit.py); returns (compiled, sass,
    weights per thread per loop iteration)."""
    from quantkit.kernels import w4a16_jit as km

    lut_t = "*i32" if asm and mode == 1 else "*fp16"
    ptrs = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "lut_ptr": lut_t,
            "out_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    common = dict(MODE=mode, HAS_SCALE=True, HAS_ZERO=zero, ZC=0.0 if zero else 8.0, GS=gs, LS=16, LUT_ROW=True,
                  BN=bn, BKW=bkw, SPLITK=True, EVEN=True, LUTG=False, ASM=asm)
    if path == "mma":
        fn = km.w4a16_mma
        c = dict(common, BM=bm, SWAP=swap, GROUP_M=1, INTERP=False, U=unroll)
        per = bn * bkw * 8 * unroll / (32 * warps)
    elif path == "gemm":
        fn = km.w4a16_gemm
        c = dict(common, BM=bm, SWAP=swap, GROUP_M=8, INTERP=False)
        c.pop("LUTG")
        per = bn * bkw * 8 / (32 * warps)
    elif path == "gemv":
        fn = km.w4a16_gemv
        c = dict(common, BM=1, PF=True)
        stages, per = 1, bn * bkw * 8 / (32 * warps)
    else:
        raise SystemExit(f"sass_count: unknown W4A16 path {path!r}")
    sig = dict(ptrs, **{n: "i32" for n in _INTS})
    ck, sass = compile_sm90(fn, sig, c, _K_DIV, warps, stages, maxnreg)
    return ck, sass, per


def fp8_variant(swap: bool = False, f16x: bool = False, bm: int = 16, bn: int = 64, bk: int = 128,
                warps: int = 4, stages: int = 3):
    """The FP8 W8A16 tensor-core kernel; returns (compiled, sass, weights per thread per iteration)."""
    from quantkit.kernels import fp8

    sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "out_ptr": "*bf16",
           "part_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KPS": "i32",
           "SPLIT": "i32"}
    c = dict(XSCALE=False, WS_ROW=True, BM=bm, BN=bn, BK=bk, SPLITK=True, GROUP_M=1, EVEN_K=True, F16X=f16x,
             SWAP=swap)
    div = ("x_ptr", "w_ptr", "xs_ptr", "ws_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N", "K")
    ck, sass = compile_sm90(fp8._fp8_gemm, sig, c, div, warps, stages)
    return ck, sass, bn * bk / (32 * warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=["mma", "gemm", "gemv", "fp8"])
    ap.add_argument("--mode", type=int, default=0, help="0: int codes, 1: lut codes")
    ap.add_argument("--asm", action="store_true", help="the inline-PTX dequant (kernels/src/_ptx.py)")
    ap.add_argument("--zero", action="store_true", help="asymmetric (zero points per group)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--bm", type=int, default=16)
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--bkw", type=int, default=16)
    ap.add_argument("--bk", type=int, default=128, help="fp8: K tile")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--unroll", type=int, default=1)
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--swap", action="store_true", help="fp8: weight tile as the A operand")
    ap.add_argument("--f16x", action="store_true", help="fp8: multiply in fp16 (x scaled per row)")
    a = ap.parse_args(argv)
    if a.path == "fp8":
        ck, sass, per = fp8_variant(a.swap, a.f16x, a.bm, a.bn, a.bk, a.warps, a.stages)
    else:
        ck, sass, per = k_variant(a.path, a.mode, a.asm, a.bm, a.bn, a.bkw, a.warps, a.stages, a.unroll, a.dtype,
                                  a.zero, not a.no_swap)
    ops = main_loop(sass)
    total = sum(ops.values())
    print(f"main loop: {total} instructions, {total / per:.2f} per weight ({per:g} weights a thread per "
          f"iteration); shared memory {ck.metadata.shared} B")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(14)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
