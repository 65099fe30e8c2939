"""Python time per ``SqueezeLinear`` call on the GPU path, with the kernel launch stubbed out.

Decoding a 7B model calls ~224 linears per token, so every microsecond of host work per
call costs ~0.22 ms per token, against ~1.5-2 ms of GPU time for all 3-bit linears. This
measures what sqlab itself spends per call: a LLaMA-7B q_proj-shaped layer (4096 x 4096,
3-bit), dense-only and with a 0.45% sparse part, one token of fp16 activations, through
``layer(x)``, with a backend whose launch does nothing (so no GPU is needed; with one, the
tensors live on it and the stream query is real). The baseline is the previous per-call
path (every argument checked, the plan and the argument tuple built on each call), kept
here as it was, measured in the same run on the same layers.

Timing: a warm-up, then ``--repeat`` runs of ``--calls`` calls each; per-call time is the
median run's total over its calls (the spread is the min-max of the runs).

    .venv/bin/python benchmarks/host_overhead.py [--calls 20000] [--repeat 7]
        [--json out/host_overhead.json]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy
import torch

from sqlab import files

from sqlab import SqueezeLinear, kernels
from sqlab.kernels import (
    DTYPES,
    MAX_GEMV_TOKENS,
    _check,
    _check_packed,
    _gemv_defines,
    _tokens_2d,
    gemv_plan,
)
from sqlab.packing import to_csr

SHAPE = (4096, 4096)  # (out_features, in_features): LLaMA-7B's attention projections
DENSITY = 0.0045


class StubBackend(kernels.Backend):
    """Compiles nothing and launches nothing; takes CPU tensors,
    or CUDA ones with a real stream query.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.launches = 0

    def unavailable_reason(self):
        return None

    def accepts(self, device):
        return device.type == self.device.type

    def sm_count(self, device):
        return kernels._sm_count(device) if device.type == "cuda" else 132

    def function(self, file, name, defines, device):
        return object()

    def launch(self, function, grid, block, shared, stream, params):
        self.launches += 1

    def stream(self, device):
        return kernels._raw_stream(device.index or 0) if device.type == "cuda" else 0


# --- the previous per-call path (sqlab before prepared launches), launch stubbed ------------------

_previous_counters: dict = {}


@functools.lru_cache(maxsize=None)
def _previous_function(file, name, defines):
    return object()  # the previous path's compiled-function cache (an lru_cache lookup per call)


def _previous_devices(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but the other inputs are on {first}")
    return first


def previous_lut_gemv(qweight, lut, x, wbits, in_features, csr=None, bias=None):
    """The previous ``kernels.lut_gemv``, step for step, up to the CuPy launch."""
    out_features = _check_packed(qweight, lut, wbits, in_features)
    x2 = _tokens_2d(x, in_features)
    _check(x2, "x", dtypes=DTYPES)
    tokens = x2.shape[0]
    if not 1 <= tokens <= MAX_GEMV_TOKENS:
        raise ValueError(tokens)
    sparse = csr is not None and csr.nnz > 0
    if sparse:  # the previous _check_csr: shapes and dtypes only
        _check(csr.rows, "rows", dtypes=(torch.int32,), shape=(out_features + 1,))
        nnz = csr.cols.numel()
        _check(csr.cols, "cols", dtypes=(torch.int32,), shape=(nnz,))
        _check(csr.vals, "vals", dtypes=DTYPES, shape=(nnz,))
    if bias is not None:
        _check(bias, "bias", dtypes=DTYPES, shape=(out_features,))
    y_shape = (tokens, out_features) if x.ndim == 2 else (out_features,)
    out = torch.empty(y_shape, dtype=x.dtype, device=x.device)
    device = _previous_devices(
        qweight=qweight,
        lut=lut,
        x=x,
        out=out,
        bias=bias,
        **({"rows": csr.rows, "cols": csr.cols, "vals": csr.vals} if sparse else {}),
    )
    plan = gemv_plan(in_features, out_features, wbits, tokens, x.dtype, sparse, 132)
    partial = counters = None
    if plan.splits > 1:
        partial = torch.empty(
            (plan.splits, tokens, out_features), dtype=torch.float32, device=device
        )
        key = (device, 0)
        counters = _previous_counters.get(key)
        if counters is None or counters.numel() < plan.grid[0]:
            counters = _previous_counters[key] = torch.zeros(
                max(plan.grid[0], 256), dtype=torch.int32, device=device
            )
    rows, cols, vals = (csr.rows, csr.cols, csr.vals) if sparse else (None, None, None)
    _previous_function(
        "lut_gemv.cu", f"lut_gemv_{tokens}", _gemv_defines(wbits, x.dtype, lut, csr, bias)
    )
    args = (
        qweight,
        lut,
        x2,
        rows,
        cols,
        vals,
        bias,
        partial,
        counters,
        out,
        in_features,
        out_features,
        plan.groups_per_block,
    )
    tuple(
        0 if a is None else a.data_ptr() if isinstance(a, torch.Tensor) else numpy.int32(a)
        for a in args
    )
    return out


class PreviousLayer(SqueezeLinear):
    """``SqueezeLinear`` with the previous GPU forward (``kernels.squeeze_linear_forward``)."""

    def forward(self, x):
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(x.shape)
        if x.dtype not in DTYPES:
            raise ValueError(x.dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = previous_lut_gemv(
            self.qweight,
            self.lookup_table,
            x2,
            self.wbits,
            self.in_features,
            csr=self.csr(),
            bias=self.bias,
        )
        return y.reshape(*x.shape[:-1], self.out_features)


def make_layer(cls, density: float, device: torch.device) -> SqueezeLinear:
    out_features, in_features = SHAPE
    gen = torch.Generator().manual_seed(0)
    nnz = round(density * out_features * in_features)
    layer = cls(
        in_features, out_features, 3, nnz, lut_dtype=torch.float16, vals_dtype=torch.float16
    )
    layer.lookup_table.copy_(torch.randn(out_features, 8, generator=gen))
    if nnz:
        csr = to_csr(
            torch.randint(0, out_features, (nnz,), generator=gen),
            torch.randint(0, in_features, (nnz,), generator=gen),
            torch.randn(nnz, generator=gen).half(),
            out_features,
        )
        layer.rows.copy_(csr.rows)
        layer.cols.copy_(csr.cols)
        layer.vals.copy_(csr.vals)
    return layer.to(device)


def per_call_us(layer, x, calls: int, repeat: int) -> tuple[float, float, float]:
    """Median, min and max over ``repeat`` runs of the per-call time (µs) of ``calls`` calls."""
    for _ in range(min(calls, 2000)):  # warm-up: preparation, caches, allocator
        layer(x)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs), min(runs), max(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs (median)")
    parser.add_argument(
        "--json", type=Path, help="write the results here (e.g. out/host_overhead.json)"
    )
    args = parser.parse_args()
    if args.calls < 1 or args.repeat < 1:
        parser.error("--calls and --repeat must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stub = StubBackend(device)
    x = torch.randn(1, SHAPE[1], device=device).half()
    rows = {}
    with torch.inference_mode(), kernels.use_backend(stub):
        for label, cls, density in (
            ("dense", SqueezeLinear, 0.0),
            ("sparse", SqueezeLinear, DENSITY),
            ("baseline", PreviousLayer, 0.0),
            ("baseline_sparse", PreviousLayer, DENSITY),
        ):
            before = stub.launches
            rows[label] = per_call_us(make_layer(cls, density, device), x, args.calls, args.repeat)
            if cls is SqueezeLinear:
                assert stub.launches > before, "the layer did not reach the (stubbed) launch"
    print(
        f"Python time per SqueezeLinear call, launch stubbed: {SHAPE[0]}x{SHAPE[1]} 3-bit, 1 token "
        f"fp16, tensors on {device}; median of {args.repeat} runs of {args.calls} calls (min-max)"
    )
    print(f"{'path':<34} {'µs/call':>8} {'spread':>15} {'vs previous':>12}")
    for label, what, base in (
        ("dense", "prepared (dense-only)", "baseline"),
        ("sparse", f"prepared ({DENSITY:.2%} sparse)", "baseline_sparse"),
        ("baseline", "previous path (dense-only)", None),
        ("baseline_sparse", f"previous path ({DENSITY:.2%} sparse)", None),
    ):
        median, low, high = rows[label]
        ratio = f"{rows[base][0] / median:>11.1f}x" if base else f"{'':>12}"
        print(f"{what:<34} {median:>8.2f} {low:>7.2f}-{high:<7.2f} {ratio}")
    result = {
        "dense_us_per_call": rows["dense"][0],
        "sparse_us_per_call": rows["sparse"][0],
        "baseline_us_per_call": rows["baseline"][0],
        "baseline_sparse_us_per_call": rows["baseline_sparse"][0],
        "spread_us": {k: [v[1], v[2]] for k, v in rows.items()},
        "shape": list(SHAPE),
        "wbits": 3,
        "tokens": 1,
        "device": str(device),
        "calls": args.calls,
        "repeat": args.repeat,
        "torch": torch.__version__,
    }
    if args.json:
        files.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
