"""Baselines to compare SqueezeLLM against: round-to-nearest (RTN) and GPTQ.

**RTN** is uniform min-max quantization: ``2**wbits`` evenly spaced levels from a
group's minimum to its maximum, per output channel (``groupsize=None``) or per
group of ``groupsize`` consecutive inputs (a shorter last group when it does not
divide ``in_features``); an fp16 scale and a ``wbits``-bit zero point per group.

**GPTQ** (Frantar et al., 2022) quantizes the columns of ``W`` one at a time and
spreads each column's error over the columns not yet quantized, using the
inverse of the layer Hessian ``H = 2 X Xᵀ`` of its calibration inputs ``X``.
Decoder blocks go in order, each fed the outputs of the already-quantized blocks
before it; within a block every linear sees the block's inputs. Dampening adds
``percdamp · mean(diag H)`` to the diagonal; updates are applied lazily in
blocks of 128 columns; ``act_order`` visits columns by decreasing ``diag H``.
Both produce reconstructed weights (simulate mode) and count their effective
bits per weight: codes, scales, zeros and, for act-order with groups, the
group index of every input.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import GPTQConfig, RTNConfig
from .errors import SqlabError
from .files import load_safetensors, save_safetensors
from .models import block_linears, decoder_blocks, quantizable_linears
from .quantize import LayerStats, QuantReport, check_finite

log = logging.getLogger(__name__)


def _grid(w: Tensor, wbits: int) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero point of each row of ``w`` (rows, group) -> (rows, 1) each."""
    lo = w.amin(-1, keepdim=True).clamp_max(0)
    hi = w.amax(-1, keepdim=True).clamp_min(0)
    scale = (
        ((hi - lo) / (2**wbits - 1)).clamp_min(1e-12).half().float()
    )  # scales are stored in fp16
    return scale, torch.round(-lo / scale)


def _round(w: Tensor, scale: Tensor, zero: Tensor, wbits: int) -> Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**wbits - 1)
    return (q - zero) * scale


def rtn_quantize(weight: Tensor, wbits: int, groupsize: int | None = None) -> Tensor:
    """Round-to-nearest reconstruction of ``weight`` (out_features, in_features)."""
    if wbits not in (2, 3, 4, 8):
        raise SqlabError(f"RTN wbits must be 2, 3, 4 or 8, got {wbits!r}")
    w = weight.float()
    out = torch.empty_like(w)
    step = groupsize or w.shape[1]
    for start in range(0, w.shape[1], step):  # a loop over groups of columns, not rows
        group = w[:, start : start + step]
        out[:, start : start + step] = _round(group, *_grid(group, wbits), wbits)
    return out.to(weight.dtype)


def bits_per_weight(
    wbits: int,
    in_features: int,
    out_features: int,
    groupsize: int | None = None,
    act_order: bool = False,
) -> float:
    """Stored bits per weight of a uniform quantizer.

    The codes, plus an fp16 scale and a ``wbits``-bit zero per group, plus (act-order
    with groups) a 32-bit group index per input column.
    """
    groups = math.ceil(in_features / (groupsize or in_features))
    extra = groups * (16 + wbits) / in_features
    if act_order and groupsize:
        extra += 32 / out_features
    return wbits + extra


def _stats(
    name: str, before: Tensor, after: Tensor, fisher: Tensor | None, bits: float
) -> LayerStats:
    diff2 = (before.float() - after.float()) ** 2
    weighted = float((fisher.float() * diff2).sum()) if fisher is not None else float("nan")
    return LayerStats(
        name,
        tuple(before.shape),
        0,
        0,
        weighted,
        float(diff2.mean()),
        {"total": round(bits * before.numel())},
    )


@torch.no_grad()
def rtn_quantize_model(
    model: nn.Module,
    config: RTNConfig,
    fisher: dict[str, Tensor] | None = None,
    only: set[str] | None = None,
) -> QuantReport:
    """RTN of every quantizable linear (or those named in ``only``), in place (simulated)."""
    linears = {n: m for n, m in quantizable_linears(model).items() if only is None or n in only}
    for name, linear in linears.items():
        check_finite(name, linear.weight, "weights")
    stats = []
    for name, linear in linears.items():
        before = linear.weight.detach().clone()
        linear.weight.copy_(rtn_quantize(before, config.wbits, config.groupsize))
        bits = bits_per_weight(
            config.wbits, linear.in_features, linear.out_features, config.groupsize
        )
        stats.append(
            _stats(name, before, linear.weight, fisher.get(name) if fisher else None, bits)
        )
    return QuantReport(config, None, stats)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    wbits: int,
    groupsize: int | None = None,
    act_order: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> Tensor:
    """GPTQ reconstruction of ``weight`` (out, in) given the layer Hessian ``hessian`` (in, in)."""
    w = weight.float().clone()
    h = hessian.float().clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that never fired: nothing to preserve there
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(columns, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise SqlabError(
            f"the Hessian is not positive definite even after dampening {percdamp}; "
            "use more calibration samples or a larger percdamp"
        ) from exc
    q = torch.zeros_like(w)
    scale = zero = None
    if not groupsize:
        scale, zero = _grid(w, wbits)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            if groupsize and (i1 + i) % groupsize == 0:
                # the group's grid from its weights as updated so far
                group = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :groupsize]
                scale, zero = _grid(group, wbits)
            qcol = _round(col[:, None], scale, zero, wbits)[:, 0]
            q[:, i1 + i] = qcol
            e = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy update of the columns after this block
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(weight.dtype)


class _Stop(Exception):
    pass


def _block_inputs(model: nn.Module, windows: Tensor) -> tuple[Tensor, dict]:
    """Hidden states entering the first decoder block for each window, and its keyword arguments."""
    first = decoder_blocks(model)[0][1]
    device = next(model.parameters()).device
    captured, kwargs = [], {}

    def grab(module, args, kw):
        captured.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured), kwargs


def _run_block(block: nn.Module, inputs: Tensor, kwargs: dict) -> Tensor:
    outs = []
    for x in inputs:
        out = block(x[None], **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


def _hessian_path(cache_dir: Path | None, key: str, index: int) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / key / f"block_{index:04d}.safetensors"


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    windows: Tensor,
    config: GPTQConfig,
    *,
    fisher: dict[str, Tensor] | None = None,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    only_blocks: list[int] | None = None,
    progress: bool = True,
) -> QuantReport:
    """GPTQ of every quantizable linear, block by block on ``windows`` (nsamples, seqlen), in place.

    With ``cache_dir`` and ``cache_key`` (a content key of the model, the data and
    the settings), each block's Hessians are saved, and a second run with the same
    key reads them instead of running the model. ``only_blocks`` quantizes just
    those blocks (the others still pass their outputs on).
    """
    blocks = decoder_blocks(model)
    chosen = set(range(len(blocks)) if only_blocks is None else only_blocks)
    for index in sorted(chosen):
        for name, linear in block_linears(model, blocks[index][1]).items():
            check_finite(f"{blocks[index][0]}.{name}", linear.weight, "weights")
    blocks = blocks[: max(chosen) + 1]  # nothing after the last chosen block matters
    paths = [
        _hessian_path(cache_dir, cache_key, i) if cache_key and i in chosen else None
        for i in range(len(blocks))
    ]
    need_forward = not all(p is not None and p.exists() for i, p in enumerate(paths) if i in chosen)
    inputs = kwargs = None
    if need_forward:
        inputs, kwargs = _block_inputs(model, windows)
    stats = []
    for index, (prefix, block) in enumerate(
        tqdm(
            blocks, desc=f"GPTQ {config.wbits}-bit", unit="block", disable=not progress, leave=False
        )
    ):
        linears = block_linears(model, block)
        path = paths[index]
        if index not in chosen:
            if need_forward and index + 1 < len(blocks):
                inputs = _run_block(block, inputs, kwargs)
            continue
        if path is not None and path.exists():
            hessians = load_safetensors(path)[0]
        else:
            hessians = {
                name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                for name, m in linears.items()
            }

            def accumulate(name):
                def hook(module, args, output):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    hessians[name].addmm_(x.T, x, alpha=2.0)

                return hook

            handles = [m.register_forward_hook(accumulate(n)) for n, m in linears.items()]
            try:
                _run_block(block, inputs, kwargs)
            finally:
                for h in handles:
                    h.remove()
            count = inputs.shape[0] * inputs.shape[1]
            hessians = {n: h / count for n, h in hessians.items()}
            for name, h in hessians.items():
                check_finite(f"{prefix}.{name}", h, "calibration inputs (Hessian)")
            if path is not None:
                save_safetensors(hessians, path)
        for name, linear in linears.items():
            before = linear.weight.detach().clone()
            q = gptq_quantize(
                before,
                hessians[name].to(before.device),
                config.wbits,
                config.groupsize,
                config.act_order,
                config.percdamp,
            )
            linear.weight.copy_(q)
            full = f"{prefix}.{name}"
            bits = bits_per_weight(
                config.wbits,
                linear.in_features,
                linear.out_features,
                config.groupsize,
                config.act_order,
            )
            stats.append(_stats(full, before, q, fisher.get(full) if fisher else None, bits))
        if need_forward and index + 1 < len(blocks):
            inputs = _run_block(block, inputs, kwargs)  # the next block sees this block quantized
    return QuantReport(config, None, stats)


def rtn_levels(weight: Tensor, wbits: int) -> Tensor:
    """The per-channel round-to-nearest grid of each row, ``(rows, 2**wbits)`` ascending."""
    scale, zero = _grid(weight.float(), wbits)
    return (torch.arange(2**wbits, device=weight.device)[None, :] - zero) * scale


def grid_comparison(
    weight: Tensor, fisher: Tensor, wbits: int
) -> tuple[dict[str, Tensor], "object"]:
    """Three ways to choose ``2**wbits`` levels for each row of ``weight`` (rows, n).

    The uniform RTN grid, plain k-means, and Fisher-weighted k-means (SqueezeLLM).
    Returns the levels of each, ``{name: (rows, k)}``, and a DataFrame with each
    row's weighted error ``sum F (w - q)^2`` and plain mean squared error.
    """
    import pandas as pd

    from .kmeans import assign, optimal_kmeans

    w, f = weight.float(), fisher.float()
    levels = {
        "RTN grid": rtn_levels(w, wbits),
        "k-means": optimal_kmeans(w, None, 2**wbits).centroids,
        "Fisher-weighted k-means": optimal_kmeans(w, f, 2**wbits).centroids,
    }
    rows = []
    for name, grid in levels.items():
        q = grid.gather(1, assign(w, grid).long())
        for i, (we, mse) in enumerate(
            zip((f * (w - q) ** 2).sum(1).tolist(), ((w - q) ** 2).mean(1).tolist())
        ):
            rows.append({"method": name, "row": i, "weighted_error": we, "mse": mse})
    return levels, pd.DataFrame(rows)
