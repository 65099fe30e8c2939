"""``QuantConfig``: every knob of a quantization run, validated where it enters."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from .errors import SqlabError

WBITS = (3, 4)
METHODS = ("squeezellm", "rtn", "gptq")
# the fields each method reads (besides wbits); the rest cannot change its result
METHOD_FIELDS = {
    "squeezellm": ("outlier_pct", "sensitive_pct", "outlier_range", "weighted", "calib", "nsamples", "seqlen",
                   "seed", "kmeans", "kmeans_iters", "kmeans_restarts"),
    "rtn": ("groupsize",),
    "gptq": ("groupsize", "act_order", "percdamp", "calib", "nsamples", "seqlen", "seed"),
}
# bumped when a method's results change for the same settings, so caches keyed by
# settings do not serve results of the older code
METHOD_VERSIONS = {"squeezellm": 3, "rtn": 1, "gptq": 1}
KMEANS = ("optimal", "fast")  # the exact dynamic program, or the faster batched heuristic


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantization: SqueezeLLM (the default) or a baseline.

    ``method`` is ``squeezellm``, ``rtn`` (round-to-nearest) or ``gptq``.
    ``outlier_pct`` is the share of all quantizable weights (in percent, model-wide)
    kept in full precision as outliers; the IQR range ``r`` that yields it is
    solved for. Give ``outlier_range`` instead to fix ``r`` by hand.
    ``sensitive_pct`` is the share of each matrix (in percent) kept because its
    Fisher information is highest. ``weighted=False`` runs plain k-means (the
    paper's ablation without sensitivity weighting). The baselines take
    ``groupsize`` (``None``: one scale per output channel), and GPTQ
    ``act_order`` and ``percdamp`` (dampening, a fraction of the Hessian's mean
    diagonal). ``kmeans`` picks the clustering: ``optimal`` (the default) is the
    exact minimiser of the weighted objective per row; ``fast`` the batched
    heuristic (``kmeans_iters``, ``kmeans_restarts``), which needs no C++ compiler.
    """

    wbits: int = 3
    method: str = "squeezellm"
    outlier_pct: float = 0.0
    sensitive_pct: float = 0.0
    outlier_range: float | None = None
    weighted: bool = True
    calib: str = "shakespeare"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0
    kmeans: str = "optimal"
    kmeans_iters: int = 50
    kmeans_restarts: int = 2
    groupsize: int | None = None
    act_order: bool = False
    percdamp: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise SqlabError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.wbits, bool) or not isinstance(self.wbits, int) \
                or self.wbits not in WBITS:
            raise SqlabError(f"wbits must be 3 or 4 (an integer), got {self.wbits!r}")
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
        if self.kmeans not in KMEANS:
            raise SqlabError(f"kmeans must be one of {', '.join(KMEANS)}, got {self.kmeans!r}")
        if not isinstance(self.weighted, bool):
            raise SqlabError(f"weighted must be True or False, got {self.weighted!r}")
        for name, low in (("nsamples", 1), ("seqlen", 2), ("kmeans_iters", 1), ("kmeans_restarts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SqlabError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.method != "squeezellm" and (self.outlier_pct or self.sensitive_pct or self.outlier_range is not None):
            raise SqlabError(f"outlier_pct, sensitive_pct and outlier_range are SqueezeLLM settings; "
                             f"method {self.method!r} keeps no sparse part")
        if self.groupsize is not None:
            if isinstance(self.groupsize, bool) or not isinstance(self.groupsize, int) or self.groupsize < 1:
                raise SqlabError(f"groupsize must be a positive integer or None (per channel), got {self.groupsize!r}")
            if self.method == "squeezellm":
                raise SqlabError("groupsize is a setting of the rtn and gptq baselines; SqueezeLLM uses one "
                                 "look-up table per output channel")
        if not isinstance(self.act_order, bool):
            raise SqlabError(f"act_order must be True or False, got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise SqlabError(f"act_order is a GPTQ setting; method {self.method!r} does not use it")
        if not isinstance(self.percdamp, (int, float)) or isinstance(self.percdamp, bool) or \
                not 0 < self.percdamp < 1:
            raise SqlabError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
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

    @classmethod
    def for_method(cls, method: str, wbits: int, **settings) -> "QuantConfig":
        """A config for ``method``, keeping only the ``settings`` that method reads."""
        keep = set(METHOD_FIELDS.get(method, ())) | {"kmeans", "kmeans_iters", "kmeans_restarts"}
        return cls(method=method, wbits=wbits, **{k: v for k, v in settings.items() if k in keep})

    def relevant(self) -> dict:
        """The settings this config's method actually reads."""
        return {"method": self.method, "wbits": self.wbits,
                **{name: getattr(self, name) for name in METHOD_FIELDS[self.method]}}

    def key(self, *extra) -> str:
        """A content hash of the relevant settings (and any extra parts) for cache keys.

        Settings the method does not read leave the key unchanged.
        """
        payload = json.dumps([self.relevant(), METHOD_VERSIONS[self.method], *extra], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human-readable name, e.g. ``SqueezeLLM 3-bit 0.45%+0.05%`` or ``GPTQ 4-bit g128``."""
        if self.method == "squeezellm":
            if self.outlier_range is not None:
                sparse = f" r={self.outlier_range:g}+{self.sensitive_pct:g}%"
            else:
                sparse = f" {self.outlier_pct:g}%+{self.sensitive_pct:g}%" if self.sparse else " dense"
            return f"SqueezeLLM {self.wbits}-bit{sparse}{'' if self.weighted else ' unweighted'}"
        group = f" g{self.groupsize}" if self.groupsize else " per-channel"
        order = " act-order" if self.method == "gptq" and self.act_order else ""
        return f"{self.method.upper()} {self.wbits}-bit{group}{order}"
