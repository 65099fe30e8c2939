"""Sensitivity-weighted 1-D k-means, for every row of a matrix at once.

For each row (one output channel) find ``k = 2**wbits`` centroids ``c`` that
minimise ``sum_j F_j (w_j - c(w_j))**2``. In one dimension the clusters of any
Lloyd-stable solution are contiguous intervals of the sorted row. So after one
sort per row and prefix sums of ``F``, ``F·w`` and ``F·w²``, a cluster's weight,
mean and weighted SSE are O(1) differences.

``optimal_kmeans`` (the quantizer's default, ``cluster`` picks by config) finds the
exact optimum with a dynamic program over those prefix sums
(``kernels/kmeans_dp.cpp``). ``weighted_kmeans`` is the faster-to-set-up batched
heuristic (torch code, so it also runs on a GPU) working on the ``k + 1`` interval
edges of each row instead of its ``n`` points:

1. **Divisive seeding** — start from one cluster and, in rounds, split the
   clusters whose best two-way split (found by a 2-means Lloyd on the interval,
   O(log n)) lowers the SSE most.
2. **Lloyd** — midpoints between centroids, a ``searchsorted`` for the new edges,
   new means: O(k log n) per row and iteration. Rows that have settled leave the
   working set.
3. **Merge-split moves** — Lloyd stops in local optima where one cluster is
   wasted on a region that needs none while another region needs two. Merging
   the cheapest adjacent pair and splitting the most profitable cluster, when
   that lowers the SSE, escapes them; Lloyd then settles again.

Steps 1-3 run on a coarse copy of each long row: ``BINS`` groups of consecutive
points of the sorted row (half of equal count, half of equal width), each
standing for its points with their exact moments. A partition into whole groups
then has its exact SSE, while the searches and gathers stay small and in cache.
Lloyd on the full row finishes from the best coarse solution, moving the edges
to single points.

All rows move together as tensor code; there is no Python loop over rows. A
second start (the default) is the uniform grid that round-to-nearest uses,
further ones greedy weighted k-means++ seeds; all starts refine together as
extra rows of one batch, and every row keeps its best.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

# Rows are processed in chunks of at most this many elements.
CHUNK_ELEMENTS = 1 << 23
# Groups per row (at least 4k) in the coarse copy where seeding, restarts and moves run.
BINS = 64
# Clusters (the costliest) whose best split a merge-split move considers.
SPLIT_CANDIDATES = 3
TINY = 1e-300


@dataclass
class KMeansResult:
    centroids: Tensor  # (rows, k), ascending per row
    sse: Tensor  # (rows,) weighted sum of squared errors, float64
    x: Tensor = field(repr=False)  # (rows, n) the clustered values

    @cached_property
    def labels(self) -> Tensor:
        """(rows, n) uint8 index of each value's nearest centroid."""
        return assign(self.x, self.centroids)


def weighted_kmeans(
    x: Tensor, weight: Tensor | None, k: int, *, iters: int = 50, restarts: int = 2, seed: int = 0
) -> KMeansResult:
    """Weighted k-means of every row of ``x`` (rows, n) with ``weight`` (rows, n) >= 0.

    ``weight=None`` is plain (unweighted) k-means; negative weights count as zero,
    and a row whose weights are all zero uses uniform weights. ``restarts``: 1 is
    the divisive seed; 2 (the default) adds a start from the uniform
    (round-to-nearest) grid; more add k-means++ seeds. Deterministic for a
    ``seed``. NaN or Inf in ``x`` or ``weight`` raise ``ValueError``.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (rows, n), got shape {tuple(x.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k must be in [2, 256], got {k}")
    x = x.detach()
    weight = torch.ones_like(x) if weight is None else weight.detach()
    if weight.shape != x.shape:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}"
        )
    rows, n = x.shape
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    with torch.inference_mode():
        parts = [
            _kmeans_chunk(x[i : i + step], weight[i : i + step], k, iters, restarts, seed + i)
            for i in range(0, rows, step)
        ]
        centroids, sse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    # plain tensors again, usable with autograd
    return KMeansResult(centroids.clone(), sse.clone(), x)


def cluster(x: Tensor, weight: Tensor | None, config, threads: int | None = None) -> KMeansResult:
    """The ``2**config.wbits`` centroids of every row by the config's k-means
    (``optimal`` or ``fast``); ``threads`` as in ``optimal_kmeans``.
    """
    from .errors import SqlabError

    k = 1 << config.wbits
    if config.kmeans == "optimal":
        try:
            return optimal_kmeans(x, weight, k, threads)
        except SqlabError as exc:
            raise SqlabError(
                f"kmeans='optimal' runs a compiled dynamic program: {exc}; or use "
                "QuantConfig(kmeans='fast') (sqlab quantize --kmeans fast)"
            ) from exc
    return weighted_kmeans(
        x, weight, k, iters=config.kmeans_iters, restarts=config.kmeans_restarts, seed=config.seed
    )


def optimal_kmeans(
    x: Tensor, weight: Tensor | None, k: int, threads: int | None = None
) -> KMeansResult:
    """The exact minimiser of ``sum F (w - c(w))**2`` for every row of ``x`` (rows, n).

    A dynamic program over each sorted row (``kernels/kmeans_dp.cpp``, compiled on first
    use like the CPU LUT-GEMV): optimal, deterministic, and the reference every faster
    heuristic is measured against. Weights as in ``weighted_kmeans``: ``None`` is
    uniform, negatives count as zero, an all-zero row uses uniform weights. A row with
    fewer distinct weighted values than ``k`` repeats its largest as the spare
    centroids. ``threads``: CPU threads for the program (default: torch's count). Raises
    ``SqlabError`` where no C++ compiler is available.
    """
    from .cpu_kernels import KMEANS_SOURCE, library

    if x.ndim != 2:
        raise ValueError(f"x must be (rows, n), got shape {tuple(x.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k must be in [2, 256], got {k}")
    xs = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    fs = (
        None
        if weight is None
        else weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    )
    if fs is not None and fs.shape != xs.shape:
        raise ValueError(f"weight shape {tuple(fs.shape)} differs from x shape {tuple(xs.shape)}")
    rows, n = xs.shape
    centroids = torch.empty(rows, k, dtype=torch.float32)
    sse = torch.empty(rows, dtype=torch.float64)
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    library(source_name=KMEANS_SOURCE).sq_kmeans_dp(
        xs.data_ptr(),
        None if fs is None else fs.data_ptr(),
        rows,
        n,
        k,
        centroids.data_ptr(),
        sse.data_ptr(),
        threads,
    )
    if bool(sse.isnan().any()):  # the program's mark of a row with a value or weight not finite
        raise ValueError("x and weight must be finite")
    return KMeansResult(centroids.to(x.device), sse.to(x.device), x)


@dataclass
class _Row:
    """Sorted rows ``xs`` (rows, m) with prefix sums of their moments.

    ``f01[:, i]`` is the sum of ``F + i·F·x`` over the first ``i`` entries (one
    complex gather reads both), ``f2[:, i]`` that of ``F·x²``; both ``(rows, m + 1)``.
    An entry is a point or, in the coarse copy, a group of points: ``xs`` is then
    the group's mean and the sums are those of its points, so interval statistics
    stay exact.
    """

    xs: Tensor
    f01: Tensor
    f2: Tensor

    def sums(self, lo: Tensor, hi: Tensor, second: bool = False) -> tuple[Tensor, ...]:
        """Sums of ``F``, ``F·x``
        (and with ``second``, ``F·x²``) over each interval ``xs[lo:hi]``.
        """
        m = lo.shape[1]
        idx = torch.cat([lo, hi], 1)
        got = self.f01.gather(1, idx)
        d = got[:, m:] - got[:, :m]
        if not second:
            return d.real, d.imag
        got2 = self.f2.gather(1, idx)
        return d.real, d.imag, got2[:, m:] - got2[:, :m]

    def cost(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Weighted SSE of each interval around its weighted mean."""
        s0, s1, s2 = self.sums(lo, hi, second=True)
        return (s2 - s1.square() / s0.clamp_min(TINY)).clamp_min(0)

    def mean(self, lo: Tensor, hi: Tensor, empty: Tensor) -> Tensor:
        """Weighted mean of each interval; ``empty`` where the interval has no weight."""
        s0, s1 = self.sums(lo, hi)
        return torch.where(s0 > 0, s1 / s0.clamp_min(TINY), empty)

    def sse(self, c: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Weighted SSE of the intervals around the given centroids ``c``, summed per row."""
        s0, s1, s2 = self.sums(lo, hi, second=True)
        return (s2 - 2 * c * s1 + c * c * s0).sum(1).clamp_min(0)

    def edges(self, c: Tensor) -> Tensor:
        """Interval edges ``(rows, k + 1)`` of the clusters of ascending centroids ``c``."""
        mid = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        pos = torch.searchsorted(self.xs, mid, right=True)
        rows, m = self.xs.shape
        return torch.cat([pos.new_zeros(rows, 1), pos, pos.new_full((rows, 1), m)], 1)

    def select(self, keep: Tensor, f2: bool = True) -> "_Row":
        """The rows ``keep``; without ``f2`` (enough for Lloyd), copying a third less."""
        return _Row(self.xs[keep], self.f01[keep], self.f2[keep] if f2 else self.f2[:0])


def _kmeans_chunk(
    x: Tensor, weight: Tensor, k: int, iters: int, restarts: int, seed: int
) -> tuple[Tensor, Tensor]:
    data, shift, total = _prepare(x, weight)
    rows, n = data.xs.shape
    bins = max(BINS, 4 * k)
    coarse = _coarse(data, bins) if n > 2 * bins else data
    # every start refines as extra rows of one batch, so more starts cost data, not steps
    starts = [_divisive(coarse, k)]
    if restarts > 1:  # the uniform grid that round-to-nearest would use
        lo, hi = data.xs[:, :1], data.xs[:, -1:]
        starts.append(lo + (hi - lo) * (torch.arange(k, device=x.device) + 0.5) / k)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    starts += [_kmeans_plus_plus(coarse, k, gen) for _ in range(2, restarts)]
    batch = (
        coarse
        if len(starts) == 1
        else coarse.select(torch.arange(rows, device=x.device).repeat(len(starts)))
    )
    c = _refine(batch, torch.cat(starts), iters)
    sse = batch.sse(c, *_bounds(batch.edges(c))).view(len(starts), rows)
    best_c = c.view(len(starts), rows, k)[sse.argmin(0), torch.arange(rows, device=x.device)]
    if coarse is not data:
        best_c = _lloyd(data, best_c, iters)
    centroids = (best_c + shift).to(x.dtype)
    # the SSE of the returned centroids, in the caller's weights (uniform for rows that had none)
    sse = data.sse(centroids.double() - shift, *_bounds(data.edges(best_c))) * total[:, 0]
    return centroids, sse


def _prepare(x: Tensor, weight: Tensor) -> tuple[_Row, Tensor, Tensor]:
    """Sorted, centred rows with their prefix sums;
    the centring shift and each row's weight total.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xs, fs = _sort_rows(x.to(dtype), weight.to(dtype))
    rows, n = xs.shape
    # NaN sorts to an end of its row and makes the weight sum NaN: both checks are O(rows)
    if not torch.isfinite(xs[:, [0, -1]]).all():
        raise ValueError("x contains NaN or Inf")
    fs.clamp_min_(0)
    total = fs.sum(1, keepdim=True, dtype=torch.float64)
    if not torch.isfinite(total).all():
        raise ValueError("weight contains NaN or Inf")
    if (total <= 0).any():  # no weight: uniform weights
        fs[(total <= 0)[:, 0]] = 1.0
        total = fs.sum(1, keepdim=True, dtype=torch.float64)
    # fp64 sums: Fisher weights span many decades, and in fp32 the prefix sums of a cluster
    # of tiny weights lose their mean to cancellation. Weights are normalised per row, and
    # values centred on the row's median to keep the sums well conditioned.
    shift = xs[:, n // 2 : n // 2 + 1].double()
    xc = xs - shift
    f01 = xc.new_empty(rows, n + 1, 2)
    f01[:, 0] = 0
    torch.div(fs, total, out=f01[:, 1:, 0])
    torch.mul(f01[:, 1:, 0], xc, out=f01[:, 1:, 1])
    f2 = xc.new_empty(rows, n + 1)
    f2[:, 0] = 0
    torch.mul(f01[:, 1:, 1], xc, out=f2[:, 1:])
    f01.cumsum_(1)
    f2.cumsum_(1)
    return _Row(xc, torch.view_as_complex(f01), f2), shift, total


def _sort_rows(x: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``x`` (rows, n) in ascending order, and ``f`` permuted alike."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or sys.byteorder != "little":
        xs, order = x.sort(1)
        return xs, f.gather(1, order)
    # One int64 sort carries both, several times faster than an argsort on CPU: the high
    # word is x's bit pattern made monotone as a signed integer, the low word f's bits.
    xb = x.contiguous().numpy().view(np.int32)
    key = np.empty(xb.shape, np.int64)
    words = key.view(np.int32).reshape(*xb.shape, 2)  # little-endian: (low, high)
    flip = xb >> 31  # negative floats: flip the magnitude bits (the map is its own inverse)
    flip &= 0x7FFFFFFF
    np.bitwise_xor(xb, flip, out=words[..., 1])
    words[..., 0] = f.contiguous().numpy().view(np.int32)
    key.sort(axis=1)
    high = words[..., 1]
    np.right_shift(high, 31, out=flip)
    flip &= 0x7FFFFFFF
    flip ^= high
    return torch.from_numpy(flip.view(np.float32)), torch.from_numpy(words[..., 0].view(np.float32))


def _coarse(data: _Row, bins: int) -> _Row:
    """The rows in ``bins`` groups of consecutive points: half of equal count, half of equal width.

    Equal-count groups resolve the dense middle of a row, equal-width ones its
    sparse tails; a group may be empty.
    """
    xs = data.xs
    rows, n = xs.shape
    half = bins // 2
    by_count = (torch.arange(1, half, device=xs.device) * n // half).expand(rows, -1)
    lo_x, hi_x = xs[:, :1], xs[:, -1:]
    steps = torch.arange(1, bins - half + 1, device=xs.device) / (bins - half + 1)
    by_width = torch.searchsorted(xs, (lo_x + (hi_x - lo_x) * steps).contiguous())
    pos = torch.cat(
        [by_count.new_zeros(rows, 1), by_count, by_width, by_count.new_full((rows, 1), n)], 1
    )
    pos = pos.sort(1).values
    f01, f2 = data.f01.gather(1, pos), data.f2.gather(1, pos)
    lo, hi = _bounds(pos)
    first = xs.gather(1, lo.clamp_max(n - 1))
    last = torch.where(hi > lo, xs.gather(1, (hi - 1).clamp_min(0)), first)
    # a group without weight sits at the middle of its range, so the means stay sorted
    mean = data.mean(lo, hi, (first + last) * 0.5)
    return _Row(torch.minimum(torch.maximum(mean, first), last).contiguous(), f01, f2)


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (ascending ``centroids``) for every entry of ``x``.

    An entry's index is the number of midpoints between neighbouring centroids that lie
    below it (a tie goes to the lower centroid): one comparison pass per midpoint, which
    for 7 or 15 midpoints beats a binary search per entry.
    """
    if _compiled_assign_fits(x, centroids):
        from .cpu_kernels import KMEANS_SOURCE, library

        labels = torch.empty(x.shape, dtype=torch.uint8)
        library(source_name=KMEANS_SOURCE).sq_assign(
            x.data_ptr(),
            centroids.data_ptr(),
            *x.shape,
            centroids.shape[1],
            labels.data_ptr(),
            torch.get_num_threads(),
        )
        return labels
    mid = ((centroids[:, 1:] + centroids[:, :-1]) / 2).to(x.dtype)  # (rows, k - 1)
    labels = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    above = torch.empty(x.shape, dtype=torch.bool, device=x.device)  # one buffer for every pass
    for b in range(mid.shape[1]):
        labels.add_(torch.gt(x, mid[:, b : b + 1], out=above))
    return labels


def _compiled_assign_fits(x: Tensor, centroids: Tensor) -> bool:
    """Whether ``assign`` can run as one pass of the compiled program (``kernels/kmeans_dp.cpp``,
    the same comparisons): contiguous float32 rows on the CPU, and the program built."""
    from .cpu_kernels import KMEANS_SOURCE, ready

    return (
        x.device.type == "cpu"
        and x.dtype == centroids.dtype == torch.float32
        and x.ndim == centroids.ndim == 2
        and x.is_contiguous()
        and centroids.is_contiguous()
        and len(x) == len(centroids)
        and 2 <= centroids.shape[1] <= 256
        and ready(KMEANS_SOURCE)
    )


def _bounds(edges: Tensor) -> tuple[Tensor, Tensor]:
    return edges[:, :-1], edges[:, 1:]


def _two_split(data: _Row, lo: Tensor, hi: Tensor, iters: int = 2) -> Tensor:
    """Split point (``lo < split < hi`` where ``hi - lo >= 2``) of a 2-means Lloyd in each interval.

    ``lo``, ``hi``: (rows, c) interval bounds; returns (rows, c).
    """

    def inside(split: Tensor) -> Tensor:  # keep at least one point on each side
        return torch.minimum(torch.maximum(torch.minimum(split, hi - 1), lo + 1), hi)

    count = lo.shape[1]
    centre = data.mean(lo, hi, data.xs.gather(1, lo.clamp_max(data.xs.shape[1] - 1)))  # (rows, c)
    split = inside(torch.searchsorted(data.xs, centre.contiguous(), right=True))  # (rows, c)
    for _ in range(iters):
        weight, moment = data.sums(
            torch.cat([lo, split], 1), torch.cat([split, hi], 1)
        )  # (rows, 2c) each
        means = moment / weight.clamp_min(TINY)  # (rows, 2c): left halves, then right halves
        midpoint = (means[:, :count] + means[:, count:]) * 0.5  # (rows, c)
        split = inside(torch.searchsorted(data.xs, midpoint.contiguous(), right=True))
    return split


def _split_gains(data: _Row, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """For every interval: its best two-way split point and the SSE that split saves
    (both (rows, c)).
    """
    count = lo.shape[1]
    split = _two_split(data, lo, hi)  # (rows, c)
    cost = data.cost(
        torch.cat([lo, lo, split], 1), torch.cat([hi, split, hi], 1)
    )  # (rows, 3c): whole, left, right
    gain = cost[:, :count] - cost[:, count : 2 * count] - cost[:, 2 * count :]  # (rows, c)
    return split, torch.where(hi - lo >= 2, gain, -1.0)


def _interval_means(data: _Row, edges: Tensor) -> Tensor:
    """Means of the intervals; one without weight sits at the middle of its range."""
    lo, hi = _bounds(edges)
    m = data.xs.shape[1]
    first = data.xs.gather(1, lo.clamp_max(m - 1))
    last = data.xs.gather(1, (hi - 1).clamp(0, m - 1))
    return data.mean(lo, hi, (first + last) * 0.5)


def _divisive(data: _Row, k: int) -> Tensor:
    """Seed by splitting the clusters whose best two-way split saves the most SSE.

    Each round splits the better half of the clusters (never more than ``k``
    allows), so ``k`` clusters take about ``2 log2 k`` rounds rather than ``k - 1``
    single splits, at nearly the same result.
    """
    rows, n = data.xs.shape
    device = data.xs.device
    edges = torch.stack(
        [torch.zeros(rows, dtype=torch.long, device=device), torch.full((rows,), n, device=device)],
        1,
    )
    while edges.shape[1] - 1 < k:
        count = edges.shape[1] - 1
        r = min((count + 1) // 2, k - count)
        p, gain = _split_gains(data, *_bounds(edges))
        top = gain.topk(r, 1).indices
        edges = torch.cat([edges, p.gather(1, top)], 1).sort(1).values
    return _interval_means(data, edges)


def _lloyd(data: _Row, centroids: Tensor, iters: int) -> Tensor:
    """Lloyd iterations until the partition stops changing (per row); (rows, k) in and out.

    Rows whose partition is stable drop out of the working set, so the many rows
    that settle in a few steps don't pay for the few that take fifty. A cluster
    left without weight keeps its centroid, which stays between its neighbours.
    """
    centroids = centroids.clone()
    active = torch.arange(data.xs.shape[0], device=centroids.device)  # rows of the working set
    part, current, previous = data, centroids, None
    for _ in range(iters):
        edges = part.edges(current)  # (a, k + 1)
        if previous is not None:
            moving = (edges != previous).any(1)  # (a,)
            count = int(moving.sum())
            if count == 0:
                break
            if count < moving.shape[0] // 2:  # compact the working set
                centroids[active] = current
                keep = moving.nonzero().squeeze(1)
                active, current, edges = active[keep], current[keep], edges[keep]
                part = part.select(keep, f2=False)
        current = part.mean(*_bounds(edges), current)  # means of ordered intervals are ordered
        previous = edges
    centroids[active] = current
    return centroids


def _refine(data: _Row, centroids: Tensor, iters: int, moves: int = 4) -> Tensor:
    """Lloyd, then merge-split moves while they pay, each followed by Lloyd again.

    ``centroids``: (rows, k) starts; returns (rows, k). A row whose move did not pay is
    left as it is: the next round would find the same.
    """
    centroids = _lloyd(data, centroids, iters)
    k = centroids.shape[1]
    rows = torch.arange(centroids.shape[0], device=centroids.device)  # the rows still moving
    part = data
    for _ in range(moves if k > 2 else 0):  # with two clusters there is nothing else to split
        edges = part.edges(centroids[rows])  # (r, k + 1)
        lo, hi = _bounds(edges)  # (r, k) each
        cost = part.cost(lo, hi)  # (r, k)
        # the cheapest merge of two neighbours ...
        merge_cost = part.cost(lo[:, :-1], hi[:, 1:]) - cost[:, :-1] - cost[:, 1:]  # (r, k - 1)
        merge_at = merge_cost.argmin(
            1, keepdim=True
        )  # (r, 1): merges clusters merge_at, merge_at + 1
        # ... paid for by the best split of a cluster not involved in it; the best split
        # is nearly always found among the costliest few clusters
        cluster = torch.arange(k, device=centroids.device)[None, :]
        others = torch.where(
            (cluster == merge_at) | (cluster == merge_at + 1), -1.0, cost
        )  # (r, k)
        pool = others.topk(min(SPLIT_CANDIDATES, k - 2), 1).indices  # (r, candidates)
        split, gain = _split_gains(
            part, lo.gather(1, pool), hi.gather(1, pool)
        )  # (r, candidates) each
        best = gain.argmax(1, keepdim=True)  # (r, 1)
        pays = (
            gain.gather(1, best)[:, 0] > merge_cost.gather(1, merge_at)[:, 0] * (1 + 1e-12) + 1e-18
        )
        keep = pays.nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        # new edges: drop the edge between the merged pair, add the split point
        drop = torch.ones_like(edges, dtype=torch.bool).scatter(1, merge_at + 1, False)
        moved = (
            torch.cat([edges[drop].reshape(edges.shape[0], k), split.gather(1, best)], 1)[keep]
            .sort(1)
            .values
        )
        rows, part = rows[keep], part.select(keep)
        centroids[rows] = _lloyd(part, _interval_means(part, moved), iters)
    return centroids


def _kmeans_plus_plus(data: _Row, k: int, gen: torch.Generator, candidates: int = 3) -> Tensor:
    """Greedy weighted k-means++ seeding, for all rows at once (in fp32: it only seeds).

    Each new centre is the best (lowest total weighted squared distance) of a few
    candidates drawn with probability proportional to ``F · D²``.
    """
    x = data.xs.float()
    f = (data.f01[:, 1:] - data.f01[:, :-1]).real.float().clamp_min(0)
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
    return torch.cat(centres, 1).to(data.xs.dtype).sort(1).values
