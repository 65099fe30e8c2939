"""SqueezeLLM, layer by layer: dense-and-sparse split, weighted k-means, packing.

``quantize_model(model, config, fisher)`` replaces every quantizable linear with a
``SqueezeLinear`` (or, with ``simulate=True``, writes the reconstructed weight into
the ordinary ``nn.Linear`` for fast accuracy sweeps). With a ``work_dir`` each
finished decoder block is saved atomically, so an interrupted run started again
skips finished blocks and ends with the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import files, outliers
from .config import MethodConfig, SqueezeLLMConfig
from .errors import SqlabError
from .kmeans import assign, cluster
from .models import block_linears, decoder_blocks, quantizable_linears
from .packing import CSR, correct_sparse, pack, packed_rows, reconstruct, unpack
from .qlinear import SqueezeLinear
from .threads import torch_threads

log = logging.getLogger(__name__)


@dataclass
class QuantizedWeight:
    """One matrix, quantized: indices, a LUT per row, and the sparse part."""

    indices: Tensor  # (out_features, in_features) uint8
    lut: Tensor  # (out_features, 2**wbits) fp16, ascending per row
    csr: CSR | None
    outliers: int = 0
    sensitive: int = 0

    @property
    def wbits(self) -> int:
        return int(math.log2(self.lut.shape[1]))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return reconstruct(self.indices, self.lut, self.csr, dtype)

    def storage_bits(self) -> dict[str, int]:
        """Bits the packed layer stores, from shapes alone: indices, LUT, sparse part
        (rows, cols, vals).
        """
        out_features, in_features = self.indices.shape
        bits = {
            "indices": packed_rows(in_features, self.wbits) * out_features * 32,
            "lut": self.lut.numel() * self.lut.element_size() * 8,
        }
        if self.csr is not None:
            bits["sparse"] = sum(
                t.numel() * t.element_size() * 8
                for t in (self.csr.rows, self.csr.cols, self.csr.vals)
            )
        return bits

    def to_layer(self, bias: Tensor | None, name: str = "") -> SqueezeLinear:
        """The packed ``SqueezeLinear``."""
        layer = SqueezeLinear.from_parts(
            pack(self.indices, self.wbits), self.lut, self.indices.shape[1], self.csr, bias
        )
        layer.name = name
        return layer


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, int]
    outliers: int
    sensitive: int
    weighted_error: float  # sum_j F_j (w_j - w_hat_j)^2
    mse: float  # mean (w - w_hat)^2
    bits: dict[str, int] = field(default_factory=dict)


@dataclass
class QuantReport:
    config: MethodConfig
    outlier_range: float | None
    layers: list[LayerStats]

    @property
    def weights(self) -> int:
        return sum(s.shape[0] * s.shape[1] for s in self.layers)

    @property
    def total_bits(self) -> int:
        return sum(sum(s.bits.values()) for s in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight: indices + LUT + sparse part, over all quantized weights."""
        return self.total_bits / self.weights

    @property
    def size_mb(self) -> float:
        return self.total_bits / 8 / 2**20

    def bits_breakdown(self) -> dict[str, float]:
        """Bits per weight by part
        (indices, lut, sparse for SqueezeLLM; total for the baselines).
        """
        parts: dict[str, float] = {}
        for s in self.layers:
            for part, bits in s.bits.items():
                parts[part] = parts.get(part, 0.0) + bits
        return {part: bits / self.weights for part, bits in parts.items()}

    @property
    def sparse_pct(self) -> float:
        return 100 * sum(s.outliers + s.sensitive for s in self.layers) / self.weights

    @property
    def outlier_pct(self) -> float:
        return 100 * sum(s.outliers for s in self.layers) / self.weights

    def check_outlier_share(self) -> None:
        """Warn if the outliers the split made miss the config's ``outlier_pct`` (where the
        range was solved for it rather than given)."""
        if self.config.uses_outliers and self.config.outlier_range is None:
            outliers.check_share(self.outlier_pct, self.config.outlier_pct, self.outlier_range)

    def as_dict(self) -> dict:
        return {
            "config": self.config.as_dict(),
            "outlier_range": self.outlier_range,
            "bits_per_weight": self.bits_per_weight,
            "size_mb": self.size_mb,
            "outlier_pct": self.outlier_pct,
            "sparse_pct": self.sparse_pct,
            "layers": [asdict(s) for s in self.layers],
        }


def check_finite(name: str, tensor: Tensor, what: str) -> None:
    # a NaN or Inf entry makes the sum NaN or Inf; a sum that is not finite (that entry, or an
    # overflow of finite ones) is then checked entry by entry. One float32 sum costs a tenth
    # of a float64 one and far less than a mask of the whole tensor
    if not math.isfinite(float(tensor.sum(dtype=torch.float32))) and not bool(
        torch.isfinite(tensor).all()
    ):
        raise SqlabError(f"{what} of {name} contain NaN or Inf; cannot quantize it")


def kmeans_weights(weight: Tensor, fisher: Tensor | None, sparse: Tensor, weighted: bool) -> Tensor:
    """Per-weight importance for clustering: Fisher (or 1), zero where the weight went to S.

    A row whose remaining importances are all zero falls back to uniform weights
    over its dense positions.
    """
    importance = (
        fisher.float().clamp_min(0)
        if weighted and fisher is not None
        else torch.ones_like(weight, dtype=torch.float32)
    ).masked_fill_(sparse, 0.0)
    empty = importance.sum(1) <= 0
    if bool(empty.any()):
        importance[empty] = (~sparse[empty]).float()
    return importance


@dataclass
class SplitGroup:
    """Matrices of equal ``in_features`` after the dense-and-sparse split, ready for one
    batched k-means over all their rows."""

    weights: dict[str, Tensor]  # name -> (out_features, in_features)
    splits: dict[str, outliers.SparseSplit]
    points: Tensor  # (rows, in_features) float32: every matrix's rows, stacked in order
    importances: Tensor  # (rows, in_features): their k-means weights (0 at sparse entries)


def split_group(
    weights: dict[str, Tensor],
    fishers: dict[str, Tensor | None],
    config: SqueezeLLMConfig,
    thresholds: dict[str, float | None],
) -> SplitGroup:
    """Step 1 of a group: the sparse entries of every matrix (``thresholds``: the outlier
    thresholds ``T``, ``None`` for none) and the importances its k-means weighs by."""
    splits, importances = {}, []
    for name, w in weights.items():
        splits[name] = outliers.split(
            w, fishers.get(name), thresholds.get(name), config.sensitive_pct
        )
        importances.append(kmeans_weights(w, fishers.get(name), splits[name].mask, config.weighted))
    points = torch.cat([w.float() for w in weights.values()])
    return SplitGroup(weights, splits, points, torch.cat(importances))


def finish_group(group: SplitGroup, centroids: Tensor) -> dict[str, QuantizedWeight]:
    """Step 3 of a group, given its k-means ``centroids`` (rows, 2**wbits): the stored fp16
    LUTs, every weight's index, and the sparse part ``S``."""
    result, start = {}, 0
    for name, w in group.weights.items():
        rows = slice(start, start + w.shape[0])
        start += w.shape[0]
        lut = centroids[rows].to(torch.float16)
        # indices against the stored (fp16) LUT, so the dense part decodes to its nearest entry
        indices = assign(group.points[rows], lut.float())
        split = group.splits[name]
        csr = None
        if split.mask.any():
            r, c = split.mask.nonzero(as_tuple=True)
            idx, csr = correct_sparse(r, c, w[r, c], lut, w.shape[0])
            indices[r, c] = idx.to(torch.uint8)
        result[name] = QuantizedWeight(indices, lut, csr, split.outliers, split.sensitive)
    return result


def _groups(
    weights: dict[str, Tensor], fisher, config: SqueezeLLMConfig, thresholds: dict[str, float]
) -> list[SplitGroup]:
    """One block's matrices, split, in groups of equal ``in_features``."""
    by_width: dict[int, list[str]] = {}
    for name, w in weights.items():
        by_width.setdefault(w.shape[1], []).append(name)
    return [
        split_group(
            {n: weights[n] for n in names},
            {n: fisher[n] if fisher is not None else None for n in names},
            config,
            {n: thresholds.get(n) for n in names},
        )
        for names in by_width.values()
    ]


def quantize_block(
    weights: dict[str, Tensor], fisher, config: SqueezeLLMConfig, thresholds: dict[str, float]
) -> dict[str, QuantizedWeight]:
    """One decoder block's matrices (``{name: (out_features, in_features)}``), each group of equal
    ``in_features`` in one batched k-means; ``fisher`` maps names to Fisher values (or is None)."""
    ((_, done, _),) = quantize_blocks([(None, weights)], fisher, config, thresholds)
    return done


def quantize_blocks(
    blocks,
    fisher,
    config: SqueezeLLMConfig,
    thresholds: dict[str, float],
    stored=None,
    threads: int | None = None,
):
    """``quantize_block`` over ``blocks`` (``(key, weights)`` pairs), yielding
    ``(key, result, fresh)`` in order; ``stored(key)`` may give a block's result instead
    (``fresh`` is then False). ``threads``: the k-means program's CPU threads (default:
    torch's count now).

    Pipelined: a block's k-means runs in a worker thread (the compiled program releases
    the GIL) while this thread finishes the block before it and splits the next. The split
    and finish steps are mostly one thread's work, so on 2 cores they hide under the
    k-means instead of following it.
    """
    threads = threads or torch.get_num_threads()
    pool = ThreadPoolExecutor(1, thread_name_prefix="sqlab-kmeans")
    try:
        behind = None  # (key, groups, their k-means futures) or (key, stored result, None)
        for key, weights in blocks:
            found = stored(key) if stored is not None else None
            if found is None:
                groups = _groups(weights, fisher, config, thresholds)
                running = [
                    pool.submit(cluster, g.points, g.importances, config, threads) for g in groups
                ]
            if behind is not None:
                yield _finished(*behind)
            behind = (key, groups, running) if found is None else (key, found, None)
        if behind is not None:
            yield _finished(*behind)
    finally:  # on an error or an interrupt, k-means not started yet never starts
        pool.shutdown(wait=True, cancel_futures=True)


def _finished(key, groups, running):
    if running is None:  # a stored result
        return key, groups, False
    done: dict[str, QuantizedWeight] = {}
    for group, future in zip(groups, running):
        done.update(finish_group(group, future.result().centroids))
    return key, done, True


def layer_stats(
    name: str, weight: Tensor, fisher: Tensor | None, q: QuantizedWeight, w_hat: Tensor
) -> LayerStats:
    """Errors of one matrix against its reconstruction ``w_hat``, and its storage."""
    diff2 = (weight.float() - w_hat.float()) ** 2
    weighted = float((fisher.float() * diff2).sum()) if fisher is not None else float("nan")
    return LayerStats(
        name,
        tuple(weight.shape),
        q.outliers,
        q.sensitive,
        weighted,
        float(diff2.mean()),
        q.storage_bits(),
    )


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def outlier_thresholds(
    model: nn.Module, config: SqueezeLLMConfig, profile: outliers.OutlierProfile | None = None
) -> tuple[float | None, dict[str, float]]:
    """The IQR range ``r`` for this run
    (given, solved for ``outlier_pct``, or none) and each matrix's ``T``.

    ``profile`` reuses a summary of the model's (unquantized) weights across runs.
    """
    if not config.uses_outliers:
        return None, {}
    if profile is None:
        profile = outliers.OutlierProfile(
            {n: m.weight.detach() for n, m in quantizable_linears(model).items()}
        )
    r = (
        config.outlier_range
        if config.outlier_range is not None
        else profile.solve(config.outlier_pct, exact=False)  # checked on the split's counts
    )
    return float(r), {n: profile.threshold(n, r) for n in profile.matrices}


class _WorkDir:
    """Finished blocks of an interrupted run, one safetensors file each.

    Every file is written atomically and records a checksum of its content and the
    run it belongs to; a block whose file is damaged, truncated or of another run is
    logged and quantized again, never used.
    """

    def __init__(self, path: Path, identity: dict):
        self.path = Path(path)
        self.run = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        marker = self.path / "run.json"
        found = None
        if marker.exists():
            try:
                found = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                log.warning(
                    "%s is damaged (%s); writing it again (each block is checked on its own)",
                    marker,
                    exc,
                )
        if found is not None and found != json.loads(json.dumps(identity)):
            raise SqlabError(
                f"work directory {str(self.path)!r} holds blocks of a different run "
                f"({marker}); delete it or choose another directory"
            )
        if found is None:
            files.write_json(marker, identity)

    def file(self, index: int) -> Path:
        return self.path / f"block_{index:04d}.safetensors"

    def load(self, index: int) -> dict[str, QuantizedWeight] | None:
        path = self.file(index)
        if not path.exists():
            return None
        try:
            tensors, meta = files.load_safetensors(path, verify=True)
            if meta.get("run") != self.run:
                raise SqlabError(
                    f"it belongs to another run ({meta.get('run')!r}, this run is {self.run!r})"
                )
            result = {}
            for name, info in json.loads(meta["layers"]).items():
                part = {
                    k[len(name) + 1 :]: t for k, t in tensors.items() if k.startswith(f"{name}.")
                }
                csr = CSR(part["rows"], part["cols"], part["vals"]) if "vals" in part else None
                indices = unpack(part["qweight"], info["wbits"], info["in_features"])
                result[name] = QuantizedWeight(
                    indices, part["lookup_table"], csr, info["outliers"], info["sensitive"]
                )
        except (SqlabError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "block %d: %s is unusable (%s); quantizing the block again", index, path, exc
            )
            return None
        return result

    def save(self, index: int, block: dict[str, QuantizedWeight]) -> None:
        tensors, layers = {}, {}
        for name, q in block.items():
            tensors[f"{name}.qweight"] = pack(q.indices, q.wbits)
            tensors[f"{name}.lookup_table"] = q.lut
            if q.csr is not None:
                tensors[f"{name}.rows"], tensors[f"{name}.cols"], tensors[f"{name}.vals"] = (
                    q.csr.rows,
                    q.csr.cols,
                    q.csr.vals,
                )
            layers[name] = {
                "wbits": q.wbits,
                "in_features": q.indices.shape[1],
                "outliers": q.outliers,
                "sensitive": q.sensitive,
            }
        meta = {"layers": json.dumps(layers, sort_keys=True), "run": self.run}
        files.save_safetensors(tensors, self.file(index), meta, checksum=True)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SqueezeLLMConfig,
    fisher: dict[str, Tensor] | None = None,
    *,
    simulate: bool = False,
    work_dir: str | Path | None = None,
    blocks: list[int] | None = None,
    profile: outliers.OutlierProfile | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize every quantizable linear of ``model`` in place; returns per-layer statistics.

    ``fisher`` maps module names to Fisher information of their weights; it is
    needed for sensitivity-weighted k-means and for ``sensitive_pct > 0``
    (``config.weighted=False`` runs plain k-means without it). ``blocks`` limits
    the work to those decoder blocks (by index), for quick looks; the outlier
    range is still solved over the whole model (``profile``, an
    ``outliers.OutlierProfile`` of the unquantized weights, saves summarising
    them again).
    """
    if fisher is None and (config.weighted or config.sensitive_pct > 0):
        raise SqlabError(
            "SqueezeLLM needs the Fisher information (sqlab.compute_fisher); pass fisher=..., "
            "or use weighted=False with sensitive_pct=0 for plain k-means"
        )
    chosen = list(enumerate(decoder_blocks(model)))
    if blocks is not None:
        bad = [b for b in blocks if not 0 <= b < len(chosen)]
        if bad:
            raise SqlabError(
                f"block indices {bad} out of range; the model has {len(chosen)} decoder blocks"
            )
        chosen = [chosen[b] for b in sorted(set(blocks))]
    for _, (prefix, block) in chosen:
        for short, linear in block_linears(model, block).items():
            name = f"{prefix}.{short}"
            check_finite(name, linear.weight, "weights")
            if fisher is None:
                continue
            if name not in fisher:
                raise SqlabError(f"the Fisher information has no entry for {name}")
            if tuple(fisher[name].shape) != tuple(linear.weight.shape):
                raise SqlabError(
                    f"the Fisher information of {name} has shape {tuple(fisher[name].shape)}, "
                    f"the weight has {tuple(linear.weight.shape)}"
                )
            check_finite(name, fisher[name], "Fisher values")
    outlier_range, thresholds = outlier_thresholds(model, config, profile)
    store = None
    if work_dir is not None:
        from .models import fingerprint

        store = _WorkDir(
            work_dir,
            {
                "config": config.as_dict(),
                "outlier_range": outlier_range,
                "model": fingerprint(model),
            },
        )
    members = {
        index: {f"{prefix}.{n}": m for n, m in block_linears(model, block).items()}
        for index, (prefix, block) in chosen
    }
    weights = (
        (index, {n: m.weight.detach() for n, m in linears.items()})
        for index, linears in members.items()
    )
    stats = []
    cores = torch.get_num_threads()
    # the exact k-means takes every core in its worker thread, and this thread's torch work
    # half of them, so that 2 cores are not shared by 4 threads spinning at each other
    with torch_threads(max(1, cores // 2) if config.kmeans == "optimal" else cores):
        for index, done, fresh in tqdm(
            quantize_blocks(
                weights,
                fisher,
                config,
                thresholds,
                stored=store.load if store is not None else None,
                threads=cores,
            ),
            total=len(members),
            desc=f"SqueezeLLM {config.wbits}-bit",
            unit="block",
            disable=not progress,
            leave=False,
        ):
            if fresh and store is not None:
                store.save(index, done)
            for name, linear in members[index].items():
                q = done[name]
                w_hat = q.dequantize(linear.weight.dtype)
                stats.append(
                    layer_stats(
                        name, linear.weight, fisher[name] if fisher is not None else None, q, w_hat
                    )
                )
                if simulate:  # the reconstruction in the nn.Linear: no packing at all
                    linear.weight.copy_(w_hat)
                else:
                    bias = linear.bias.detach() if linear.bias is not None else None
                    _set_module(model, name, q.to_layer(bias, name).to(linear.weight.device))
    report = QuantReport(config, outlier_range, stats)
    if blocks is None:
        report.check_outlier_share()
    if not simulate:
        from .checkpoint import mark_quantized

        mark_quantized(model, config.as_dict())  # so model.save_pretrained writes a checkpoint
    return report
