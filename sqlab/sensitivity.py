"""Sensitivity: the diagonal of the Fisher information of every quantizable weight.

For each calibration window (batch size 1) back-propagate the language-modelling
loss and add the square of each weight's gradient into an fp32 accumulator:
``F = sum_samples g ⊙ g``. Only the quantizable linears require grad. Results are
cached on disk (safetensors) by model content, corpus, window count, length and
seed, so a second call is a load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import assets
from .errors import SqlabError
from .files import load_safetensors, save_safetensors
from .models import check_seqlen, fingerprint, quantizable_linears

log = logging.getLogger(__name__)


def fisher_information(model: nn.Module, windows: torch.Tensor, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every quantizable weight, ``{module name: (out_features, in_features)}`` fp32.

    ``windows`` is ``(nsamples, seqlen)`` token ids; one backward pass per window.
    """
    linears = quantizable_linears(model)
    device = next(model.parameters()).device
    was_training = model.training
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=device) for name, m in linears.items()}
    try:
        model.eval()  # no dropout: the Fisher of the deployed model
        for p in model.parameters():
            p.requires_grad_(False)
        for m in linears.values():
            m.weight.requires_grad_(True)
        for window in tqdm(windows, desc="Fisher", unit="sample", disable=not progress, leave=False):
            ids = window[None].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, m in linears.items():
                fisher[name].add_(m.weight.grad.float().square())
                m.weight.grad = None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None
        model.train(was_training)
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise SqlabError(f"the Fisher information of {name} is not finite (NaN or Inf gradients); "
                             "check the model's weights and the calibration data")
    return fisher


def fisher_cache_path(model: nn.Module, corpus: str, nsamples: int, seqlen: int, seed: int) -> Path:
    key = f"{fingerprint(model)}-{corpus.replace('/', '_').replace(':', '_')}-n{nsamples}-l{seqlen}-s{seed}"
    return assets.cache_path("fisher", f"{key}.safetensors")


def load_fisher(path: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a Fisher file; with ``model``, check it names every quantizable weight with its shape."""
    fisher = load_safetensors(path)[0]
    if model is not None:
        for name, linear in quantizable_linears(model).items():
            if name not in fisher:
                raise SqlabError(f"Fisher file {str(path)!r} has no entry for {name}")
            if tuple(fisher[name].shape) != tuple(linear.weight.shape):
                raise SqlabError(f"Fisher of {name} in {str(path)!r} has shape {tuple(fisher[name].shape)}, "
                                 f"the model's weight has {tuple(linear.weight.shape)}")
    return fisher


def save_fisher(fisher: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors(fisher, path)


def compute_fisher(model: nn.Module, tokenizer, corpus: str = "shakespeare", nsamples: int = 16,
                   seqlen: int = 512, seed: int = 0, *, cache: bool = True,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """Fisher information on ``nsamples`` calibration windows of ``corpus``, cached on disk."""
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
    fisher = fisher_information(model, windows, progress=progress)
    if cache:
        save_fisher(fisher, path)
    return fisher


def _even_sample(flat: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` evenly spaced entries of a flat tensor (all of it when it is smaller)."""
    return flat[torch.linspace(0, flat.numel() - 1, min(n, flat.numel())).long()]


def fisher_summary(fisher: dict[str, torch.Tensor]):
    """One row per matrix: block, module, and the spread of its Fisher values (a pandas DataFrame)."""
    import pandas as pd

    from .models import split_name

    rows = []
    for name, f in fisher.items():
        block, module = split_name(name)
        flat = f.reshape(-1).float()
        sample = _even_sample(flat, 1 << 20).sort().values
        rows.append({"name": name, "block": block, "module": module, "numel": flat.numel(),
                     "total": float(flat.sum()), "mean": float(flat.mean()),
                     "median": float(sample[sample.numel() // 2]), "p99": float(sample[int(0.99 * (sample.numel() - 1))]),
                     "max": float(flat.max())})
    return pd.DataFrame(rows)


def top_mass(fisher: dict[str, torch.Tensor], pcts=(0.05, 0.45, 1.0, 5.0)) -> dict[float, float]:
    """Share of the total Fisher information held by the top ``pct`` percent of each matrix's weights."""
    held = {p: 0.0 for p in pcts}
    total = 0.0
    for f in fisher.values():
        flat = f.reshape(-1).float()
        total += float(flat.sum())
        top = flat.topk(max(1, round(max(pcts) / 100 * flat.numel()))).values.cumsum(0)
        for p in pcts:
            held[p] += float(top[max(1, round(p / 100 * flat.numel())) - 1])
    return {p: held[p] / total for p in pcts}


def fisher_by_module(fisher: dict[str, torch.Tensor], per_matrix: int = 4096) -> dict[str, torch.Tensor]:
    """An evenly spaced sample of every matrix's Fisher values, pooled per module (for histograms)."""
    from .models import split_name

    pooled: dict[str, list[torch.Tensor]] = {}
    for name, f in fisher.items():
        pooled.setdefault(split_name(name)[1], []).append(_even_sample(f.reshape(-1), per_matrix))
    return {module: torch.cat(parts) for module, parts in pooled.items()}
