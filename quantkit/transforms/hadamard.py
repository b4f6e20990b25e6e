"""Orthonormal Hadamard-type transforms of any dimension, applied fast (no dense n x n matrix).

A dimension ``n`` is split as ``n = m * p`` with ``p`` a power of two and ``m`` small, and the
transform is the Kronecker product ``T = K_m ⊗ H_p`` (both normalized to be orthogonal):

* ``H_p`` is the Sylvester (Walsh–Hadamard) matrix;
* ``K_m`` is a small known Hadamard matrix (``kind: "hadamard"``) built by Paley's constructions
  (order q+1 for a prime q ≡ 3 mod 4, order 2(q+1) for a prime q ≡ 1 mod 4): 12, 20, 28, 36, 44,
  60, 68, 76, 84, ... times powers of two; ``m`` is the smallest such order that leaves a power of
  two. When no Hadamard order fits (the odd part of ``n`` is, e.g., 23), ``K_m`` is the
  orthonormal DCT-II matrix of the odd part (``kind: "dct"``): still orthogonal and incoherent
  (entries at most sqrt(2/m)), only a little less flat than a Hadamard. No dimension is padded.

Real model dimensions: 576 = 36·16, 1536 = 12·128, 192 = 12·16, 640 = 20·32, 2048 = 1·2048.

Application (:func:`hadamard_transform`): ``H_p`` is itself split into Sylvester blocks of at most
``MAX_BLOCK`` (H_p = H_b1 ⊗ H_b2 ⊗ ...), and each Kronecker factor is applied as one small GEMM over
its axis of the reshaped vector followed by a cyclic axis shift (the way tensor-core Hadamard kernels
work with 16 x 16 tiles): n·(m + Σ b_i) multiply-adds per vector, never an n x n matrix. On CPU this
beats the radix-2 butterfly (:func:`fwht`, kept as the reference) by using BLAS. The inverse is the
transpose (``transpose=True``): every factor transposed (Sylvester blocks are symmetric).

The small matrices are rebuilt deterministically from ``(m, kind)`` (the plan); a checkpoint stores
only the plan in its layer spec. Code written from the definitions (Paley 1933; Sylvester 1867).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import CheckpointError

# ------------------------------------------------------------------------------------------
# small Hadamard matrices (±1 entries, H Hᵀ = m I)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the Legendre symbol mod the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return torch.tensor(chi, dtype=torch.float64)[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [−1, Q]] (skew-symmetric)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] (symmetric), each 0 replaced by
    [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]]."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_blk = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_blk = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    out = torch.kron(c, one_blk) + torch.kron((c == 0).double(), zero_blk)
    return out


@functools.cache
def small_hadamard(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m (float64, m x m) from Sylvester/Paley, or None if unknown."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return _paley2(q)
    half = small_hadamard(m // 2)
    if half is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    return None


def dct_matrix(m: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (float64, m x m): C[k, i] = c_k cos(π (i + ½) k / m)."""
    k = torch.arange(m, dtype=torch.float64).view(-1, 1)
    i = torch.arange(m, dtype=torch.float64).view(1, -1)
    c = torch.cos(math.pi * (i + 0.5) * k / m) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c


# ------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class HadamardPlan:
    n: int
    m: int  # the small factor (1: pure Walsh–Hadamard)
    kind: str  # "hadamard" or "dct": what the m x m factor is

    @property
    def p(self) -> int:
        return self.n // self.m

    def to_spec(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], where: str = "transform") -> HadamardPlan:
        try:
            pl = cls(int(spec["n"]), int(spec["m"]), str(spec["kind"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: a Hadamard plan needs integer 'n', 'm' and a 'kind', "
                                  f"got {spec!r}") from None
        p = pl.n // pl.m if pl.m > 0 else 0
        if pl.m < 1 or pl.n % pl.m or p & (p - 1) or pl.kind not in ("hadamard", "dct") or \
                (pl.kind == "hadamard" and small_hadamard(pl.m) is None):
            raise CheckpointError(f"{where}: invalid Hadamard plan {spec!r} (n must be m times a power of two; "
                                  f"kind 'hadamard' needs a known Hadamard order m)")
        return pl

    def small(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The normalized (orthogonal) m x m factor."""
        return _small_cached(self.m, self.kind, str(device or "cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _small_cached(m: int, kind: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "hadamard":
        k = small_hadamard(m) / math.sqrt(m)
    else:
        k = dct_matrix(m)
    return k.to(device=device, dtype=dtype)


@functools.cache
def plan(n: int) -> HadamardPlan:
    """How to build an orthonormal Hadamard-type transform of size n (see the module doc)."""
    if n < 1:
        raise ValueError(f"transform size must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    odd = n // p
    m = odd
    while m <= n:
        if small_hadamard(m) is not None:
            return HadamardPlan(n, m, "hadamard")
        m *= 2
    return HadamardPlan(n, odd, "dct")


# ------------------------------------------------------------------------------------------
# application


def sylvester(p: int) -> torch.Tensor:
    """The ±1 Sylvester–Hadamard matrix of order p (a power of two), float64."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform along the last axis (power-of-two length) by the
    radix-2 butterfly (p log2 p additions). The reference for :func:`hadamard_transform`."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {p}")
    shape = x.shape
    y = x.reshape(-1, p).clone()
    z = torch.empty_like(y)
    h = 1
    while h < p:
        yv, zv = y.view(-1, p // (2 * h), 2, h), z.view(-1, p // (2 * h), 2, h)
        torch.add(yv[:, :, 0], yv[:, :, 1], out=zv[:, :, 0])
        torch.sub(yv[:, :, 0], yv[:, :, 1], out=zv[:, :, 1])
        y, z = z, y
        h *= 2
    return y.view(shape) * (1.0 / math.sqrt(p))


MAX_BLOCK = 32  # largest Sylvester factor applied as one small GEMM


def pow2_split(p: int, max_block: int | None = None) -> list[int]:
    """p = 2^k as a product of nearly equal powers of two, each at most ``max_block``."""
    max_block = max_block or MAX_BLOCK
    k = p.bit_length() - 1
    kb = max_block.bit_length() - 1
    parts = max(1, -(-k // kb)) if k else 0
    out = []
    for i in range(parts):
        bits = k // parts + (1 if i < k % parts else 0)
        out.append(1 << bits)
    return out


@functools.lru_cache(maxsize=128)
def _factors(pl: HadamardPlan, device: str, dtype: torch.dtype, transpose: bool) -> tuple[torch.Tensor, ...]:
    """Normalized Kronecker factors of T (T = F_1 ⊗ F_2 ⊗ ...), each transposed if asked."""
    fs = []
    if pl.m > 1:
        fs.append(pl.small(device, torch.float64))
    for b in pow2_split(pl.p):
        fs.append((sylvester(b) / math.sqrt(b)).to(device))
    return tuple((f.t() if transpose else f).to(dtype).contiguous() for f in fs)


def hadamard_transform(x: torch.Tensor, pl: HadamardPlan | int, transpose: bool = False) -> torch.Tensor:
    """``T x`` (or ``Tᵀ x``) along the last axis of ``x``, T orthonormal of size ``pl.n``.

    T = F_1 ⊗ ... ⊗ F_k with small factors (the m x m one and Sylvester blocks of at most
    ``MAX_BLOCK``): each factor is one small GEMM over its axis followed by a cyclic axis shift,
    so the work is n·Σ|F_i| per vector (as tensor-core Hadamard kernels do it with 16 x 16 tiles),
    never the n x n matrix. Computed in float32 (float64 for float64 input), returned in x's dtype."""
    if isinstance(pl, int):
        pl = plan(pl)
    n = x.shape[-1]
    if n != pl.n:
        raise ValueError(f"the last axis has {n} entries, the Hadamard plan is for {pl.n}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    fs = _factors(pl, str(x.device), cdt, transpose)
    if not fs:
        return x
    rows = x.numel() // n
    y = x.reshape(rows, n).to(cdt)
    for f in reversed(fs):
        b = f.shape[0]
        y = torch.matmul(y.reshape(-1, b), f.t())  # F applied along the last factor axis
        if len(fs) > 1:  # move that axis to the front of the factor axes (cyclic shift)
            y = y.reshape(rows, n // b, b).transpose(1, 2)
    return y.reshape(x.shape).to(x.dtype)


def dense_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The n x n matrix T (for tests and debugging only: the transforms never build it)."""
    eye = torch.eye(n, dtype=torch.float64)
    return hadamard_transform(eye, plan(n)).t().contiguous().to(dtype)  # rows of T x for each e_i -> columns


# ------------------------------------------------------------------------------------------
# random signs, stored bit-packed


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A reproducible vector of ±1 (float32, [n])."""
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randint(0, 2, (n,), generator=g).float() * -2 + 1


def pack_signs(s: torch.Tensor) -> torch.Tensor:
    """±1 [n] -> uint8 [ceil(n/8)]: bit i (little-endian within byte i // 8) set where s[i] < 0."""
    n = s.numel()
    bits = (s.reshape(-1) < 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * w).sum(1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """uint8 [ceil(n/8)] -> ±1 [n] in ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise CheckpointError(f"a packed sign vector for size {n} must be uint8 [{(n + 7) // 8}], got "
                              f"{packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return (1 - 2 * bits.reshape(-1)[:n].to(dtype))


__all__ = ["HadamardPlan", "plan", "fwht", "sylvester", "pow2_split", "hadamard_transform", "dense_matrix",
           "small_hadamard", "dct_matrix", "random_signs", "pack_signs", "unpack_signs"]
