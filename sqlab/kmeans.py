"""Sensitivity-weighted 1-D k-means, for every row of a matrix at once.

For each row (one output channel) find ``k = 2**wbits`` centroids ``c`` that
minimise ``sum_j F_j (w_j - c(w_j))**2``. In one dimension the clusters of any
Lloyd-stable solution are contiguous intervals of the sorted row. So after one
sort per row and prefix sums of ``F``, ``F·w`` and ``F·w²``, a cluster's weight,
mean and weighted SSE are O(1) differences, and everything below works on the
``k + 1`` interval edges of each row instead of its ``n`` points:

1. **Divisive seeding** — start from one cluster and, ``k - 1`` times, split the
   cluster whose best two-way split (found by a 2-means Lloyd on the interval,
   O(log n) per step) lowers the SSE most.
2. **Lloyd** — midpoints between centroids, a ``searchsorted`` for the new edges,
   new means: O(k log n) per row and iteration. Rows that have settled leave the
   working set.
3. **Merge-split moves** — Lloyd stops in local optima where one cluster is
   wasted on a region that needs none while another region needs two. Merging
   the cheapest adjacent pair and splitting the most profitable cluster, when
   that lowers the SSE, escapes them; Lloyd then settles again.

All rows move together as tensor code; there is no Python loop over rows. A
second restart starts from the uniform grid that round-to-nearest uses, further
ones from greedy weighted k-means++ seeds (O(k n) each); every row keeps its best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Rows are processed in chunks of at most this many elements (per fp64 array).
CHUNK_ELEMENTS = 1 << 23
TINY = 1e-30


@dataclass
class KMeansResult:
    centroids: Tensor  # (rows, k), ascending per row
    labels: Tensor  # (rows, n), uint8 index of each weight's centroid
    sse: Tensor  # (rows,) weighted sum of squared errors, float64


def weighted_kmeans(x: Tensor, weight: Tensor | None, k: int, *, iters: int = 50, restarts: int = 1,
                    seed: int = 0) -> KMeansResult:
    """Weighted k-means of every row of ``x`` (rows, n) with ``weight`` (rows, n) >= 0.

    ``weight=None`` is plain (unweighted) k-means. A row whose weights are all zero
    uses uniform weights. ``restarts``: 1 is the divisive seed; 2 adds Lloyd from
    the uniform (round-to-nearest) grid, so no row ends worse than that; more add
    k-means++ seeds. Deterministic for a ``seed``.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (rows, n), got shape {tuple(x.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k must be in [2, 256], got {k}")
    if weight is None:
        weight = torch.ones_like(x)
    if weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")
    rows, n = x.shape
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    parts = [_kmeans_chunk(x[i : i + step], weight[i : i + step], k, iters, restarts, seed + i)
             for i in range(0, rows, step)]
    return KMeansResult(torch.cat([p.centroids for p in parts]), torch.cat([p.labels for p in parts]),
                        torch.cat([p.sse for p in parts]))


@dataclass
class _Row:
    """A chunk of sorted rows ``xs`` (rows, n) with prefix sums.

    ``prefix[m][:, i]`` is the sum of ``F·x**m`` over the first ``i`` sorted
    entries (``m`` = 0, 1, 2), each ``(rows, n + 1)`` and contiguous: a 2-D gather
    from it is several times faster than one from a stacked 3-D tensor.
    """

    xs: Tensor
    prefix: tuple[Tensor, ...]

    def _sums(self, lo: Tensor, hi: Tensor, moments: int) -> list[Tensor]:
        m = lo.shape[1]
        idx = torch.cat([lo, hi], 1)
        out = []
        for prefix in self.prefix[:moments]:
            got = prefix.gather(1, idx)
            out.append(got[:, m:] - got[:, :m])
        return out

    def cost(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Weighted SSE of the interval ``xs[lo:hi]`` around its weighted mean."""
        s0, s1, s2 = self._sums(lo, hi, 3)
        return (s2 - s1 * s1 / s0.clamp_min(TINY)).clamp_min(0)

    def mean(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Weighted mean of ``xs[lo:hi]``; the midpoint of its range if it has no weight."""
        s0, s1 = self._sums(lo, hi, 2)
        mean = s1 / s0.clamp_min(TINY)
        empty = s0 <= 0
        if empty.any():
            n = self.xs.shape[1]
            mid = (self.xs.gather(1, lo.clamp(0, n - 1)) + self.xs.gather(1, (hi - 1).clamp(0, n - 1))) / 2
            mean = torch.where(empty, mid, mean)
        return mean

    def edges(self, c: Tensor) -> Tensor:
        """Interval edges ``(rows, k + 1)`` of the clusters of ascending centroids ``c``."""
        mid = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        pos = torch.searchsorted(self.xs, mid, right=True)
        rows, n = self.xs.shape
        return torch.cat([pos.new_zeros(rows, 1), pos, pos.new_full((rows, 1), n)], 1)

    def select(self, keep: Tensor, moments: int = 3) -> "_Row":
        return _Row(self.xs[keep], tuple(p[keep] for p in self.prefix[:moments]))


def _kmeans_chunk(x: Tensor, weight: Tensor, k: int, iters: int, restarts: int, seed: int) -> KMeansResult:
    n = x.shape[1]
    # fp64 throughout: Fisher weights span many decades, and in fp32 the prefix sums of a
    # cluster of tiny weights lose their mean to cancellation
    xw = x.to(torch.float64)
    raw = weight.to(torch.float64).clamp_min(0)
    total = raw.sum(1, keepdim=True)
    f = torch.where(total > 0, raw / total.clamp_min(TINY), 1.0 / n)
    # k-means is shift invariant: centring each row keeps the prefix sums well conditioned
    shift = (f * xw).sum(1, keepdim=True)
    xs, order = (xw - shift).sort(1)
    fs = f.gather(1, order)
    fx = fs * xs
    data = _Row(xs, tuple(_prefix_sum(m) for m in (fs, fx, fx * xs)))

    gen = torch.Generator(device=x.device).manual_seed(seed)
    best_c = best_sse = None
    for r in range(restarts):
        if r == 0:
            c = _divisive(data, k)
        elif r == 1:  # the uniform grid that round-to-nearest would use
            c = xs[:, :1] + (xs[:, -1:] - xs[:, :1]) * (torch.arange(k, device=xs.device) + 0.5) / k
        else:
            c = _kmeans_plus_plus(xs, fs, k, gen)
        c = _refine(data, c, iters)
        sse = data.cost(*_bounds(data.edges(c))).sum(1)
        if best_c is None:
            best_c, best_sse = c, sse
        else:
            better = sse < best_sse
            best_c = torch.where(better[:, None], c, best_c)
            best_sse = torch.where(better, sse, best_sse)

    centroids = best_c + shift
    labels = assign(xw, centroids)
    # the SSE in the caller's weights (uniform for rows that had none), in fp64
    err = (xw - centroids.gather(1, labels.long())).square_()
    sse = torch.where(total > 0, raw, 1.0).mul_(err).sum(1)
    return KMeansResult(centroids.to(x.dtype), labels, sse)


def _prefix_sum(values: Tensor) -> Tensor:
    """``(rows, n + 1)`` running sums with a leading zero column."""
    out = values.new_zeros(values.shape[0], values.shape[1] + 1)
    torch.cumsum(values, 1, out=out[:, 1:])
    return out


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (ascending ``centroids``) for every entry of ``x``."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mid.to(x.dtype).contiguous(), x.contiguous()).to(torch.uint8)


def _bounds(edges: Tensor) -> tuple[Tensor, Tensor]:
    return edges[:, :-1], edges[:, 1:]


def _two_split(data: _Row, lo: Tensor, hi: Tensor, iters: int = 2) -> Tensor:
    """Split point ``p`` (``lo < p < hi`` where ``hi - lo >= 2``) of a 2-means Lloyd in each interval."""

    def inside(p: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(torch.minimum(p, hi - 1), lo + 1), hi)

    p = inside(torch.searchsorted(data.xs, data.mean(lo, hi).contiguous(), right=True))
    for _ in range(iters):
        mid = (data.mean(lo, p) + data.mean(p, hi)) / 2
        p = inside(torch.searchsorted(data.xs, mid.contiguous(), right=True))
    return p


def _split_gains(data: _Row, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """For every interval: its best two-way split point and the SSE that split saves."""
    p = _two_split(data, lo, hi)
    gain = data.cost(lo, hi) - data.cost(lo, p) - data.cost(p, hi)
    return p, torch.where(hi - lo >= 2, gain, -1.0)


def _insert(t: Tensor, pos: Tensor, value: Tensor) -> Tensor:
    """Insert ``value`` (rows, 1) at column ``pos`` (rows, 1) of every row of ``t`` (rows, m)."""
    rows, m = t.shape
    col = torch.arange(m + 1, device=t.device)[None, :]
    shifted = t.gather(1, (col - (col > pos).long()).clamp_max(m - 1))
    return torch.where(col == pos, value, shifted)


def _divisive(data: _Row, k: int) -> Tensor:
    """Seed by splitting, ``k - 1`` times, the cluster whose best split saves the most.

    Only the two halves of the cluster just split need new split candidates, so
    each step costs O(log n) per row.
    """
    rows, n = data.xs.shape
    device = data.xs.device
    edges = torch.stack([torch.zeros(rows, dtype=torch.long, device=device),
                         torch.full((rows,), n, device=device)], 1)
    p, gain = _split_gains(data, edges[:, :1], edges[:, 1:])
    for _ in range(k - 1):
        j = gain.argmax(1, keepdim=True)
        edges = _insert(edges, j + 1, p.gather(1, j))
        lo = torch.cat([edges.gather(1, j), edges.gather(1, j + 1)], 1)
        hi = torch.cat([edges.gather(1, j + 1), edges.gather(1, j + 2)], 1)
        p2, g2 = _split_gains(data, lo, hi)
        # cluster j became clusters j and j + 1: replace its candidate by theirs
        p = _insert(p, j + 1, p2[:, 1:]).scatter(1, j, p2[:, :1])
        gain = _insert(gain, j + 1, g2[:, 1:]).scatter(1, j, g2[:, :1])
    return data.mean(*_bounds(edges))


def _lloyd(data: _Row, c: Tensor, iters: int) -> Tensor:
    """Lloyd iterations until the partition stops changing (per row).

    Rows whose partition is stable drop out of the working set, so the many rows
    that settle in a few steps don't pay for the few that take fifty.
    """
    c = c.clone()
    active = torch.arange(data.xs.shape[0], device=c.device)
    part, ca, prev = data, c, None
    for _ in range(iters):
        edges = part.edges(ca)
        if prev is not None:
            moving = (edges != prev).any(1)
            if not moving.any():
                break
            if moving.float().mean() < 0.75:  # compact the working set
                c[active] = ca
                keep = moving.nonzero().squeeze(1)
                active, ca, edges = active[keep], ca[keep], edges[keep]
                part = part.select(keep, moments=2)
        ca = part.mean(*_bounds(edges))  # means of ordered intervals are ordered
        prev = edges
    c[active] = ca
    return c


def _refine(data: _Row, c: Tensor, iters: int, moves: int = 4) -> Tensor:
    """Lloyd, then merge-split moves while they pay, each followed by Lloyd again."""
    c = _lloyd(data, c, iters)
    k = c.shape[1]
    for _ in range(moves):
        edges = data.edges(c)
        lo, hi = _bounds(edges)
        cost = data.cost(lo, hi)
        # the cheapest merge of two neighbours ...
        merged = data.cost(lo[:, :-1], hi[:, 1:]) - cost[:, :-1] - cost[:, 1:]
        m = merged.argmin(1, keepdim=True)
        # ... paid for by the best split of a cluster not involved in it
        p, gain = _split_gains(data, lo, hi)
        j = torch.arange(k, device=c.device)[None, :]
        gain = torch.where((j == m) | (j == m + 1), -1.0, gain)
        s = gain.argmax(1, keepdim=True)
        better = gain.gather(1, s)[:, 0] > merged.gather(1, m)[:, 0] * (1 + 1e-12) + 1e-18
        if not better.any():
            break
        # new edges: drop the edge between the merged pair, add the split point
        drop = torch.ones_like(edges, dtype=torch.bool).scatter(1, m + 1, False)
        moved = torch.cat([edges[drop].reshape(edges.shape[0], k), p.gather(1, s)], 1).sort(1).values
        rows = better.nonzero().squeeze(1)
        new_c = data.select(rows, moments=2).mean(*_bounds(moved[rows])).sort(1).values
        c = c.clone()
        c[rows] = _lloyd(data.select(rows, moments=2), new_c, iters)
    return c


def _kmeans_plus_plus(xs: Tensor, fs: Tensor, k: int, gen: torch.Generator, candidates: int = 3) -> Tensor:
    """Greedy weighted k-means++ seeding, for all rows at once (in fp32: it only seeds).

    Each new centre is the best (lowest total weighted squared distance) of a few
    candidates drawn with probability proportional to ``F · D²``.
    """
    x, f = xs.float(), fs.float()
    rows, n = x.shape
    first = torch.multinomial(f + 1e-30, 1, generator=gen)
    centres = [x.gather(1, first)]
    d2 = (x - centres[0]) ** 2
    for _ in range(1, k):
        cand = torch.multinomial(f * d2 + 1e-30, candidates, replacement=True, generator=gen)
        values = x.gather(1, cand)  # (rows, candidates)
        new_d2 = torch.minimum(d2[:, None, :], (x[:, None, :] - values[:, :, None]).square_())
        best = torch.einsum("rn,rcn->rc", f, new_d2).argmin(1, keepdim=True)
        centres.append(values.gather(1, best))
        d2 = new_d2.gather(1, best[:, :, None].expand(rows, 1, n))[:, 0]
    return torch.cat(centres, 1).to(xs.dtype).sort(1).values
