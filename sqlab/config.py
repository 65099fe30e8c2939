"""``QuantConfig``: every knob of a SqueezeLLM run, validated where it enters."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from .errors import SqlabError

WBITS = (3, 4)


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one SqueezeLLM quantization.

    ``outlier_pct`` is the share of all quantizable weights (in percent, model-wide)
    kept in full precision as outliers; the IQR range ``r`` that yields it is
    solved for. Give ``outlier_range`` instead to fix ``r`` by hand.
    ``sensitive_pct`` is the share of each matrix (in percent) kept because its
    Fisher information is highest. ``weighted=False`` runs plain k-means (the
    paper's ablation without sensitivity weighting).
    """

    wbits: int = 3
    outlier_pct: float = 0.0
    sensitive_pct: float = 0.0
    outlier_range: float | None = None
    weighted: bool = True
    calib: str = "shakespeare"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0
    kmeans_iters: int = 50
    kmeans_restarts: int = 2

    def __post_init__(self):
        if isinstance(self.wbits, bool) or self.wbits not in WBITS:
            raise SqlabError(f"wbits must be 3 or 4, got {self.wbits!r}")
        for name in ("outlier_pct", "sensitive_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 100 \
                    or not math.isfinite(value):
                raise SqlabError(f"{name} is a percentage in [0, 100), got {value!r}")
        if self.outlier_pct + self.sensitive_pct >= 100:
            raise SqlabError(f"outlier_pct + sensitive_pct must stay below 100, got "
                             f"{self.outlier_pct} + {self.sensitive_pct}")
        if self.outlier_range is not None:
            if not isinstance(self.outlier_range, (int, float)) or not self.outlier_range >= 0 \
                    or not math.isfinite(self.outlier_range):
                raise SqlabError(f"outlier_range (the IQR range r) must be a finite number >= 0, "
                                 f"got {self.outlier_range!r}")
            if self.outlier_pct:
                raise SqlabError("give outlier_pct (solve for r) or outlier_range (fixed r), not both; "
                                 f"got outlier_pct={self.outlier_pct}, outlier_range={self.outlier_range}")
        if not isinstance(self.weighted, bool):
            raise SqlabError(f"weighted must be True or False, got {self.weighted!r}")
        for name, low in (("nsamples", 1), ("seqlen", 2), ("kmeans_iters", 1), ("kmeans_restarts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SqlabError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SqlabError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.calib, str) or not self.calib:
            raise SqlabError(f"calib must be a corpus name, got {self.calib!r}")

    @property
    def uses_outliers(self) -> bool:
        return self.outlier_pct > 0 or self.outlier_range is not None

    @property
    def sparse(self) -> bool:
        return self.uses_outliers or self.sensitive_pct > 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise SqlabError(f"unknown QuantConfig fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**values)

    def key(self, *extra) -> str:
        """A content hash of the settings (and any extra parts) for cache keys."""
        payload = json.dumps([self.as_dict(), *extra], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
