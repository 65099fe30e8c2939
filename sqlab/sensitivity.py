"""Sensitivity: the diagonal of the Fisher information of every quantizable weight.

For each calibration window (batch size 1) back-propagate the language-modelling
loss and add the square of each weight's gradient into an fp32 accumulator:
``F = sum_samples g ⊙ g``. Only the quantizable linears require grad. Results are
cached on disk (safetensors) by model content, corpus, window count, length and
seed, so a second call is a load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import assets
from .errors import SqlabError
from .files import load_safetensors, save_safetensors
from .memory import TensorPeak
from .models import check_seqlen, decoder_blocks, fingerprint, quantizable_linears

log = logging.getLogger(__name__)


OFFLOADS = ("none", "cpu", "disk")


@dataclass(frozen=True)
class FisherStrategy:
    """How the Fisher pass fits in memory; every strategy gives the same Fisher.

    ``checkpointing``: keep only each decoder block's input during the forward pass
    and recompute the block in the backward pass (``torch.utils.checkpoint``).
    ``offload``: where the fp32 accumulators live: ``none`` beside each weight,
    ``cpu`` in host memory (pinned when the model is on a GPU), ``disk`` in
    memory-mapped files (``offload_dir``). In every strategy each weight's gradient
    is squared into its accumulator as soon as backward produces it and then freed,
    so at most one linear's gradient is alive at a time.
    """

    checkpointing: bool = False
    offload: str = "none"

    def __post_init__(self):
        if self.offload not in OFFLOADS:
            raise SqlabError(f"offload must be one of {', '.join(OFFLOADS)}, got {self.offload!r}")
        if not isinstance(self.checkpointing, bool):
            raise SqlabError(f"checkpointing must be True or False, got {self.checkpointing!r}")


class FisherInformation(dict):
    """``{module name: (out_features, in_features) fp32}``, with how it was computed.

    ``peak_bytes`` and ``peak_kind`` say how much memory the pass took and what that
    number counts (``sqlab.memory.TensorPeak``); ``None`` when it was not measured.
    """

    strategy: FisherStrategy | None = None
    peak_bytes: int | None = None
    peak_kind: str | None = None


def _accumulators(
    linears: dict[str, nn.Linear], offload: str, offload_dir: Path | None
) -> dict[str, torch.Tensor]:
    """Zeroed fp32 accumulators, one per weight, where ``offload`` puts them."""
    found = {}
    for name, m in linears.items():
        if offload == "none":
            found[name] = torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
        elif offload == "cpu":
            pin = m.weight.device.type == "cuda"
            found[name] = torch.zeros(m.weight.shape, dtype=torch.float32, pin_memory=pin)
        else:
            found[name] = _mapped_zeros(offload_dir, name, tuple(m.weight.shape))
    return found


def _mapped_zeros(folder: Path | None, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed fp32 tensor backed by a file: its pages go to disk when memory is short.

    The file is unlinked at once (the mapping keeps it), so nothing is left behind.
    """
    folder = Path(folder) if folder is not None else assets.cache_dir("fisher", "offload")
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".f32")
    os.close(fd)
    try:
        mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
    finally:
        os.unlink(path)
    return torch.from_numpy(mapped)


def _square_into(accumulator: torch.Tensor):
    """A post-accumulate-grad hook: add ``grad²`` to the accumulator and free the gradient."""

    def hook(weight: torch.Tensor) -> None:
        # a blocking copy when the accumulator is in host memory: added only once it arrived
        accumulator.add_(weight.grad.float().square().to(accumulator.device))
        weight.grad = None

    return hook


@contextlib.contextmanager
def _checkpointed(blocks: list[nn.Module]):
    """Each decoder block recomputes its activations in the backward pass.

    Not the model's ``gradient_checkpointing_enable()``: transformers applies it in
    training mode only, which would switch dropout on in some families (OPT's blocks)
    and change the Fisher; this keeps eval mode and works for every family.
    """
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's hooks live there
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward


def fisher_information(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    progress: bool = True,
    strategy: FisherStrategy | None = None,
    offload_dir: str | Path | None = None,
    measure: bool = False,
) -> FisherInformation:
    """Diagonal Fisher of every quantizable weight,
    ``{module name: (out_features, in_features)}`` fp32.

    ``windows`` is ``(nsamples, seqlen)`` token ids; one backward pass per window.
    ``strategy`` (``FisherStrategy``) trades time for memory without changing the
    result; the model may be spread over devices (``load_model(..., device_map=...)``).
    ``measure`` records the pass's peak memory in the result (always on a GPU, where
    it is free).
    """
    strategy = strategy or FisherStrategy()
    linears = quantizable_linears(model)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher = FisherInformation(_accumulators(linears, strategy.offload, offload_dir))
    fisher.strategy = strategy
    hooks = []
    devices = {p.device for p in model.parameters()}
    measure = measure or any(d.type == "cuda" for d in devices)
    stored = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in model.state_dict().values()
        if t.device.type == "cpu"
    }
    params = sum(stored.values())  # tied tensors once
    peak = TensorPeak(
        devices,
        baseline=params + sum(f.numel() * 4 for f in fisher.values() if strategy.offload != "disk"),
    )
    blocks = [block for _, block in decoder_blocks(model)] if strategy.checkpointing else []
    try:
        model.eval()  # no dropout: the Fisher of the deployed model
        for p in model.parameters():
            p.requires_grad_(False)
        for name, m in linears.items():
            m.weight.requires_grad_(True)
            hooks.append(m.weight.register_post_accumulate_grad_hook(_square_into(fisher[name])))
        with _checkpointed(blocks), peak if measure else contextlib.nullcontext():
            for window in tqdm(
                windows, desc="Fisher", unit="sample", disable=not progress, leave=False
            ):
                ids = window[None].to(device)
                loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
                del loss
    finally:
        for hook in hooks:
            hook.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None
        model.train(was_training)
    if measure:
        fisher.peak_bytes, fisher.peak_kind = peak.bytes, peak.kind
        log.info("Fisher: %.1f MiB %s", peak.bytes / 2**20, peak.kind)
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise SqlabError(
                f"the Fisher information of {name} is not finite (NaN or Inf gradients); "
                "check the model's weights and the calibration data"
            )
    return fisher


def fisher_cache_path(
    model: nn.Module | str, corpus: str, nsamples: int, seqlen: int, seed: int
) -> Path:
    """The cache file of a Fisher run; ``model`` is the model or its ``fingerprint``."""
    digest = model if isinstance(model, str) else fingerprint(model)
    key = f"{digest}-{corpus.replace('/', '_').replace(':', '_')}-n{nsamples}-l{seqlen}-s{seed}"
    return assets.cache_path("fisher", f"{key}.safetensors")


def load_fisher(path: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a Fisher file; with ``model``,
    check it names every quantizable weight with its shape.
    """
    fisher = load_safetensors(path)[0]
    if model is not None:
        for name, linear in quantizable_linears(model).items():
            if name not in fisher:
                raise SqlabError(f"Fisher file {str(path)!r} has no entry for {name}")
            if tuple(fisher[name].shape) != tuple(linear.weight.shape):
                raise SqlabError(
                    f"Fisher of {name} in {str(path)!r} has shape {tuple(fisher[name].shape)}, "
                    f"the model's weight has {tuple(linear.weight.shape)}"
                )
    return fisher


def save_fisher(fisher: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors(fisher, path)


def compute_fisher(
    model: nn.Module,
    tokenizer,
    corpus: str = "shakespeare",
    nsamples: int = 16,
    seqlen: int = 512,
    seed: int = 0,
    *,
    cache: bool = True,
    progress: bool = True,
    strategy: FisherStrategy | None = None,
    offload_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Fisher information on ``nsamples`` calibration windows of ``corpus``, cached on disk.

    ``strategy`` and ``offload_dir`` as in ``fisher_information`` (the result, and so
    the cache entry, is the same for every strategy)."""
    from .data import calibration_windows

    check_seqlen(model, seqlen)
    path = fisher_cache_path(model, corpus, nsamples, seqlen, seed)
    if cache and path.exists():
        try:
            fisher = load_fisher(path, model)
            log.info("Fisher information from cache %s", path.name)
            return fisher
        except SqlabError as exc:  # a damaged cache entry is computed again, not trusted
            log.warning("%s; computing the Fisher information again", exc)
    windows = calibration_windows(tokenizer, corpus, nsamples, seqlen, seed)
    fisher = fisher_information(
        model, windows, progress=progress, strategy=strategy, offload_dir=offload_dir
    )
    if cache:
        save_fisher(fisher, path)
    return fisher


def _even_sample(flat: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` evenly spaced entries of a flat tensor (all of it when it is smaller)."""
    return flat[torch.linspace(0, flat.numel() - 1, min(n, flat.numel())).long()]


def fisher_summary(fisher: dict[str, torch.Tensor]):
    """One row per matrix: block, module, and the spread of its Fisher values
    (a pandas DataFrame).
    """
    import pandas as pd

    from .models import split_name

    rows = []
    for name, f in fisher.items():
        block, module = split_name(name)
        flat = f.reshape(-1).float()
        sample = _even_sample(flat, 1 << 20).sort().values
        rows.append(
            {
                "name": name,
                "block": block,
                "module": module,
                "numel": flat.numel(),
                "total": float(flat.sum()),
                "mean": float(flat.mean()),
                "median": float(sample[sample.numel() // 2]),
                "p99": float(sample[int(0.99 * (sample.numel() - 1))]),
                "max": float(flat.max()),
            }
        )
    return pd.DataFrame(rows)


def top_mass(fisher: dict[str, torch.Tensor], pcts=(0.05, 0.45, 1.0, 5.0)) -> dict[float, float]:
    """Share of the total Fisher information held by the top ``pct`` percent of each matrix's
    weights.
    """
    held = {p: 0.0 for p in pcts}
    total = 0.0
    for f in fisher.values():
        flat = f.reshape(-1).float()
        total += float(flat.sum())
        top = flat.topk(max(1, round(max(pcts) / 100 * flat.numel()))).values.cumsum(0)
        for p in pcts:
            held[p] += float(top[max(1, round(p / 100 * flat.numel())) - 1])
    return {p: held[p] / total for p in pcts}


def fisher_by_module(
    fisher: dict[str, torch.Tensor], per_matrix: int = 4096
) -> dict[str, torch.Tensor]:
    """An evenly spaced sample of every matrix's Fisher values, pooled per module
    (for histograms).
    """
    from .models import split_name

    pooled: dict[str, list[torch.Tensor]] = {}
    for name, f in fisher.items():
        pooled.setdefault(split_name(name)[1], []).append(_even_sample(f.reshape(-1), per_matrix))
    return {module: torch.cat(parts) for module, parts in pooled.items()}
