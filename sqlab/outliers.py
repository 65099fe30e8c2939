"""The dense-and-sparse split: which weights leave the dense matrix for ``S``.

Two kinds of weights go to the sparse matrix, kept in full precision:

* **outliers** — per matrix, ``|w| >= T`` with the IQR threshold
  ``T = max(|q1 - r·IQR|, |q3 + r·IQR|)`` (``q1``, ``q3`` the matrix's quartiles);
  one range ``r`` for the whole model, either given or solved for so that the
  model-wide outlier share meets a requested ``outlier_pct``;
* **sensitive values** — per matrix, the top ``sensitive_pct`` of the remaining
  weights by Fisher information.

The percentages add up: 0.45% outliers + 0.05% sensitive is 0.5% sparse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SqlabError

log = logging.getLogger(__name__)

# When solving for r, a matrix's |w| distribution is summarised by a seeded sample of
# this many entries (fewer entries: all of them); the share the solution gives is then
# counted exactly over every weight.
SAMPLE = 1 << 16


def quartiles(w: Tensor) -> tuple[float, float]:
    """First and third quartiles of all entries
    (``kthvalue``: no size limit, unlike ``quantile``).
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    q1 = flat.kthvalue(max(1, round(0.25 * (n - 1)) + 1)).values.item()
    q3 = flat.kthvalue(max(1, round(0.75 * (n - 1)) + 1)).values.item()
    return q1, q3


def iqr_threshold(q1: float, q3: float, r: float) -> float:
    """``T = max(|q1 - r·IQR|, |q3 + r·IQR|)``."""
    iqr = q3 - q1
    return max(abs(q1 - r * iqr), abs(q3 + r * iqr))


def outlier_mask(w: Tensor, r: float) -> Tensor:
    """Outliers of one matrix at IQR range ``r``: ``|w| >= T``."""
    return w.abs() >= iqr_threshold(*quartiles(w), r)


@dataclass
class _MatrixProfile:
    q1: float
    q3: float
    sorted_abs: Tensor  # ascending |w| (or a sample of it)
    scale: float  # weights each sorted entry stands for


class OutlierProfile:
    """The model's weights summarised for fast questions about the IQR range ``r``.

    Per matrix: its quartiles and the sorted ``|w|`` (a seeded sample of
    ``SAMPLE`` entries for larger matrices), so the outlier share at any ``r`` is
    one ``searchsorted`` per matrix.
    """

    def __init__(self, weights: dict[str, Tensor], *, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.weights = weights  # read again only for exact counts (a lazy mapping works)
        self.matrices: dict[str, _MatrixProfile] = {}
        self.total = 0
        # every matrix's sorted |w| side by side (padded with +inf), so the share at any r is
        # one batched searchsorted; each matrix's row is written in place (one copy in memory)
        self._sorted = torch.full((len(weights), SAMPLE), float("inf"))
        for row, (name, w) in enumerate(weights.items()):
            flat = w.detach().reshape(-1).float().cpu()
            self.total += flat.numel()
            if not torch.isfinite(flat).all():
                raise SqlabError(f"weights of {name} contain NaN or Inf")
            q1, q3 = quartiles(flat)
            scale = 1.0
            if flat.numel() > SAMPLE:
                scale = flat.numel() / SAMPLE
                flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=gen)]
            n = flat.numel()
            torch.sort(flat.abs(), out=(self._sorted[row, :n], torch.empty(n, dtype=torch.long)))
            self.matrices[name] = _MatrixProfile(q1, q3, self._sorted[row, :n], scale)
            del flat, w
        profiles = list(self.matrices.values())
        width = max((m.sorted_abs.numel() for m in profiles), default=0)
        if width < SAMPLE:  # small matrices only: a narrower table
            self._sorted = self._sorted[:, :width].contiguous()
            for row, m in enumerate(profiles):
                m.sorted_abs = self._sorted[row, : m.sorted_abs.numel()]
        self._q = torch.tensor([[m.q1, m.q3] for m in profiles], dtype=torch.float64).reshape(-1, 2)
        self._length = torch.tensor([m.sorted_abs.numel() for m in profiles], dtype=torch.float64)
        self._scale = torch.tensor([m.scale for m in profiles], dtype=torch.float64)
        self._solved: dict[tuple[float, float], float] = {}  # (target, tolerance) -> r
        self._checked: set[tuple[float, float]] = set()  # of those, counted exactly

    def threshold(self, name: str, r: float) -> float:
        m = self.matrices[name]
        return iqr_threshold(m.q1, m.q3, r)

    def count(self, name: str, r: float) -> float:
        """Outliers of one matrix at range ``r`` (estimated from the sample for large matrices)."""
        m = self.matrices[name]
        below = torch.searchsorted(m.sorted_abs, torch.tensor([self.threshold(name, r)])).item()
        return (m.sorted_abs.numel() - below) * m.scale

    def share(self, r: float) -> float:
        """Model-wide outlier percentage at range ``r``
        (every matrix's ``count``, in one search).
        """
        if not self.matrices:
            return 0.0
        q1, q3 = self._q[:, 0], self._q[:, 1]
        iqr = q3 - q1
        t = torch.maximum(
            (q1 - r * iqr).abs(), (q3 + r * iqr).abs()
        ).float()  # iqr_threshold per matrix
        below = torch.searchsorted(self._sorted, t[:, None]).squeeze(1).double()
        return 100.0 * float(((self._length - below) * self._scale).sum()) / self.total

    def exact_count(self, name: str, r: float) -> int:
        """Outliers of one matrix at range ``r``, counted on all its weights."""
        return int((self.weights[name].abs() >= self.threshold(name, r)).sum())

    def exact_share(self, r: float) -> float:
        return 100.0 * sum(self.exact_count(n, r) for n in self.weights) / self.total

    def solve(
        self, outlier_pct: float, tolerance_pct: float = 0.02, *, exact: bool = True
    ) -> float:
        """The range ``r`` whose model-wide outlier share is closest to ``outlier_pct``.

        The share is non-increasing in ``r``; bisection costs one ``searchsorted``
        per matrix and step. Raises if the target is out of reach. ``exact``: count the
        share at ``r`` on every weight and warn if it misses the target by more than
        ``tolerance_pct`` points (``quantize_model`` skips it and checks the share its
        split made, the same count).
        """
        target = float(outlier_pct)
        key = (target, tolerance_pct)
        if key not in self._solved:
            self._solved[key] = self._bisect(target)
        r = self._solved[key]
        if exact and key not in self._checked:  # also after a solve that skipped the count
            check_share(self.exact_share(r), target, r, tolerance_pct)
            self._checked.add(key)
        return r

    def _bisect(self, target: float) -> float:
        if self.share(0.0) < target:
            raise SqlabError(
                f"outlier_pct {target} is out of reach: even r = 0 (T = max(|q1|, |q3|)) makes "
                f"only {self.share(0.0):.3f}% of the weights outliers"
            )
        lo, hi = 0.0, 1.0
        while self.share(hi) > target:
            hi *= 2
            if hi > 1e6:
                raise SqlabError(f"could not find an IQR range r giving {target}% outliers")
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.share(mid) > target else (lo, mid)
        return hi if abs(self.share(hi) - target) <= abs(self.share(lo) - target) else lo

    def by_matrix(self, r: float):
        """Outlier share of every matrix at range ``r``: a DataFrame
        (name, block, module, outlier_pct, threshold).
        """
        import pandas as pd

        from .models import split_name

        rows = []
        for name, w in self.weights.items():
            block, module = split_name(name)
            rows.append(
                {
                    "name": name,
                    "block": block,
                    "module": module,
                    "threshold": self.threshold(name, r),
                    "outlier_pct": 100.0 * self.exact_count(name, r) / w.numel(),
                }
            )
        return pd.DataFrame(rows)


def check_share(got: float, target: float, r: float, tolerance_pct: float = 0.02) -> None:
    """Log the outlier share ``got`` (%) made at range ``r``; warn if it misses ``target`` by
    more than ``tolerance_pct`` points."""
    if abs(got - target) > tolerance_pct:
        log.warning(
            "outlier share %.4f%% at r=%.4f misses the target %.4f%% by more than %.2f points",
            got,
            r,
            target,
            tolerance_pct,
        )
    log.info("IQR range r = %.4f gives %.4f%% outliers (target %.4f%%)", r, got, target)


def sensitive_mask(fisher: Tensor, sensitive_pct: float, exclude: Tensor | None = None) -> Tensor:
    """The top ``sensitive_pct`` percent of a matrix's entries by Fisher, outside ``exclude``."""
    mask = torch.zeros(fisher.shape, dtype=torch.bool, device=fisher.device)
    count = round(sensitive_pct / 100 * fisher.numel())
    if count == 0:
        return mask
    mask.view(-1)[_top_entries(fisher.reshape(-1).float(), count, exclude)] = True
    return mask if exclude is None else mask & ~exclude


def _top_entries(scores: Tensor, count: int, exclude: Tensor | None, stride: int = 64) -> Tensor:
    """Positions of the ``count`` largest ``scores`` (1-D) outside ``exclude``.

    A full ``topk`` over a matrix costs more than a pass that keeps the entries above a
    threshold: every ``stride``-th score estimates one that about twice the needed entries
    pass, and the exact ``topk`` runs over those. If fewer than ``count`` pass (an unlucky
    sample), the full ``topk`` runs instead; either way the result is the same set.
    """
    excluded = exclude.reshape(-1) if exclude is not None else None

    def full() -> Tensor:
        kept = scores if excluded is None else scores.masked_fill(excluded, float("-inf"))
        return kept.topk(count).indices

    wanted = count + (int(excluded.count_nonzero()) if excluded is not None else 0)
    sample = scores[::stride]
    if 4 * wanted >= scores.numel() or sample.numel() < 2:
        return full()
    rank = min(sample.numel(), 2 * wanted // stride + 1)
    threshold = sample.topk(rank).values[-1]
    candidates = (scores >= threshold).nonzero().squeeze(1)
    if excluded is not None:
        candidates = candidates[~excluded[candidates]]
    if candidates.numel() < count:
        return full()
    return candidates[scores[candidates].topk(count).indices]


@dataclass
class SparseSplit:
    """Where one matrix's sparse entries are, and why."""

    mask: Tensor  # (out_features, in_features) bool: entries kept in S
    outliers: int
    sensitive: int


def split(
    weight: Tensor, fisher: Tensor | None, threshold: float | None, sensitive_pct: float
) -> SparseSplit:
    """Choose the sparse entries of one matrix: ``|w| >= threshold``, then top-Fisher values."""
    outliers = (
        weight.abs() >= threshold
        if threshold is not None
        else torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    )
    sensitive = torch.zeros_like(outliers)
    if sensitive_pct > 0:
        if fisher is None:
            raise SqlabError("sensitive_pct > 0 needs the Fisher information")
        sensitive = sensitive_mask(fisher, sensitive_pct, exclude=outliers)
    return SparseSplit(outliers | sensitive, int(outliers.sum()), int(sensitive.sum()))


def overlap(
    weight: Tensor, fisher: Tensor, threshold: float, sensitive_pct: float
) -> dict[str, int]:
    """How many outliers are also among the top ``sensitive_pct`` by Fisher
    (chosen without excluding them).
    """
    out = weight.abs() >= threshold
    sens = sensitive_mask(fisher, sensitive_pct)
    return {
        "outliers": int(out.sum()),
        "sensitive": int(sens.sum()),
        "both": int((out & sens).sum()),
    }
