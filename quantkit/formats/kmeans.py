"""Weighted 1-D k-means per row, for the learned tables of :mod:`quantkit.formats.lut` (any4/any3/any2).

:func:`weighted_kmeans_1d` starts from the dynamic-programming optimum over a few cut points of the
sorted row (:func:`kmeans_dp_1d`) and refines it with Lloyd's algorithm; :func:`nearest_index` is the
rounding to the nearest table value that the lut format uses too. Own code (Ckmeans.1d.dp, Wang &
Song 2011, was read for the recurrence).
"""

from __future__ import annotations

import torch


def nearest_index(x: torch.Tensor, sorted_vals: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value in ``sorted_vals`` ([R, K] ascending, or [1, K] for all rows) for
    each element of ``x`` [R, n]; a value exactly at a midpoint goes to the lower entry."""
    bounds = (sorted_vals[:, 1:] + sorted_vals[:, :-1]) * 0.5
    if bounds.shape[0] == 1:
        return torch.bucketize(x, bounds[0].contiguous())
    return torch.searchsorted(bounds.contiguous(), x.contiguous())


def weighted_sse(x: torch.Tensor, sw: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Per-row sum of sw * (x - nearest center)^2; centers [R, K] ascending."""
    idx = nearest_index(x, centers)
    return (sw * (x - centers.gather(1, idx)).pow(2)).sum(1)


def _lloyd(x: torch.Tensor, sw: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's iterations on 1-D data. The values are sorted once, so a cluster is a run of the sorted
    row and its sums are differences of float64 prefix sums: the same result on every device and run
    (``scatter_add`` on a GPU adds in whatever order its atomics land), and no per-element pass."""
    R, k = c.shape
    xs, order = x.sort(1)
    ws = sw.gather(1, order)
    zero = torch.zeros(R, 1, dtype=torch.float64, device=x.device)
    cw = torch.cat([zero, ws.double().cumsum(1)], 1)  # [R, N + 1]
    cs = torch.cat([zero, (ws.double() * xs.double()).cumsum(1)], 1)
    prev = None
    for _ in range(iters):
        c = c.sort(1).values
        # elements <= the midpoint after center j belong to clusters 0..j (a midpoint goes to the lower)
        bounds = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        ends = torch.searchsorted(xs, bounds, right=True)
        ends = torch.cat([ends, torch.full((R, 1), xs.shape[1], dtype=ends.dtype, device=x.device)], 1)
        starts = torch.cat([torch.zeros(R, 1, dtype=ends.dtype, device=x.device), ends[:, :-1]], 1)
        den = cw.gather(1, ends) - cw.gather(1, starts)
        num = cs.gather(1, ends) - cs.gather(1, starts)
        newc = torch.where(den > 0, num / den.clamp_min(1e-300), c.double()).float()
        empty = den == 0
        if empty.any():
            # re-seed one empty cluster per row at the point with the largest weighted error
            a = nearest_index(xs, c)
            err = ws * (xs - c.gather(1, a)).pow(2)
            far = xs.gather(1, err.argmax(1, keepdim=True)).squeeze(1)
            rows = empty.any(1).nonzero().squeeze(1)
            first = empty.to(torch.int8).argmax(1)
            newc[rows, first[rows]] = far[rows]
        elif prev is not None and torch.equal(ends, prev):
            return newc.sort(1).values
        prev = ends
        c = newc
    return c.sort(1).values


def kmeans_dp_1d(x: torch.Tensor, sw: torch.Tensor, k: int, bins: int = 128, band: int | None = None,
                 row_chunk: int = 256) -> torch.Tensor:
    """Near-optimal 1-D weighted k-means by dynamic programming, per row of ``x`` [R, N].

    Optimal 1-D clusters are runs of the sorted values, so D_j(b) = min_a D_{j-1}(a) + cost(a, b)
    (cost = weighted SSE of the run; as in Ckmeans.1d.dp, Wang & Song 2011) finds the optimum.
    To keep it cheap, runs start and end only at ``bins`` + 1 equal-count cut points of the sorted
    row, and a run spans at most ``band`` bins (default 5 * bins / k, at least bins / k + 1). It is
    exact when N <= bins and band >= N. Float64 prefix sums, float32 DP, ``row_chunk`` rows at a
    time. Returns sorted centers [R, k]."""
    R, N = x.shape
    M = min(N, bins)
    kk = min(k, M)
    L = M if band is None and kk * 5 >= M else (band or max(5 * M // kk, -(-M // kk) + 1))
    L = min(L, M)
    dev = x.device
    pos = torch.round(torch.arange(M + 1, dtype=torch.float64) * N / M).long().to(dev)
    # window slot l of cut b is the run start a = b - L + l (slots with a < 0 are invalid)
    A = torch.arange(M + 1, device=dev).unsqueeze(1) - L + torch.arange(L, device=dev).unsqueeze(0)
    valid = A >= 0
    A = A.clamp_min(0)
    out = torch.empty(R, k, dtype=torch.float32, device=dev)
    for r0 in range(0, R, row_chunk):
        xr, swr = x[r0:r0 + row_chunk].double(), sw[r0:r0 + row_chunk].double()
        n = xr.shape[0]
        xs, order = xr.sort(1)
        ws = swr.gather(1, order)
        shift = (ws * xs).sum(1, keepdim=True) / ws.sum(1, keepdim=True)
        xc = xs - shift  # centred: less cancellation in the prefix sums
        zero = torch.zeros(n, 1, dtype=torch.float64, device=dev)
        Wc = torch.cat([zero, ws.cumsum(1)], 1)[:, pos]
        Sc = torch.cat([zero, (ws * xc).cumsum(1)], 1)[:, pos]
        Qc = torch.cat([zero, (ws * xc * xc).cumsum(1)], 1)[:, pos]
        # run sums as differences of float64 prefix sums, then float32 (the DP only adds and compares)
        dw = (Wc.unsqueeze(2) - Wc[:, A]).float()  # [n, b, l]
        ds = (Sc.unsqueeze(2) - Sc[:, A]).float()
        cost = (Qc.unsqueeze(2) - Qc[:, A]).float()
        cost -= ds.square_().div_(dw.clamp_min_(1e-30))
        cost.clamp_min_(0).masked_fill_(~valid, float("inf"))
        del dw, ds
        D = torch.full((n, M + 1), float("inf"), dtype=torch.float32, device=dev)
        D[:, 0] = 0
        pad = torch.full((n, L), float("inf"), dtype=torch.float32, device=dev)
        args = []
        for _ in range(kk):
            # windows of D ending just before each cut b: a view, no copy
            win = torch.cat([pad, D[:, :-1]], 1).unfold(1, L, 1)  # [n, M + 1, L]: D[b - L + l]
            D, li = (cost + win).min(dim=2)
            args.append(li)
        # backtrack the kk runs of each row; a run of zero weight gets its first value as center
        b = torch.full((n,), M, dtype=torch.long, device=dev)
        cents = []
        for j in reversed(range(kk)):
            a = (b - L + args[j].gather(1, b.unsqueeze(1)).squeeze(1)).clamp_min(0)
            w_ = Wc.gather(1, b.unsqueeze(1)) - Wc.gather(1, a.unsqueeze(1))
            s_ = Sc.gather(1, b.unsqueeze(1)) - Sc.gather(1, a.unsqueeze(1))
            first = xc.gather(1, pos[a].clamp(max=N - 1).unsqueeze(1))
            cents.append(torch.where(w_ > 0, s_ / w_.clamp_min(1e-300), first))
            b = a
        c = torch.cat(cents, 1) + shift
        if kk < k:  # fewer cut points than centers: repeat the last center
            c = torch.cat([c, c[:, -1:].expand(-1, k - kk)], 1)
        out[r0:r0 + row_chunk] = c.float().sort(1).values
    return out


def weighted_kmeans_1d(x: torch.Tensor, sw: torch.Tensor, k: int, iters: int = 40, dp_bins: int = 128
                       ) -> torch.Tensor:
    """Per-row weighted k-means of scalars: ``x`` [R, N], sample weights ``sw`` [R, N] (>= 0).

    Returns the sorted centers [R, k] that minimise sum sw * (x - nearest center)^2 per row.
    Start: the dynamic-programming optimum over ``dp_bins`` cut points (:func:`kmeans_dp_1d`;
    exact when N <= dp_bins), or with ``dp_bins`` 0 the weighted quantiles (plain k-means); then
    Lloyd's algorithm, which never increases the error. Rows whose weights are all zero use equal
    weights.
    """
    x = x.float()
    sw = sw.float().expand_as(x).clamp_min(0)
    sw = torch.where(sw.sum(1, keepdim=True) > 0, sw, torch.ones_like(sw))
    R, N = x.shape
    xs, order = x.sort(1)
    cw = sw.gather(1, order).cumsum(1)
    cw = cw / cw[:, -1:]
    targets = ((torch.arange(k, device=x.device, dtype=x.dtype) + 0.5) / k).expand(R, k).contiguous()
    pos = torch.searchsorted(cw, targets).clamp(max=N - 1)
    # the DP start beat the quantile start on every row of a smollm2-135m layer; keep one
    starts = [kmeans_dp_1d(x, sw, k, dp_bins)] if dp_bins else [xs.gather(1, pos)]
    best, best_err = None, None
    for c0 in starts:
        c = _lloyd(x, sw, c0, iters)
        err = weighted_sse(x, sw, c)
        if best is None:
            best, best_err = c, err
        else:
            better = err < best_err
            best = torch.where(better.unsqueeze(1), c, best)
            best_err = torch.where(better, err, best_err)
    return best


__all__ = ["kmeans_dp_1d", "nearest_index", "weighted_kmeans_1d", "weighted_sse"]
