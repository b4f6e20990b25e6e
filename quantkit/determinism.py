"""Run-to-run determinism on the GPU: ``quantize(..., deterministic=True)`` / ``--deterministic``.

On a GPU, block reconstruction's backward passes and cuBLAS's split reductions sum in an order that
changes from run to run, so two runs with the same seed can keep different codes (measured on an H100,
docs/QUALITY.md: W4 gaps +2.32 and +2.66 from one seed). Inside :func:`deterministic_algorithms` torch
picks deterministic kernels (``torch.use_deterministic_algorithms``; an op that has none warns, once)
and cuBLAS gets the fixed workspace its deterministic mode needs (``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
set when unset). Measured cost: about 30 % more quantization time on an H100 (docs/QUALITY.md). The CPU
path is deterministic either way.

cuBLAS's workspace size is read from the variable once per process, at its first GPU matmul (torch caches
it), so in a process that already ran one, set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment
before starting Python. The CLI's ``--deterministic`` calls :func:`for_process` before any work (``quantkit
run`` evaluates the float model on the GPU before it quantizes).
"""

from __future__ import annotations

import contextlib
import os

import torch

CUBLAS_DETERMINISTIC = ":4096:8"


def for_process() -> None:
    """cuBLAS's deterministic workspace for the rest of the process (unless the user set one): called before
    any GPU work, where torch reads the variable once."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Deterministic kernels inside the block when ``enabled`` (else nothing changes); the previous
    setting of torch's flag and of the cuBLAS variable is restored on exit."""
    if not enabled:
        yield
        return
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    env_was = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env_was is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        if env_was is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
