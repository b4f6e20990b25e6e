"""GPTQ (Frantar et al., 2022): column-by-column rounding with Hessian-weighted error feedback.

Options: dampening (fraction of the mean Hessian diagonal), act-order (columns by decreasing
diagonal), static groups (group params fitted on the natural column groups before the solve, so
act-order needs no g_idx at run time), lazy block updates of ``block_size`` columns. Works with
any :class:`WeightFormat` (INT, LUT, FP): the format decides the grid, GPTQ decides the rounding.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import Literal

import torch
from pydantic import Field

from ..errors import NumericalError
from ..formats.base import column_groups
from ..registry import register
from .base import LayerStats, Quantizer, QuantizerConfig, QuantResult, all_finite, output_error


class GPTQConfig(QuantizerConfig):
    damp: float = Field(0.01, gt=0, le=1.0)
    act_order: bool = True
    static_groups: bool = True
    block_size: int = Field(128, ge=1)
    # when Cholesky fails, multiply the dampening by 10 up to this many times before giving up
    damp_retries: int = Field(3, ge=0, le=8)
    # inner loop as one Triton kernel per block: "auto" on CUDA, "always" (also CPU, via
    # TRITON_INTERPRET=1 in tests), "never"
    triton: Literal["auto", "always", "never"] = "auto"


def inverse_hessian_factor(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)^-1 (Uᵀ U = (H + λI)^-1), λ = damp·mean(diag H); raises
    NumericalError if H is not positive definite even after ``retries`` ten-fold increases of λ.

    Computed without forming the inverse: with J the reversal permutation and J(H + λI)J = K Kᵀ
    (lower Cholesky), U = J K⁻¹ J. One Cholesky and one triangular solve: half the time of
    Cholesky, inverse and Cholesky again (223 → 112 ms at 14336² on an H200, same U to 6e-7).
    ``h`` is left as it is (a copy is worked on); GPTQ itself hands over a matrix it may overwrite."""
    return _inverse_factor(h.clone, damp, retries)


def _flip_(t: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``t.flip(0, 1)`` in place, for a dense matrix laid out row- or column-major: flipping both
    dimensions reverses its storage, done here in pieces of ``chunk`` elements (values only move, so
    the result is bit for bit the flipped copy, in the same layout); one matrix instead of two."""
    flat = t.as_strided((t.numel(),), (1,))  # the storage, in memory order
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        lo, hi = flat[a:b], flat[n - b:n - a]
        tmp = lo.flip(0)
        lo.copy_(hi.flip(0))
        hi.copy_(tmp)
    return t


def _inverse_factor(make, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """:func:`inverse_hessian_factor` of the matrix ``make()`` returns (a new one per call, row-major,
    which is then overwritten in place; called again only for a retry with more dampening).

    At most two n x n matrices alive at once (the reversed, damped H and its Cholesky factor K; then K
    and U), provided the caller keeps no reference to what ``make`` returned: at n = 8192 in fp32 each is
    256 MiB, and this factor is near the peak of a streamed CPU run. On CPU from n = INPLACE_FACTOR_MIN
    one: K is written over H and U over K (the same U bit for bit)."""
    h = make()
    mean_diag = torch.mean(torch.diagonal(h)).item()
    n = h.shape[0]
    d = damp
    for attempt in range(retries + 1):
        A = _flip_(h if attempt == 0 else make())  # J H J, in place; λ goes on its diagonal (J I J = I)
        h = None
        A.diagonal().add_(d * mean_diag)
        # on CPU from INPLACE_FACTOR_MIN: one n x n matrix throughout, K over A, then U over K (same values)
        inplace = A.device.type == "cpu" and n >= INPLACE_FACTOR_MIN
        K, info = _cholesky_inplace(A) if inplace else torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            if inplace:
                U = _inverse_flipped_(K)
            else:
                # solved in place into the identity, laid out column-major as the solver's own output would
                # be (same values bit for bit): one n x n matrix fewer at the peak
                U = torch.eye(n, device=K.device, dtype=K.dtype).t()
                torch.linalg.solve_triangular(K, U, upper=False, out=U)
                U = _flip_(U)
            del K
            if all_finite(U):
                return U, d
            del U
        else:
            del K
        d *= 10
    raise NumericalError(
        f"the Hessian ({n}x{n}) is not positive definite even with dampening "
        f"{d / 10:g} x mean diagonal; use more calibration samples, raise quantizer.damp, or use rtn "
        f"for this layer")


# On CPU, a Hessian factor of at least this order is computed in place (:func:`_cholesky_inplace`,
# :func:`_inverse_flipped_`): one n x n matrix alive instead of two (at n = 8192 in fp32: 256 MiB less at a
# streamed CPU run's peak), the same U bit for bit, for about the same time. Smaller ones (and other
# devices) take the two-matrix path above. tests/test_gptq_factor_inplace.py compares the two.
INPLACE_FACTOR_MIN = 1024
INPLACE_BLOCK = 256  # columns of K^-1 solved at a time (two n x INPLACE_BLOCK temporaries)


def _cholesky_inplace(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of the symmetric, row-major ``A``, written over ``A``'s storage (column-major:
    ``A.mT`` holds the same values, and LAPACK works in place on a column-major matrix), with zeros above
    its diagonal: bit for bit what ``torch.linalg.cholesky_ex(A)`` returns in a new matrix. Returns (K, info)."""
    Am = A.mT
    info = torch.empty((), dtype=torch.int32, device=A.device)
    K, info = torch.linalg.cholesky_ex(Am, out=(Am, info))
    return K, info  # (were it not written in place after all, K would be a new matrix: the same values)


def _inverse_flipped_(K: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """U = J K⁻¹ J (J the reversal) over ``K``'s own storage, for a column-major lower-triangular ``K``
    with zeros above its diagonal. Returns U (a view of that storage, column-major, as
    :func:`_inverse_factor`'s two-matrix path makes it).

    K⁻¹ is solved ``block`` columns at a time, each into a column-major n x block slice of the identity
    (``solve_triangular`` on the full-height right-hand side: per column the same arithmetic as the one
    solve of the whole identity, bit for bit). U is upper triangular where K is lower, so its strict upper
    triangle goes into K's (unused, never read by the lower solve); U's diagonal waits in a vector until K
    is no longer needed, then K's strict lower triangle is zeroed and the diagonal written."""
    n = K.shape[0]
    block = block or INPLACE_BLOCK
    U = K  # same storage, same layout
    diag = torch.empty(n, dtype=K.dtype, device=K.device)
    rhs = torch.empty(min(block, n), n, dtype=K.dtype, device=K.device).t()  # column-major n x block
    upper = torch.ones(min(block, n), min(block, n), dtype=torch.bool, device=K.device).triu_(1)
    for c0 in range(0, n, block):
        c1 = min(c0 + block, n)
        b = c1 - c0
        X = rhs[:, :b]
        X.zero_()
        X.diagonal(-c0).fill_(1)
        torch.linalg.solve_triangular(K, X, upper=False, out=X)  # columns c0:c1 of K⁻¹
        # U[i, n-1-c] = K⁻¹[n-1-i, c]: these columns of K⁻¹ are U's columns n-c1 .. n-c0-1, flipped
        Y = X.flip(0, 1)
        q0, q1 = n - c1, n - c0
        U[:q0, q0:q1] = Y[:q0]  # above the diagonal block: K stores zeros there
        blk, yb = U[q0:q1, q0:q1], Y[q0:q1]
        m = upper[:b, :b]
        blk[m] = yb[m]  # the diagonal block's strict upper triangle; its lower one is still K's
        diag[q0:q1] = yb.diagonal()
        del X, Y, yb, blk
    for a in range(0, n, block):  # K's strict lower triangle -> U's zeros
        U[a:, a:a + block].triu_()
    U.diagonal().copy_(diag)
    return U


def _scaled_hessian(h, nsamples: int, perm: torch.Tensor | None, dead: torch.Tensor,
                    chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``h.float().div(nsamples)`` with the diagonal of dead columns set to 1, rows and columns in
    ``perm`` order: one new matrix, written a few rows at a time (the values are exactly those of
    dividing, fixing and permuting whole copies, without the two extra n x n temporaries).

    ``h`` is the Hessian, or a :class:`_HessianSpill` holding it in its file: then its rows are read from
    the file a few at a time (the same values, bit for bit) and the Hessian need not be in memory."""
    spilled = isinstance(h, _HessianSpill)
    n = h.like[0][0] if spilled else h.shape[0]
    device = torch.device("cpu") if spilled else h.device
    out = torch.empty(n, n, dtype=torch.float32, device=device)
    step = max(1, chunk_bytes // (4 * max(n, 1)))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        if spilled:
            part = h.rows(r0, r1) if perm is None else h.rows_at(perm[r0:r1]).index_select(1, perm)
        else:
            part = h[r0:r1] if perm is None else h.index_select(0, perm[r0:r1]).index_select(1, perm)
        torch.div(part.float(), nsamples, out=out[r0:r1])
        del part
    out.diagonal()[dead if perm is None else dead[perm]] = 1
    return out


# On CPU, a Hessian of at least this many bytes waits in an unlinked temporary file (in tempfile's folder:
# $TMPDIR, else /tmp) from before GPTQ makes its scaled copy (built from the file's rows) until the output
# error reads it back, bit for bit: a streamed CPU run's peak is in the largest linear's factor and rounding
# loop (a 3B model's down_proj: 256 MiB). A Hessian of this size that only one later linear reads is also
# parked there by the pipeline from its block's calibration on, and stays there after GPTQ's solve
# (:func:`park_hessian`). Where that folder is a RAM disk (tmpfs) this saves nothing. None: never spill.
SPILL_MIN_BYTES: int | None = 128 << 20


class _HessianSpill:
    """``stats.hessian`` written to an unlinked temporary file and dropped (:meth:`out`), read back into a
    new tensor (:meth:`back`); :meth:`close` reads it back if it is out and deletes the file.

    Linears fed the same input (q/k/v, gate/up: one ``stats`` with a ``cache``, where their factor is kept)
    share one spill, kept in that cache: the first writes the Hessian, the others only drop and read it
    back (:meth:`done` leaves the file for them). Its file is closed when the spill is freed, with the cache
    (the collector releases the statistics after the group's last linear). Only weak references to the
    statistics and to the tensor last read back: no cycle through the cache, which would keep the file.

    A *parked* spill (:func:`park_hessian`; unshared statistics only) is the statistics' ``hessian_store``:
    the statistics read the Hessian back from it on first use, GPTQ reuses its file, and :meth:`done` parks
    the Hessian again instead of reading it back; its file closes when the statistics are freed."""

    def __init__(self, stats: LayerStats, shared: bool = False, parked: bool = False):
        self._stats = weakref.ref(stats)
        self.shared = shared
        self.parked = parked  # park_hessian made it: the Hessian goes back to the file, not to memory, when done
        self.file = None
        self.like: tuple = ()
        self._given = None  # the tensor back() made (weakly): while it is stats.hessian, the file holds its bytes
        self._closer = None

    @property
    def stats(self) -> LayerStats:
        return self._stats()

    @classmethod
    def maybe(cls, stats: LayerStats) -> _HessianSpill | None:
        h = stats.hessian
        if not cls.eligible(h):
            return None
        if stats.cache is None:
            sp = stats.hessian_store
            if isinstance(sp, cls) and sp.holds(stats):
                return sp  # park_hessian's file, which holds exactly this Hessian: nothing to write
            return cls(stats)
        sp = stats.cache.get(_SPILL_KEY)
        if sp is not None and sp.holds(stats):
            return sp  # written by an earlier linear of this input: nothing to write
        if sp is not None:  # stale (another stats object or Hessian): its file goes now
            sp.close(restore=False)
        sp = stats.cache[_SPILL_KEY] = cls(stats, shared=True)
        return sp

    @staticmethod
    def eligible(h: torch.Tensor | None) -> bool:
        """A Hessian worth spilling: on CPU, contiguous, at least SPILL_MIN_BYTES."""
        return not (SPILL_MIN_BYTES is None or h is None or h.device.type != "cpu" or not h.is_contiguous()
                    or h.numel() * h.element_size() < SPILL_MIN_BYTES)

    def holds(self, stats: LayerStats) -> bool:
        """The file holds exactly ``stats.hessian`` (the very tensor read back from it last)."""
        return (self.file is not None and self._stats() is stats and self._given is not None
                and stats.hessian is not None and self._given() is stats.hessian)

    def out(self) -> None:
        stats = self.stats
        h = stats.hessian
        if h is None:
            return
        if self.file is None:
            f = tempfile.TemporaryFile()
            try:
                f.write(_bytes_of(h))
                f.flush()
            except OSError:  # no room for it: it stays in memory
                f.close()
                return
            self.file, self.like = f, (tuple(h.shape), h.dtype)
            self._closer = weakref.finalize(self, f.close)
        del h
        stats.hessian = None

    def back(self) -> None:
        stats = self.stats
        if stats is None or self.file is None:
            return
        if stats.hessian_parked:
            _ = stats.hessian  # read back by its store now (before this file may be closed)
            return
        if stats.hessian is None:
            stats.hessian = self.load()

    def read(self) -> torch.Tensor:
        """The spilled Hessian, read from the file into a new tensor (not given to the statistics)."""
        shape, dtype = self.like
        t = torch.empty(shape, dtype=dtype)
        buf = _bytes_of(t)
        self.file.seek(0)
        got = 0
        while got < len(buf):
            n = self.file.readinto(buf[got:])
            if not n:
                raise NumericalError("internal: the spilled Hessian could not be read back")
            got += n
        return t

    def load(self) -> torch.Tensor:
        """:meth:`read`, remembered as the tensor the file holds (the statistics' Hessian from now on: read
        back by :meth:`back`, or by ``LayerStats.hessian`` when parked)."""
        t = self.read()
        self._given = weakref.ref(t)
        return t

    def park(self) -> bool:
        """The Hessian to the file (written if it is not there yet) and out of memory, read back by the
        statistics on first use (``LayerStats.park_hessian``). False where the file could not be written."""
        stats = self.stats
        if stats is None or stats.hessian_parked:
            return stats is not None
        self.out()
        if not self.spilled():
            return False
        stats.park_hessian(self)
        return True

    def spilled(self) -> bool:
        """The Hessian is out: only in the file (rows and rows_at read it)."""
        stats = self.stats
        return self.file is not None and stats is not None and (stats.hessian_parked or stats.hessian is None)

    def _pread(self, buf: memoryview, offset: int) -> None:
        fd = self.file.fileno()
        got = 0
        while got < len(buf):
            k = os.preadv(fd, [buf[got:]], offset + got)
            if not k:
                raise NumericalError("internal: the spilled Hessian could not be read back")
            got += k

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the spilled Hessian, read from the file (a new tensor)."""
        shape, dtype = self.like
        t = torch.empty((r1 - r0,) + tuple(shape[1:]), dtype=dtype)
        if t.numel():
            self._pread(_bytes_of(t), r0 * (t.numel() // (r1 - r0)) * t.element_size())
        return t

    def rows_at(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows ``idx`` of the spilled Hessian, in that order (= ``h.index_select(0, idx)``)."""
        shape, dtype = self.like
        t = torch.empty((len(idx),) + tuple(shape[1:]), dtype=dtype)
        row = t[0].numel() * t.element_size() if len(idx) else 0
        buf = _bytes_of(t) if t.numel() else None
        for i, r in enumerate(idx.tolist()):
            self._pread(buf[i * row:(i + 1) * row], r * row)
        return t

    def done(self) -> None:
        """One linear solved (or failed): the Hessian back; the file kept for the next linear if shared.
        A parked spill (:func:`park_hessian`) parks the Hessian again instead: read back on first use."""
        if self.parked and self.park():
            return
        if not self.shared:
            return self.close()
        try:
            self.back()
        except BaseException:
            self.close(restore=False)
            raise

    def close(self, restore: bool = True) -> None:
        try:
            if restore:
                self.back()
        finally:
            if self.file is not None:
                self._closer()  # closes the file (once)
                self.file = None
            self._given = None


_SPILL_KEY = ("gptq", "hessian spill")  # stats.cache key of the shared spill


def _trim(device: torch.device) -> None:
    """On CPU, freed heap memory back to the OS now (quantkit.solve.release_freed_memory): a large linear's
    solve frees many temporaries of 1-32 MiB (the scaled copy's and the factor's pieces, the loop's blocks),
    which glibc serves from its heap and keeps in RSS until trimmed; otherwise they would sit under the
    weight-sized buffers that come next (~0.1 GiB at a 3B model's down_proj)."""
    if device.type == "cpu":
        from ..solve import release_freed_memory

        release_freed_memory()


def park_hessian(stats: LayerStats) -> bool:
    """Park a large CPU Hessian read by one linear only (``stats.cache`` None) in an unlinked temporary
    file until that linear is solved: ``stats.hessian`` reads it back on first use, the same bits; GPTQ
    then solves from the same file (nothing written twice) and leaves the Hessian parked after it, so
    it is not in memory while the linear's QuantLinear is built and the statistics are released. Called
    by the pipeline after a block's calibration (a 3B model's down_proj: 256 MiB out of memory while
    q/k/v, o, gate and up are solved and built). False: nothing parked (too small, not on CPU, shared,
    already parked, or the file could not be written)."""
    if stats.cache is not None or stats.hessian_parked or not _HessianSpill.eligible(stats.hessian):
        return False
    return _HessianSpill(stats, parked=True).park()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable view (no copy)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


@register("quantizer", "gptq")
class GPTQ(Quantizer):
    Config = GPTQConfig
    cfg: GPTQConfig
    needs_hessian = True
    rows_independent = True  # the column order and the Hessian factor are shared; rows round apart

    def quantize(self, w: torch.Tensor, fmt, stats: LayerStats) -> QuantResult:
        if stats.hessian is None or stats.nsamples == 0:
            raise NumericalError("GPTQ needs calibration statistics (a Hessian) and got none")
        key = ("gptq", self.cfg.damp, self.cfg.damp_retries, self.cfg.act_order)
        # a large Hessian on CPU waits on disk from when its scaled copy is made until the output error
        spill = _HessianSpill.maybe(stats)
        try:
            hit = stats.cache.get(key) if stats.cache is not None else None
            if hit is None:
                hit = self._factor(stats, spill)
                if stats.cache is not None:  # layers fed the same input (q/k/v, gate/up) factor H once
                    stats.cache[key] = hit
            elif spill is not None:
                spill.out()
            dead, col_weight, perm, U, used_damp = hit
            del hit
            rows, cols = w.shape
            dev = w.device
            _trim(dev)  # the factor's freed pieces (under glibc's mmap threshold), before the weight-sized buffers
            any_dead = bool(dead.any())
            # natural column order, dead columns zeroed: what the format's fits see (w itself if none is dead)
            Wn = w.float()
            if any_dead:
                Wn = Wn.clone() if Wn is w else Wn
                Wn[:, dead] = 0
            layer = fmt.begin_layer(Wn, col_weight, stats)
            nat_groups = fmt.cfg.groups(cols)
            g = nat_groups[0][1] - nat_groups[0][0] if nat_groups else cols
            grouped = len(nat_groups) > 1
            static = self.cfg.act_order and self.cfg.static_groups or not grouped
            group_params: list = []
            if static:
                # params of each natural column group, from the weights before any update
                for s, e in nat_groups:
                    group_params.append(fmt.fit_group(Wn[:, s:e], col_weight[s:e], layer))
                nat_of = column_groups(cols, g, dev)
                col_group = nat_of if perm is None else nat_of[perm]  # group of permuted column j
                col_group = col_group.tolist()
            del Wn
            # the working copy, made after the fits (one weight-sized buffer fewer alive): the same values
            # as zeroing the dead columns of a copy of w, then permuting it
            W = (w[:, perm] if perm is not None else w).float()  # permuted before the cast: no fp32 temporary
            if W is w:
                W = W.clone()
            if any_dead:
                W[:, dead if perm is None else dead[perm]] = 0

            fast = self._fast_block(W, fmt, group_params, col_group) if static else None
            # The loop only needs dequantized values; codes are recovered once at the end by rounding
            # the final Q (on the grid already) with each column's group params: fewer ops per column.
            # Q is written into W's storage: columns i1:i2 of W are not read again once their block is done.
            col_gid = torch.zeros(cols, dtype=torch.long)  # group of permuted column c
            params = None
            bs = self.cfg.block_size
            U1 = None
            for i1 in range(0, cols, bs):
                i2 = min(i1 + bs, cols)
                W1 = W[:, i1:i2].clone()
                U1 = U[i1:i2, i1:i2]
                if fast is not None:
                    Q1, Err1 = fast(W1, U1, i1, i2)
                    W[:, i1:i2] = Q1
                    W[:, i2:] -= Err1 @ U[i1:i2, i2:]
                    continue
                Q1 = torch.zeros_like(W1)
                Err1 = torch.zeros_like(W1)
                for i in range(i2 - i1):
                    c = i1 + i
                    if static:
                        params = group_params[col_group[c]]
                    elif c % g == 0:
                        glen = min(g, cols - c)
                        cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :glen]
                        cw = col_weight[perm[c:c + glen]] if perm is not None else col_weight[c:c + glen]
                        params = fmt.fit_group(cur, cw, layer)
                        group_params.append(params)
                    if not static:
                        col_gid[c] = len(group_params) - 1
                    wcol = W1[:, i:i + 1]
                    _, dq = fmt.quantize(wcol, params, layer)
                    Q1[:, i:i + 1] = dq
                    err = (wcol - dq) / U1[i, i]
                    W1[:, i:] -= err @ U1[i:i + 1, i:]
                    Err1[:, i:i + 1] = err
                W[:, i1:i2] = Q1
                W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            # the factor (U1, a view, would keep all of U alive; a shared factor stays in stats.cache for the
            # next linear); W now holds Q
            Q = W
            del W, U, U1, W1, Q1, Err1
            _trim(dev)

            if static:
                col_gid = torch.tensor(col_group, dtype=torch.long)
            g_idx = None
            if perm is not None:
                inv = torch.argsort(perm)
                Q = Q[:, inv]
                col_gid = col_gid[inv.cpu()]
                if not static:
                    g_idx = col_gid.to(dev)
            if not all_finite(Q):
                raise NumericalError("GPTQ produced non-finite weights (NaN/inf in the weight or Hessian)")
            codes = torch.empty(rows, cols, dtype=torch.int32, device=dev)
            order = torch.argsort(col_gid, stable=True)
            bounds = torch.searchsorted(col_gid[order], torch.arange(len(group_params) + 1)).tolist()
            for gi, p in enumerate(group_params):
                idx = order[bounds[gi]:bounds[gi + 1]].to(dev)
                if idx.numel():
                    codes[:, idx], Q[:, idx] = fmt.quantize(Q[:, idx], p, layer)
            packed = fmt.pack(codes, layer, group_params, g_idx)
            del codes
        finally:
            if spill is not None:  # the Hessian back, bit for bit (also when the solve failed); parked: to disk
                spill.done()
        _trim(w.device)  # packing's freed pieces, before the output error reads the Hessian
        if stats.hessian_parked:
            # park_hessian's Hessian stays out of memory after this linear (its QuantLinear is built next, and
            # the statistics are then released): the output error reads a copy that goes with it
            metrics = output_error(w, Q, LayerStats(stats.nsamples, stats.hessian_store.read()))
        else:
            metrics = output_error(w, Q, stats)
        metrics["damp"] = used_damp
        return QuantResult(packed, Q, metrics)

    def _factor(self, stats: LayerStats, spill: _HessianSpill | None = None):
        """What GPTQ derives from the Hessian alone: dead columns, column weights, the act-order
        permutation and the upper Cholesky factor of the permuted, dampened inverse. With ``spill``,
        ``stats.hessian`` goes to disk before its scaled copy is made, which is then read from the file
        (also for a damping retry)."""
        nsamples = stats.nsamples
        # diag(h / n), value for value: the dead columns, the column weights and the act-order come from it
        col_weight = torch.diagonal(stats.hessian).float().div(nsamples)
        dead = col_weight == 0
        col_weight[dead] = 1
        perm = torch.argsort(col_weight, descending=True) if self.cfg.act_order else None

        def scaled() -> torch.Tensor:  # H / n in act-order, a new matrix the factor overwrites
            if spill is not None:
                # the Hessian to disk first, the scaled copy then built from the file's rows (the same values
                # bit for bit): never both n x n matrices in memory; from here on only the output error
                # reads it back. Where the file could not be written, from memory as before.
                spill.out()
            src = spill if spill is not None and spill.spilled() else stats.hessian
            H = _scaled_hessian(src, nsamples, perm, dead)
            del src
            if not all_finite(H):
                raise NumericalError("the Hessian holds NaN/inf: the calibration activations are not finite")
            return H

        # no reference to H kept here: the factor reverses it in place and frees it before U is made
        U, used_damp = _inverse_factor(scaled, self.cfg.damp, self.cfg.damp_retries)
        return dead, col_weight, perm, U, used_damp

    def _fast_block(self, W: torch.Tensor, fmt, group_params: list, col_group: list[int]):
        """The Triton inner loop, for affine (scale/zero) grids with static params on CUDA."""
        if not (W.is_cuda or self.cfg.triton == "always") or self.cfg.triton == "never":
            return None
        maxq = fmt.affine_maxq()
        if maxq is None:
            return None
        try:
            from ._gptq_triton import gptq_block
        except ImportError:
            return None
        gid = torch.tensor(col_group, device=W.device)
        S = torch.cat([p["scale"] for p in group_params], 1)[:, gid].float()
        Z = torch.cat([p["zero"] for p in group_params], 1)[:, gid].float()

        def run(W1, U1, i1, i2):
            return gptq_block(W1, U1, S[:, i1:i2], Z[:, i1:i2], maxq)
        return run


__all__ = ["GPTQ", "GPTQConfig", "inverse_hessian_factor", "park_hessian"]
