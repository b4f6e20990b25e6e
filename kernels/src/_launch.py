"""Launch plumbing shared by the kernels: a low-overhead launcher, split-K workspaces, tuned configs.

Eager overhead matters at decode (M = 1): Triton's ``kernel[grid](...)`` binds and hashes every
argument on each call. :class:`Launcher` calls Triton normally the first time (compiling), keeps
the ``CompiledKernel`` and then calls its launcher directly — one Python call with the arguments
already in order. Anything unexpected (an older Triton, launch hooks set, the interpreter) keeps
the ordinary path, which is always correct.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import torch

try:
    import triton
except ImportError:  # pragma: no cover - the package imports this module only with Triton present
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_version() -> tuple[int, int]:
    try:
        a, b = triton.__version__.split(".")[:2]
        return int(a), int(b)
    except Exception:  # noqa: BLE001
        return (0, 0)


FAST_LAUNCH = (not INTERPRET) and triton is not None and _triton_version() >= (3, 3) \
    and os.environ.get("QUANTKIT_KERNEL_FASTLAUNCH", "1") != "0"


def _hooks_set() -> bool:
    """Whether a Triton launch hook is installed (then every launch goes through Triton's own path, which
    calls it). Triton >= 3.4 keeps each hook as a ``HookChain`` object that is never None: it counts as
    set only when it holds a call (until this was seen, 2026-12-08, the cached launches below were never
    taken on Triton 3.6: every call paid ``fn[grid]``'s full cost)."""
    try:
        from triton import knobs
    except Exception:  # noqa: BLE001
        return False
    return any(_hook_active(getattr(knobs.runtime, name, None)) for name in ("launch_enter_hook", "launch_exit_hook"))


def _hook_active(hook) -> bool:
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # triton.knobs.HookChain
    return bool(calls) if isinstance(calls, list) else True


class Launcher:
    """One Triton kernel with fixed constexprs and launch options.

    Call it as ``launcher(grid, *runtime_args)``: the runtime arguments in signature order. The
    kernel's constexprs must be its last parameters, in the order of ``consts``.
    """

    __slots__ = ("fn", "consts", "opts", "ck", "tail", "dev")

    def __init__(self, fn, consts: dict, num_warps: int = 4, num_stages: int = 2, device=None, maxnreg=None):
        self.fn = fn
        self.consts = dict(consts)
        self.opts = {"num_warps": num_warps, "num_stages": num_stages}
        if maxnreg and not INTERPRET:  # a register cap (more programs per SM), compiled CUDA only
            self.opts["maxnreg"] = int(maxnreg)
        self.ck = None
        self.tail = tuple(self.consts.values())
        self.dev = 0 if device is None or device.index is None else device.index

    def __call__(self, grid, *args):
        ck = self.ck
        if ck is not None:
            ck.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.dev),
                   ck.function, ck.packed_metadata, None, None, None, *args, *self.tail)
            return
        k = self.fn[grid](*args, **self.consts, **self.opts)
        if FAST_LAUNCH and k is not None and not _hooks_set():
            if hasattr(k, "result"):
                k = k.result()
            names = list(self.fn.arg_names)
            if names[len(args):] == list(self.consts) and hasattr(k, "packed_metadata"):
                self.ck = k


def ctypes_launch(lau: Launcher, grid, args: tuple, out):
    """The :class:`._cuda_launch.CtypesLaunch` of ``lau``'s compiled kernel for the runtime ``args`` (ints
    for pointers) and ``grid``, or None where that launch cannot be proven Triton's own (see that module),
    it is turned off, or ``out`` (the call's output) is not on a GPU, or a CUDA graph is being captured."""
    from . import _cuda_launch

    if not (_cuda_launch.ENABLED and FAST_LAUNCH) or lau.ck is None or out.device.type != "cuda":
        return None
    try:
        if torch.cuda.is_current_stream_capturing():
            return None
        return _cuda_launch.CtypesLaunch(lau.ck, list(lau.fn.arg_names), [*args, *lau.tail], grid)
    except Exception:  # noqa: BLE001 - anything unexpected keeps Triton's launcher
        return None


def checked(run, x, out, M):
    """``run`` if one call of it into a fresh buffer agrees with ``out`` (Triton's launch of the same
    call), else None."""
    from . import _cuda_launch

    try:
        return run if _cuda_launch.verified(out, lambda buf: run(x, buf, M)) else None
    except Exception:  # noqa: BLE001
        return None


def ctypes_run(lau: Launcher, grid, args: tuple, dynamic: tuple, x, out, M, dev: int):
    """A ``run(x, out, M)`` closure launching ``lau``'s compiled kernel through
    :mod:`._cuda_launch` (the parameter block built here, only the slots named in ``dynamic`` — the
    input pointer, the output pointer, the row count — written per call), or None (see
    :func:`ctypes_launch`). ``args`` are the runtime arguments of the call just made through Triton
    into ``out``; the new launch is checked against that output once."""
    cl = ctypes_launch(lau, grid, args, out)
    if cl is None:
        return None
    try:
        sx, so, sm = (cl.slot(n) for n in dynamic)
    except KeyError:
        return None
    stream = torch._C._cuda_getCurrentRawStream

    def run(x, out, M):
        sx.value = x.data_ptr()
        so.value = out.data_ptr()
        sm.value = M
        cl(stream(dev))

    return checked(run, x, out, M)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nibble_words(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, k] (values < 16) -> int32 words [n, ceil(k/8)], column 8j+i in nibble i of word j."""
    n, k = codes.shape
    kp = cdiv(k, 8) * 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, kp - k)).view(n, kp // 8, 8)
    word = torch.zeros(n, kp // 8, dtype=torch.int64, device=codes.device)
    for i in range(8):
        word |= c[:, :, i] << (4 * i)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32).contiguous()


# ---- split-K workspaces --------------------------------------------------------------------------
# One fp32 partial-sum buffer and one counter array per device, shared by every layer (layers run
# one after another on a stream). Buffers only grow, and replaced ones stay alive so that CUDA
# graphs captured earlier keep valid pointers. Counters are zero between launches: the last
# program of a tile resets its counter.
_WS: dict = {}
_WS_OLD: list = []
_WS_LOCK = threading.Lock()


def workspace(device: torch.device, n_partial: int, n_counters: int):
    key = (device.type, device.index)
    with _WS_LOCK:
        cur = _WS.get(key)
        if cur is None or cur[0].numel() < n_partial or cur[1].numel() < n_counters:
            if cur is not None:
                _WS_OLD.append(cur)
                n_partial = max(n_partial, cur[0].numel())
                n_counters = max(n_counters, cur[1].numel())
            cur = (torch.empty(max(n_partial, 1), dtype=torch.float32, device=device),
                   torch.zeros(max(n_counters, 1), dtype=torch.int32, device=device))
            _WS[key] = cur
        return cur


def tiled_workspace(device: torch.device, bm: int, tiles_n: int, split: int, tile_elems: int):
    """The split-K buffers of a tiled GEMM's plan as a function of the row count M: ``ws_for(M) ->
    (partials, counters)`` sized for cdiv(M, bm) * tiles_n tiles (no partials when split == 1). A
    plan is made for its M bucket, but the top bucket (``TOP_BUCKET``) also runs larger
    M, whose extra tiles must not index past buffers sized at plan time (an out-of-bounds write
    at M = 8192 on an H100, 2026-12-07, before this)."""

    def ws_for(M: int):
        tiles = cdiv(M, bm) * tiles_n
        return workspace(device, tiles * split * tile_elems if split > 1 else 0, tiles)
    return ws_for


_BUF: dict = {}


def scratch(device: torch.device, nbytes: int) -> torch.Tensor:
    """A per-device uint8 scratch buffer of at least ``nbytes`` (for dequantize-then-cuBLAS)."""
    key = (device.type, device.index)
    with _WS_LOCK:
        cur = _BUF.get(key)
        if cur is None or cur.numel() < nbytes:
            if cur is not None:
                _WS_OLD.append(cur)
            cur = torch.empty(nbytes, dtype=torch.uint8, device=device)
            _BUF[key] = cur
        return cur


def dequant_then_mm(lau, grid, before: tuple, after: tuple, N: int, K: int, dtype: torch.dtype,
                    device: torch.device):
    """The large-M path: ``lau`` dequantizes the weight into the per-device scratch buffer (passed
    between the ``before`` and ``after`` arguments), then cuBLAS multiplies."""
    nbytes = N * K * 2
    wd = scratch(device, nbytes)[:nbytes].view(dtype).view(N, K)
    args = (*before, wd, *after)
    mm = torch.mm

    def run_dq(x, out, M):
        lau(grid, *args)
        mm(x, wd.t(), out=out)
    return run_dq


# ---- tuned configs --------------------------------------------------------------------------------
# One file per GPU, ``tuned_<gpu>.json`` beside this module (bench/kernel_bench.py --tune writes the one of
# the GPU it runs on): key -> config, plus ``_gpu`` (the device name it was measured on), ``_cc`` (its
# compute capability) and ``_device*`` notes. A layer looks its key up in the file of its own GPU
# first, then in the nearest others: same compute capability, then any.
_TUNED_DIR = Path(__file__).parent
_TUNED: dict = {}


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100_80gb_hbm3`` (the tuned file's name part)."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return s[len("nvidia_"):] if s.startswith("nvidia_") else s


def tuned_file(name: str) -> Path:
    return _TUNED_DIR / f"tuned_{gpu_slug(name)}.json"


def _device_id(device) -> tuple[str, tuple[int, int] | None]:
    try:
        if device is not None and getattr(device, "type", "cuda") == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
    except Exception:  # noqa: BLE001
        pass
    return "", None


def _nearness(data: dict, path: Path, name: str, cc) -> int:
    if name and (data.get("_gpu") == name or path.name == tuned_file(name).name):
        return 2
    if cc is not None and tuple(data.get("_cc", ())) == cc:
        return 1
    return 0


def tuned(device=None) -> dict:
    """Configs measured by ``bench/kernel_bench.py --tune`` for the GPU of ``device`` (key -> config):
    its own file's entries over those of the nearest other GPUs, and the file named by
    $QUANTKIT_KERNEL_TUNED over all."""
    name, cc = _device_id(device)
    cached = _TUNED.get(name)
    if cached is not None:
        return cached
    files = []
    for p in sorted(_TUNED_DIR.glob("tuned_*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        files.append((_nearness(data, p, name, cc), p.name, data))
    merged: dict = {}
    for _, _, data in sorted(files, key=lambda t: (t[0], t[1])):  # nearest last: its entries win
        merged.update(data)
    try:
        merged.update(json.loads(Path(os.environ.get("QUANTKIT_KERNEL_TUNED", "/nonexistent")).read_text()))
    except (OSError, ValueError):
        pass
    _TUNED[name] = merged
    return merged


TOP_BUCKET = 4096  # the last M bucket: it holds every M above 2048, without bound


def m_bucket(m: int) -> int:
    """Power-of-two bucket of the row count (1, 2, 4, ..., TOP_BUCKET)."""
    return 1 if m <= 1 else min(1 << (m - 1).bit_length(), TOP_BUCKET)
