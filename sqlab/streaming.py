"""Quantization streamed block by block from a model's safetensors shards.

``quantize_model`` needs the whole model in memory; a 70B model does not fit. Here the
model exists only on the meta device (names, shapes, ties), and each decoder block's
weights are read from the shards (``model.safetensors`` or the shards that
``model.safetensors.index.json`` lists) when the block is quantized, with its Fisher
information read by name from the Fisher file. Finished blocks go to the work
directory as in ``quantize_model`` (same files, so a run resumes either way), and the
checkpoint is assembled from them one tensor at a time (``checkpoint.save_streamed``).
The result is the same checkpoint, byte for byte: the weights are read in the dtype
``load_model`` would give them, and every step runs the same code on the same values.

Memory: one block's weights and Fisher, the k-means working set, the outlier profile
(a sorted sample per matrix) and, while assembling, a few MB of one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import files, outliers
from .config import QuantConfig
from .errors import SqlabError
from .models import block_linears, decoder_blocks, default_device, default_dtype, resolve
from .quantize import (
    QuantReport,
    _WorkDir,
    check_finite,
    layer_stats,
    outlier_thresholds,
    quantize_block,
)

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
CHUNK_BYTES = 8 << 20  # rows read at a time when a tensor is copied or sampled


class Unstreamable(SqlabError):
    """A model the streamed path cannot read (``load_model`` still can): the message says why."""


class ShardedModel:
    """A model directory's tensors, read one at a time (or some rows of one) from its shards.

    Tensors come in the dtype ``load_model`` would give them (``dtype``: fp32 on the
    CPU, fp16 on a GPU); ``meta`` is the model on the meta device.
    """

    def __init__(self, spec: str, dtype: torch.dtype | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        reason = unstreamable(spec)
        if reason:
            raise Unstreamable(f"cannot stream {spec!r}: {reason}")
        self.spec, self.path = spec, Path(resolve(spec).path)
        self.dtype = dtype or default_dtype(default_device())
        self.config = AutoConfig.from_pretrained(self.path)
        with torch.device("meta"):  # no tensor is ever allocated
            self.meta = AutoModelForCausalLM.from_config(self.config)
        self.meta.tie_weights()  # as from_pretrained does: tied tensors become one parameter
        decoder_blocks(self.meta)  # refuses what sqlab cannot quantize (stacked expert tensors)
        self.readers = self._readers(spec)
        state = self.meta.state_dict(keep_vars=True)
        self._keys, first, self.tied = list(state), {}, {}
        for key, tensor in state.items():  # tied tensors are one parameter of the model
            if tensor.numel() and id(tensor) in first:
                self.tied[key] = first[id(tensor)]
            else:
                first.setdefault(id(tensor), key)
        missing = [k for k in self._keys if self._stored(k) is None]
        if missing:  # stored under other names, which from_pretrained converts
            raise Unstreamable(
                f"cannot stream {spec!r}: its weight files lack {', '.join(missing[:3])}"
            )

    def _readers(self, spec: str) -> dict[str, files.SafetensorsReader]:
        """The reader of every stored tensor; a damaged or odd file is left to ``load_model``,
        which says what is wrong with it in its own words."""
        index = self.path / INDEX
        try:
            if not index.is_file():
                reader = files.SafetensorsReader(self.path / WEIGHTS)
                return dict.fromkeys(reader.keys(), reader)
            weight_map = json.loads(index.read_text())["weight_map"]
            readers = {f: files.SafetensorsReader(self.path / f) for f in set(weight_map.values())}
            return {k: readers[f] for k, f in weight_map.items()}
        except (SqlabError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Unstreamable(f"cannot stream {spec!r}: {exc}") from exc

    def _stored(self, key: str) -> str | None:
        for name in (key, self.tied.get(key)):
            if name in self.readers:
                return name
        return None

    def keys(self) -> list[str]:
        """Every tensor of the model's state dict, in its order (tied ones under each name)."""
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        name = self._stored(key)
        return self.readers[name].shape(name)

    def stored_dtype(self, key: str) -> torch.dtype:
        name = self._stored(key)
        return self.readers[name].dtype(name)

    def is_floating(self, key: str) -> bool:
        return self.stored_dtype(key).is_floating_point

    def get(self, key: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Tensor ``key`` (or its rows ``start:stop``) in the model's dtype."""
        name = self._stored(key)
        tensor = self.readers[name].get(name, start, stop)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def row_chunks(self, key: str) -> Iterator[Tensor]:
        """Tensor ``key`` in the model's dtype, a few MB of rows at a time."""
        shape = self.shape(key)
        rows = shape[0] if shape else 1
        row_bytes = max(1, torch.Size(shape[1:]).numel() * 4)
        step = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, rows, step):
            yield self.get(key, start, start + step)

    def fingerprint(self) -> str:
        """``models.fingerprint`` of the model ``load_model`` would give, read tensor by tensor."""
        digest = hashlib.sha256()
        config = self.config.to_dict()
        for volatile in (
            "_name_or_path",
            "transformers_version",
            "dtype",
            "torch_dtype",
            "use_cache",
        ):
            config.pop(volatile, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key in sorted(self._keys):
            shape = self.shape(key)
            numel = torch.Size(shape).numel()
            step = max(1, numel // 4096)
            wanted = torch.arange(0, numel, step)[:4096]
            parts, seen = [], 0
            for chunk in self.row_chunks(key):
                flat = chunk.reshape(-1)
                inside = wanted[(wanted >= seen) & (wanted < seen + flat.numel())]
                parts.append(flat[inside - seen].float())
                seen += flat.numel()
            digest.update(key.encode())
            digest.update(str(tuple(shape)).encode())
            digest.update(torch.cat(parts).numpy().tobytes())
        return digest.hexdigest()[:16]

    def blocks(self) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """Each decoder block's name and its quantizable linears' ``{name: weight shape}``."""
        return [
            (
                prefix,
                {
                    f"{prefix}.{n}": tuple(m.weight.shape)
                    for n, m in block_linears(self.meta, block).items()
                },
            )
            for prefix, block in decoder_blocks(self.meta)
        ]


def unstreamable(spec: str) -> str | None:
    """Why ``spec`` cannot be streamed (``None`` if it can): a local model directory with
    safetensors weights that is not already a sqlab checkpoint."""
    try:
        source = resolve(spec)
    except SqlabError as exc:
        return str(exc)
    path = Path(source.path)
    if source.hub or source.gguf_file:
        return "only a local model directory with safetensors weights is streamed"
    if (path / "quant_config.json").exists():
        return "it is already a quantized checkpoint"
    if not (path / INDEX).is_file() and not (path / WEIGHTS).is_file():
        return f"it has neither {WEIGHTS} nor {INDEX}"
    return None


class _Lazy(Mapping):
    """``{name: tensor}`` whose tensors are read when asked for (one at a time)."""

    def __init__(self, names, read):
        self._names, self._read = list(names), read

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def fisher_file(path: str | Path, shapes: dict[str, tuple[int, int]]) -> Mapping:
    """A Fisher file read by name, checked to hold every matrix with its shape."""
    reader = files.SafetensorsReader(path)
    for name, shape in shapes.items():
        if name not in reader:
            raise SqlabError(f"Fisher file {str(path)!r} has no entry for {name}")
        if reader.shape(name) != shape:
            raise SqlabError(
                f"Fisher of {name} in {str(path)!r} has shape {reader.shape(name)}, "
                f"the model's weight has {shape}"
            )
    return _Lazy(shapes, reader.get)


def kmeans_device(config: QuantConfig) -> torch.device:
    """Where a block is split and clustered: a GPU for ``kmeans='fast'`` (the batched heuristic is
    torch code), else the CPU (the exact k-means is a CPU kernel)."""
    return torch.device("cuda" if torch.cuda.is_available() and config.kmeans == "fast" else "cpu")


@torch.no_grad()
def quantize_streamed(
    model: ShardedModel,
    config: QuantConfig,
    fisher: Mapping | None,
    work_dir: str | Path,
    *,
    fingerprint: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[QuantReport, list[Path]]:
    """Quantize every block of ``model`` into ``work_dir``; the report and the block files.

    ``fisher`` maps names to Fisher values (read when asked, ``fisher_file``);
    ``device`` runs the split and the k-means there (default: a GPU with
    ``kmeans='fast'``, whose batched heuristic is torch code; the CPU otherwise, where
    the exact k-means runs).
    """
    if fisher is None and config.needs_fisher:
        raise SqlabError(
            "SqueezeLLM needs the Fisher information (sqlab.compute_fisher); pass "
            "fisher=..., or use weighted=False with sensitive_pct=0 for plain k-means"
        )
    device = torch.device(device) if device is not None else kmeans_device(config)
    blocks = model.blocks()
    shapes = {n: s for _, block in blocks for n, s in block.items()}
    profile = None
    if config.uses_outliers:  # one pass over every matrix, kept as a sorted sample each
        profile = outliers.OutlierProfile(_Lazy(shapes, lambda n: model.get(f"{n}.weight")))
    outlier_range, thresholds = outlier_thresholds(None, config, profile)
    store = _WorkDir(
        work_dir,
        {
            "config": config.as_dict(),
            "outlier_range": outlier_range,
            "model": fingerprint or model.fingerprint(),
        },
    )
    stats = []
    for index, (_, block) in tqdm(
        list(enumerate(blocks)),
        desc=f"SqueezeLLM {config.wbits}-bit (streamed)",
        unit="block",
        disable=not progress,
        leave=False,
    ):
        weights = {n: model.get(f"{n}.weight").to(device) for n in block}
        fishers = {n: fisher[n].to(device) for n in block} if fisher is not None else None
        for name, w in weights.items():
            check_finite(name, w, "weights")
            if fishers is not None:
                check_finite(name, fishers[name], "Fisher values")
        done = store.load(index)
        if done is None:
            done = quantize_block(weights, fishers, config, thresholds)
            store.save(index, done)
        for name, w in weights.items():
            q = done[name]
            w_hat = q.dequantize(w.dtype).to(device)
            stats.append(
                layer_stats(name, w, fishers[name] if fishers is not None else None, q, w_hat)
            )
        del weights, fishers, done
    report = QuantReport(config, outlier_range, stats)
    report.check_outlier_share()
    return report, [store.file(i) for i in range(len(blocks))]
