"""LUT-GEMV kernels against torch's fp16 matmul at batch 1, on LLaMA-7B/13B layer shapes.

For every shape (out_features x in_features): torch fp16 ``x @ W.T`` (cuBLAS), and our
3-bit and 4-bit LUT-GEMV, dense-only and with a 0.45% sparse part fused in (random
packed weights, LUTs and CSR: speed does not depend on the values). Each kernel is first
checked against a torch reference, then timed in the same run.

Timing: CUDA events around CUDA-graph replays of back-to-back calls that cycle through
enough copies of the weights to exceed the L2 cache several times, so every call reads
its weights from device memory, as a decoding step does, and host launch overhead is not
counted; median of ``--repeat`` replays. "eager µs" is the wall time of one call launched
from Python (the cost a decoding step pays without CUDA graphs).

Bytes per call: packed weights + LUT + CSR + x + y (fp16: W + x + y). GB/s is those
bytes over the time; % peak against the device's memory bandwidth (from its memory
clock and bus width, else a table of known GPUs, or ``--peak-gbps``).

    .venv/bin/python benchmarks/kernels.py [--shapes 7b|13b|all] [--tokens 1,2,4,8] [--repeat 200]
        [--json out/kernels.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sqlab import files

from sqlab.evaluate import cuda_graph_ms, memory_bandwidth

SHAPES = {  # (out_features, in_features): q/k/v/o, gate/up, down
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
}
DENSITY = 0.0045  # the paper's 0.45% sparse part
KNOWN_PEAK_GBPS = {  # memory bandwidth of GPUs whose properties may not report a memory clock
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "RTX A6000": 768,
    "L40S": 864,
    "L4": 300,
    "RTX 4090": 1008,
}


def kernels_missing(script: str) -> bool:
    """Whether sqlab's GPU kernels cannot run here; if so, says why on stderr for ``script``
    (each GPU benchmark then exits 2 with nothing measured).
    """
    from sqlab import kernels

    reason = kernels.unavailable_reason()
    if reason:
        print(f"benchmarks/{script}: {reason}. Nothing was measured.", file=sys.stderr)
    return reason is not None


def peak_bandwidth(props, override: float | None) -> tuple[float | None, str]:
    """Peak memory bandwidth in GB/s and where it came from."""
    if override:
        return override, "--peak-gbps"
    clock_khz, bus_bits = (
        getattr(props, "memory_clock_rate", 0),
        getattr(props, "memory_bus_width", 0),
    )
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width x 2"
    for name, gbps in sorted(KNOWN_PEAK_GBPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in props.name.lower():
            return float(gbps), f"known value for {name}"
    return None, "unknown (pass --peak-gbps)"


def random_packed(out_features: int, in_features: int, wbits: int, density: float, device):
    """Random qweight, fp16 LUT and (with density) a CSR part with fp16 values,
    as a fp16 model stores them.
    """
    from sqlab.packing import packed_rows, to_csr

    qweight = torch.randint(
        -(2**31),
        2**31 - 1,
        (packed_rows(in_features, wbits), out_features),
        dtype=torch.int32,
        device=device,
    )
    lut = (torch.randn(out_features, 2**wbits, device=device) * 0.02).half()
    csr = None
    nnz = round(density * out_features * in_features)
    if nnz:
        rows = torch.randint(0, out_features, (nnz,), device=device)
        cols = torch.randint(0, in_features, (nnz,), device=device)
        csr = to_csr(rows, cols, (torch.randn(nnz, device=device) * 0.1).half(), out_features)
    return qweight, lut, csr


def reference(qweight, lut, csr, x, wbits: int) -> torch.Tensor:
    """``x @ W_hat.T`` with torch ops only (the CPU reference's code, run on the GPU)."""
    from sqlab.packing import reconstruct, unpack

    w = reconstruct(unpack(qweight, wbits, x.shape[-1]), lut, csr, torch.float32)
    return x.float() @ w.T


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_graph(calls: list, repeat: int) -> float:
    """Median µs per call: a CUDA graph of all ``calls`` back to back, replayed ``repeat`` times."""
    return cuda_graph_ms(calls, repeat) * 1e3 / len(calls)


def time_eager(call, repeat: int) -> float:
    """Median µs of one call launched from Python and waited for."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copies_for(bytes_per_call: int, l2_bytes: int) -> int:
    """Weight copies to cycle through so that what one call reads has left the L2 cache."""
    return max(2, min(64, -(-3 * l2_bytes // max(bytes_per_call, 1))))


def fp16_calls(x: torch.Tensor, out_features: int, l2_bytes: int) -> list:
    """Calls of torch's fp16 ``x @ W.T`` that cycle through enough random copies of W for
    each call to read its weights from device memory.
    """
    w = (torch.randn(out_features, x.shape[-1], device=x.device) * 0.02).half()
    weights = [w] + [w.clone() for _ in range(copies_for(nbytes(w), l2_bytes) - 1)]
    outs = [
        torch.empty(x.shape[0], out_features, device=x.device, dtype=torch.float16) for _ in weights
    ]
    return [lambda w=w, o=o: torch.matmul(x, w.T, out=o) for w, o in zip(weights, outs)]


def gemv_calls(first, x: torch.Tensor, l2_bytes: int, splits: int | None = None) -> list:
    """Calls of the prepared layer ``first`` (a ``GemvKernels``) and of layers prepared on
    copies of its weights, enough for each call to read its weights from device memory
    (prepared once per copy, as a SqueezeLinear does: a graph of them holds launches only).
    """
    from sqlab import kernels

    csr = first.csr
    sparse_bytes = nbytes(csr.rows, csr.cols, csr.vals) if csr is not None else 0
    n = copies_for(nbytes(first.qweight, first.lut) + sparse_bytes, l2_bytes)
    layers = [first] + [
        kernels.GemvKernels(
            first.qweight.clone(),
            first.lut.clone(),
            first.wbits,
            first.in_features,
            first.dtype,
            None
            if csr is None
            else type(csr)(csr.rows.clone(), csr.cols.clone(), csr.vals.clone()),
            splits=splits,
        )
        for _ in range(n - 1)
    ]
    outs = [
        torch.empty(x.shape[0], first.out_features, device=x.device, dtype=x.dtype) for _ in layers
    ]
    return [lambda g=g, o=o: g(x, o) for g, o in zip(layers, outs)]


def bench_shape(
    out_features: int,
    in_features: int,
    tokens: int,
    args,
    l2_bytes: int,
    peak: float | None,
    copy_gbps: float,
) -> list[dict]:
    from sqlab import kernels

    device = torch.device("cuda")
    x = torch.randn(tokens, in_features, device=device).half()
    shape = f"{out_features}x{in_features}"
    rows = []

    # torch fp16: the baseline every speed-up refers to
    fp16_bytes = out_features * in_features * 2 + nbytes(x) + tokens * out_features * 2
    calls = fp16_calls(x, out_features, l2_bytes)
    fp16_us = time_graph(calls, args.repeat)
    fp16_eager = time_eager(calls[0], args.repeat)
    rows.append(
        dict(
            shape=shape,
            tokens=tokens,
            kernel="torch fp16 matmul",
            wbits=16,
            sparse_pct=0.0,
            us=fp16_us,
            eager_us=fp16_eager,
            bytes=fp16_bytes,
        )
    )
    del calls

    for wbits in (4, 3):
        for density in (0.0, DENSITY):
            qweight, lut, csr = random_packed(out_features, in_features, wbits, density, device)
            # sanity: the kernel agrees with the torch reference before it is timed
            y = kernels.lut_gemv(qweight, lut, x, wbits, in_features, csr=csr)
            ref = reference(qweight, lut, csr, x, wbits)
            err = (y.float() - ref).abs().max().item()
            tol = 1e-2 * ref.abs().max().item() + 1e-3
            if not err <= tol:
                raise SystemExit(
                    f"{wbits}-bit GEMV {shape}, {tokens} tokens, disagrees with the reference: "
                    f"max error {err:.3g} > {tol:.3g}"
                )
            sparse_bytes = nbytes(csr.rows, csr.cols, csr.vals) if csr is not None else 0
            moved = nbytes(qweight, lut, x) + sparse_bytes + tokens * out_features * 2
            first = kernels.GemvKernels(qweight, lut, wbits, in_features, torch.float16, csr)
            calls = gemv_calls(first, x, l2_bytes)
            try:
                us, timing = time_graph(calls, args.repeat), "graph"
            except RuntimeError as error:  # capture refused: fall back to events around eager calls
                print(
                    f"  (CUDA graph capture failed, timing eager launches: {error})",
                    file=sys.stderr,
                )
                torch.cuda.synchronize()
                us, timing = time_eager(calls[0], args.repeat), "eager"
            rows.append(
                dict(
                    shape=shape,
                    tokens=tokens,
                    kernel=f"LUT-GEMV {wbits}-bit" + (" + 0.45% sparse" if density else ""),
                    wbits=wbits,
                    sparse_pct=density * 100,
                    us=us,
                    eager_us=time_eager(calls[0], args.repeat),
                    bytes=moved,
                    timing=timing,
                )
            )
            del first, calls
    for row in rows:
        row.setdefault("timing", "graph")
        row["gbs"] = row["bytes"] / row["us"] / 1e3
        row["pct_peak"] = 100 * row["gbs"] / peak if peak else float("nan")
        row["pct_measured_peak"] = 100 * row["gbs"] / copy_gbps
        row["speedup_vs_fp16"] = fp16_us / row["us"]
        row["bytes_vs_fp16"] = row["bytes"] / fp16_bytes
    return rows


def _token_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts, got {text!r}"
        ) from None
    if not counts or any(not 1 <= c <= 8 for c in counts):
        raise argparse.ArgumentTypeError(f"token counts must lie in 1..8, got {text!r}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=["7b", "13b", "all"], default="7b")
    parser.add_argument(
        "--tokens", type=_token_counts, default=[1], help="activation rows per call, e.g. 1,2,4,8"
    )
    parser.add_argument(
        "--repeat", type=int, default=200, help="timed graph replays per kernel (median)"
    )
    parser.add_argument("--json", type=Path, help="write the rows here (e.g. out/kernels.json)")
    parser.add_argument("--peak-gbps", type=float, help="the device's peak memory bandwidth, GB/s")
    args = parser.parse_args()
    if kernels_missing("kernels.py"):
        return 2
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    props = torch.cuda.get_device_properties(0)
    peak, source = peak_bandwidth(props, args.peak_gbps)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    # what a memory-bound kernel can attain: a 1 GiB device-to-device copy, read + written
    copy_gbps = memory_bandwidth("cuda", megabytes=1024, repeats=20)
    torch.cuda.empty_cache()
    shapes = SHAPES["7b"] + SHAPES["13b"] if args.shapes == "all" else SHAPES[args.shapes]
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB; "
        "peak bandwidth "
        + (f"{peak:.0f} GB/s ({source})" if peak else source)
        + f"; measured device-to-device copy {copy_gbps:.0f} GB/s (read + write)"
    )
    print(
        f"fp16 activations, {','.join(map(str, args.tokens))} token(s); median of {args.repeat} "
        "CUDA-graph replays (weights cycled past L2)"
    )
    header = (
        f"{'shape (out x in)':<16} {'tokens':>6} {'kernel':<28} {'µs':>8} {'eager µs':>9} "
        f"{'MB read':>8} {'GB/s':>7} {'% peak':>7} {'% copy':>7} {'vs fp16':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    with torch.inference_mode():
        for out_features, in_features in shapes:
            for tokens in args.tokens:
                for row in bench_shape(
                    out_features, in_features, tokens, args, l2_bytes, peak, copy_gbps
                ):
                    rows.append(row)
                    print(
                        f"{row['shape']:<16} {tokens:>6} {row['kernel']:<28} {row['us']:>8.2f} "
                        f"{row['eager_us']:>9.1f} {row['bytes'] / 1e6:>8.2f} {row['gbs']:>7.0f} "
                        f"{row['pct_peak']:>6.1f}% {row['pct_measured_peak']:>6.1f}% "
                        f"{row['speedup_vs_fp16']:>7.2f}x"
                    )
                torch.cuda.empty_cache()
    print(
        "µs: GPU time per call; eager µs: one call from Python including launch overhead; "
        "% peak: of the nominal bandwidth; % copy: of the measured device-to-device copy; "
        "vs fp16: torch fp16 µs / this µs"
    )
    if args.json:
        files.write_json(
            args.json,
            {
                "device": props.name,
                "peak_gbps": peak,
                "peak_source": source,
                "measured_copy_gbps": copy_gbps,
                "repeat": args.repeat,
                "torch": torch.__version__,
                "rows": rows,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
