"""Quantization configs: one dataclass per method, validated where it enters.

``SqueezeLLMConfig`` (this workbench's method, also named ``QuantConfig``), and the
baselines ``RTNConfig`` and ``GPTQConfig``. Every field of a config is a setting its
method reads, so a config is its own cache key (``key()``); ``experiments.quantize``
runs each config through the handler registered for its type. ``config_for(method,
wbits, **settings)`` turns a method's name (the command line's ``--method``) into its
config, keeping the settings that method reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import SqlabError

WBITS = (3, 4)
KMEANS = ("optimal", "fast")  # the exact dynamic program, or the faster batched heuristic
SPARSE_FIELDS = ("outlier_pct", "sensitive_pct", "outlier_range")
# settings that belong to one method: given to another on purpose they are an error; the
# calibration settings several methods share are simply not read by those without them
OWN_FIELDS = SPARSE_FIELDS + ("weighted", "kmeans", "groupsize", "act_order", "percdamp")


def check_wbits(wbits) -> int:
    """The one check of a bit width: 3 or 4, an integer."""
    if isinstance(wbits, bool) or not isinstance(wbits, int) or wbits not in WBITS:
        raise SqlabError(f"wbits must be 3 or 4 (an integer), got {wbits!r}")
    return wbits


def _check_int(config, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SqlabError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_bool(config, name: str) -> None:
    if not isinstance(getattr(config, name), bool):
        raise SqlabError(f"{name} must be True or False, got {getattr(config, name)!r}")


def _check_calibration(config) -> None:
    """``calib``, ``nsamples``, ``seqlen``, ``seed``: the methods that calibrate share them."""
    for name, low in (("nsamples", 1), ("seqlen", 2)):
        _check_int(config, name, low)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise SqlabError(f"seed must be an integer, got {config.seed!r}")
    if not isinstance(config.calib, str) or not config.calib:
        raise SqlabError(f"calib must be a corpus name, got {config.calib!r}")


def _check_groupsize(config) -> None:
    g = config.groupsize
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise SqlabError(f"groupsize must be a positive integer or None (per channel), got {g!r}")


@dataclass(frozen=True)
class MethodConfig:
    """What every method's config has: the bit width, a name, a version, a key and a label."""

    wbits: int = 3

    method: ClassVar[str] = ""
    # bumped when a method's results change for the same settings, so caches keyed by
    # settings do not serve results of the older code
    version: ClassVar[int] = 1
    packed: ClassVar[bool] = (
        False  # quantizes into packed SqueezeLinear layers (else reconstructed weights)
    )

    def __post_init__(self):
        check_wbits(self.wbits)
        self.validate()

    def validate(self) -> None:
        """The method's own checks (subclasses)."""

    @property
    def needs_fisher(self) -> bool:
        return False

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def relevant(self) -> dict:
        """The settings this method reads: all of them
        (the name of an older, wider config's view).
        """
        return self.as_dict()

    def key(self, *extra) -> str:
        """A content hash of the settings and the method's version (and any extra parts),
        for cache keys.
        """
        payload = json.dumps([self.as_dict(), self.version, *extra], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def label(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class SqueezeLLMConfig(MethodConfig):
    """SqueezeLLM: sensitivity-weighted non-uniform quantization with a dense-and-sparse split.

    ``outlier_pct`` is the share of all quantizable weights (in percent, model-wide) kept
    in full precision as outliers; the IQR range ``r`` that yields it is solved for. Give
    ``outlier_range`` instead to fix ``r`` by hand. ``sensitive_pct`` is the share of each
    matrix (in percent) kept because its Fisher information is highest.
    ``weighted=False`` runs plain k-means (the paper's ablation without sensitivity
    weighting). ``kmeans`` picks the clustering: ``optimal`` (the default) is the exact
    minimiser of the weighted objective per row; ``fast`` the batched heuristic
    (``kmeans_iters``, ``kmeans_restarts``), which needs no C++ compiler. The Fisher
    information comes from ``nsamples`` windows of ``seqlen`` tokens of ``calib``.
    """

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

    method: ClassVar[str] = "squeezellm"
    version: ClassVar[int] = 4  # 3: the exact k-means; 4: the config written in its own type
    packed: ClassVar[bool] = True

    def validate(self) -> None:
        for name in ("outlier_pct", "sensitive_pct"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < 100
                or not math.isfinite(value)
            ):
                raise SqlabError(f"{name} is a percentage in [0, 100), got {value!r}")
        if self.outlier_pct + self.sensitive_pct >= 100:
            raise SqlabError(
                f"outlier_pct + sensitive_pct must stay below 100, got "
                f"{self.outlier_pct} + {self.sensitive_pct}"
            )
        if self.outlier_range is not None:
            if (
                not isinstance(self.outlier_range, (int, float))
                or not self.outlier_range >= 0
                or not math.isfinite(self.outlier_range)
            ):
                raise SqlabError(
                    f"outlier_range (the IQR range r) must be a finite number >= 0, "
                    f"got {self.outlier_range!r}"
                )
            if self.outlier_pct:
                raise SqlabError(
                    "give outlier_pct (solve for r) or outlier_range (fixed r), not both; "
                    f"got outlier_pct={self.outlier_pct}, outlier_range={self.outlier_range}"
                )
        _check_bool(self, "weighted")
        if self.kmeans not in KMEANS:
            raise SqlabError(f"kmeans must be one of {', '.join(KMEANS)}, got {self.kmeans!r}")
        for name in ("kmeans_iters", "kmeans_restarts"):
            _check_int(self, name, 1)
        _check_calibration(self)

    @property
    def uses_outliers(self) -> bool:
        return self.outlier_pct > 0 or self.outlier_range is not None

    @property
    def sparse(self) -> bool:
        return self.uses_outliers or self.sensitive_pct > 0

    @property
    def needs_fisher(self) -> bool:
        return self.weighted or self.sensitive_pct > 0

    def label(self) -> str:
        """A short name, e.g. ``SqueezeLLM 3-bit 0.45%+0.05%`` or ``SqueezeLLM 4-bit dense``."""
        if self.outlier_range is not None:
            sparse = f" r={self.outlier_range:g}+{self.sensitive_pct:g}%"
        else:
            sparse = f" {self.outlier_pct:g}%+{self.sensitive_pct:g}%" if self.sparse else " dense"
        return (
            f"SqueezeLLM {self.wbits}-bit{sparse}{'' if self.weighted else ' unweighted'}"
            f"{' fast k-means' if self.kmeans == 'fast' else ''}"
        )


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest: min-max per output channel, or in groups of ``groupsize`` inputs."""

    groupsize: int | None = None

    method: ClassVar[str] = "rtn"

    def validate(self) -> None:
        _check_groupsize(self)

    def label(self) -> str:
        return f"RTN {self.wbits}-bit{f' g{self.groupsize}' if self.groupsize else ' per-channel'}"


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ: column by column with the inverse Hessian of calibration inputs.

    ``groupsize`` as RTN's; ``act_order`` quantizes columns by decreasing Hessian
    diagonal; ``percdamp`` dampens the Hessian by that fraction of its mean diagonal.
    """

    groupsize: int | None = None
    act_order: bool = False
    percdamp: float = 0.01
    calib: str = "shakespeare"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0

    method: ClassVar[str] = "gptq"

    def validate(self) -> None:
        _check_groupsize(self)
        _check_bool(self, "act_order")
        if (
            not isinstance(self.percdamp, (int, float))
            or isinstance(self.percdamp, bool)
            or not 0 < self.percdamp < 1
        ):
            raise SqlabError(f"percdamp must be in (0, 1), got {self.percdamp!r}")
        _check_calibration(self)

    def label(self) -> str:
        group = f" g{self.groupsize}" if self.groupsize else " per-channel"
        return f"GPTQ {self.wbits}-bit{group}{' act-order' if self.act_order else ''}"


QuantConfig = SqueezeLLMConfig  # the workbench's method, by its historical name
CONFIGS: dict[str, type[MethodConfig]] = {
    c.method: c for c in (SqueezeLLMConfig, RTNConfig, GPTQConfig)
}
METHODS = tuple(CONFIGS)


def config_type(method: str) -> type[MethodConfig]:
    """The config type of a method's name."""
    if method not in CONFIGS:
        raise SqlabError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return CONFIGS[method]


def config_for(method: str, wbits: int, *, strict: bool = False, **settings) -> MethodConfig:
    """A config for ``method``, keeping the ``settings`` that method reads.

    With ``strict`` (settings a user gave on purpose), a setting that belongs to another
    method (``OWN_FIELDS``: the sparse shares, weighting, k-means, group size, act-order,
    dampening) is an error instead of being left out, unless it has its neutral value
    (0, None, False).
    """
    cls = config_type(method)
    own = {f.name for f in fields(cls)}
    if strict:
        foreign = [
            k
            for k, v in settings.items()
            if k in OWN_FIELDS and k not in own and v not in (0, 0.0, None, False)
        ]
        if foreign:
            why = (
                f"method {method!r} keeps no sparse part"
                if set(foreign) & set(SPARSE_FIELDS)
                else f"method {method!r} reads {', '.join(sorted(own))}"
            )
            raise SqlabError(f"{', '.join(foreign)}: not a setting of {method}; {why}")
    return cls(wbits=wbits, **{k: v for k, v in settings.items() if k in own})


def config_from_dict(values: dict) -> MethodConfig:
    """The config ``as_dict()`` wrote (``method`` names its type; SqueezeLLM when absent)."""
    values = dict(values)
    cls = config_type(values.pop("method", "squeezellm"))
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise SqlabError(
            f"unknown {cls.__name__} fields {sorted(unknown)}; known fields are {sorted(known)}"
        )
    return cls(**values)
