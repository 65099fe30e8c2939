"""Baselines to compare SqueezeLLM against: round-to-nearest (RTN).

RTN is uniform min-max quantization: per output channel (``groupsize=None``) or
per group of ``groupsize`` consecutive inputs, ``2**wbits`` evenly spaced levels
from the group's minimum to its maximum (an fp16 scale and a ``wbits``-bit zero
point per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import SqlabError
from .models import quantizable_linears


def rtn_quantize(weight: Tensor, wbits: int, groupsize: int | None = None) -> Tensor:
    """Round-to-nearest reconstruction of ``weight`` (out_features, in_features)."""
    if wbits not in (2, 3, 4, 8):
        raise SqlabError(f"RTN wbits must be 2, 3, 4 or 8, got {wbits!r}")
    out_features, in_features = weight.shape
    g = groupsize or in_features
    if in_features % g:
        raise SqlabError(f"groupsize {g} does not divide in_features {in_features}")
    w = weight.float().reshape(out_features, in_features // g, g)
    lo = w.amin(-1, keepdim=True).clamp_max(0)
    hi = w.amax(-1, keepdim=True).clamp_min(0)
    levels = 2**wbits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12).half().float()  # scales are stored in fp16
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


def rtn_bits_per_weight(wbits: int, in_features: int, groupsize: int | None = None) -> float:
    """Stored bits per weight: the codes plus an fp16 scale and a ``wbits``-bit zero per group."""
    g = groupsize or in_features
    return wbits + (16 + wbits) / g


@dataclass
class BaselineReport:
    method: str
    wbits: int
    groupsize: int | None
    weights: int
    bits_per_weight: float

    @property
    def size_mb(self) -> float:
        return self.weights * self.bits_per_weight / 8 / 2**20


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, wbits: int, groupsize: int | None = None,
                       only: set[str] | None = None) -> BaselineReport:
    """RTN of every quantizable linear (or those named in ``only``), in place (simulated)."""
    weights = bits = 0
    for name, linear in quantizable_linears(model).items():
        if only is not None and name not in only:
            continue
        linear.weight.copy_(rtn_quantize(linear.weight, wbits, groupsize))
        weights += linear.weight.numel()
        bits += linear.weight.numel() * rtn_bits_per_weight(wbits, linear.in_features, groupsize)
    return BaselineReport("rtn", wbits, groupsize, weights, bits / max(weights, 1))
