"""Packed weights on the CPU: GEMV kernels against torch fp32/bf16, and decoding the default model.

GEMV. LLaMA-7B shapes (out x in: 4096x11008, 11008x4096, 4096x4096), each as torch's fp32
and bf16 ``linear`` and as sqlab's CPU LUT-GEMV (``SqueezeLinear``) at 4 bits, 3 bits and
3 bits + 0.45% sparse, batch 1. Every timed call reads its own copy of the weights (enough
copies to exceed twice the last-level cache), so weights stream from memory as in
decoding; warm-up round, median of ``--repeat`` rounds with the spread
(``sqlab.evaluate.gemv_timings``). GB/s: weight bytes read per call / time, beside the
machine's copy bandwidth measured in the same run.

Decoding. The default model (SmolLM2-135M-Instruct), unquantized fp32 and SqueezeLLM
3-bit dense (w3), 3-bit 0.45% + 0.05% (w3s) and 4-bit dense (w4), packed: greedy decoding
at batch 1 (``sqlab.generation_benchmark``: warm-up, median of ``--repeat`` runs), the
resident memory of the decoder linears as decoding holds them (packed buffers plus the
kernel's tables) against their fp32 size, and the process's RSS after loading and at its
peak. Each variant runs in its own process loading a packed checkpoint, so its memory is
its own; checkpoints are quantized once (calibration 16 x 512 tokens of the Shakespeare
calibration plays, cached in data/cache) and kept in data/cache/bench.

    .venv/bin/python benchmarks/cpu_decode.py [--repeat 7] [--tokens 32]
        [--json out/cpu_decode.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from sqlab import files

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]
VARIANTS = {  # label: (wbits, outlier %, sensitive %)
    "w3": (3, 0.0, 0.0),
    "w3s": (3, 0.45, 0.05),
    "w4": (4, 0.0, 0.0),
}
CALIB = dict(calib="shakespeare", nsamples=16, seqlen=512)


def checkpoint(label: str) -> Path:
    """The packed checkpoint of a variant, quantized once
    (Fisher and blocks come from sqlab's cache).
    """
    import sqlab
    from sqlab import experiments
    from sqlab.assets import cache_path

    out = cache_path("bench", f"default-{label}")
    if sqlab.checkpoint.is_checkpoint(out):
        return out
    wbits, outliers, sensitive = VARIANTS[label]
    config = sqlab.QuantConfig(wbits=wbits, outlier_pct=outliers, sensitive_pct=sensitive, **CALIB)
    model, tokenizer = sqlab.load_model("default"), sqlab.load_tokenizer("default")
    experiments.quantize(model, tokenizer, config)
    sqlab.save_quantized(model, out, config.as_dict(), tokenizer)
    return out


def child(spec: str, tokens: int, repeat: int) -> dict:
    """One decoding measurement in this (fresh) process."""
    import sqlab

    model = sqlab.load(spec, device="cpu")
    tokenizer = sqlab.load_tokenizer(spec)
    loaded_rss = _rss_mb()
    bench = sqlab.generation_benchmark(
        model, tokenizer, new_tokens=tokens, repeats=repeat, graph=False
    )
    return {**bench.as_dict(), "loaded_rss_mb": loaded_rss}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def decode(args) -> dict:
    import sqlab
    from sqlab import models

    model = sqlab.load_model("default")
    fp32_bytes = sum(m.weight.numel() * 4 for m in models.quantizable_linears(model).values())
    del model
    specs = {"fp32": "default", **{label: str(checkpoint(label)) for label in VARIANTS}}
    results = {}
    for label, spec in specs.items():
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                spec,
                "--tokens",
                str(args.tokens),
                "--repeat",
                str(args.repeat),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"decoding {label} failed:\n{done.stderr[-3000:]}")
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"fp32_linear_mb": fp32_bytes / 2**20}
    for label, r in results.items():
        out[f"{label}_tokens_per_s"] = r["tokens_per_s"]
        out[f"{label}_ms_per_token"] = r["decode_ms_per_token"]
        out[f"{label}_ms_spread"] = r["decode_ms_spread"]
        out[f"{label}_weights_mb"] = r["linear_weights_mb"]
        out[f"{label}_model_weights_mb"] = r["weights_mb"]
        out[f"{label}_loaded_rss_mb"] = r["loaded_rss_mb"]
        out[f"{label}_peak_rss_mb"] = r["peak_memory_mb"]
    for label in VARIANTS:
        out[f"{label}_speedup"] = out[f"{label}_tokens_per_s"] / out["fp32_tokens_per_s"]
        out[f"{label}_weights_vs_fp32"] = out[f"{label}_weights_mb"] / out["fp32_weights_mb"]
    out["new_tokens"], out["repeat"] = args.tokens, args.repeat
    return out


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [
            tuple(int(v) for v in item.split("x")) for item in text.split(",") if item.strip()
        ]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 4096x11008,576x1536, got {text!r}")
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=7, help="timed rounds / decoding runs (median)"
    )
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per run")
    parser.add_argument(
        "--shapes", type=_shapes, default=SHAPES, help="GEMV shapes, e.g. 4096x11008,576x1536"
    )
    parser.add_argument("--skip-decode", action="store_true", help="only the GEMV table")
    parser.add_argument(
        "--json", type=Path, help="write the results here (e.g. out/cpu_decode.json)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.tokens < 2:
        parser.error("--repeat must be >= 1 and --tokens >= 2")
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.repeat)))
        return 0

    from sqlab import cpu_kernels, evaluate

    reason = cpu_kernels.unavailable_reason()
    if reason:
        print(
            f"benchmarks/cpu_decode.py: the CPU kernel is unavailable: {reason}. "
            "Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    bandwidth = evaluate.memory_bandwidth("cpu")
    llc = evaluate.last_level_cache_bytes()
    vectorized = "AVX-512 VBMI" if cpu_kernels.library().sq_vectorized() else "portable C++"
    print(
        f"CPU: {torch.get_num_threads()} threads, last-level cache {llc / 2**20:.0f} MiB, copy "
        f"bandwidth {bandwidth:.1f} GB/s; sqlab kernel: {vectorized}"
    )
    print(
        f"GEMV at batch 1, weights cycled past the cache; median of {args.repeat} rounds (min-max)"
    )
    rows = evaluate.gemv_timings(args.shapes, repeats=args.repeat)
    header = (
        f"{'shape (out x in)':<16} {'format':<7} {'µs':>9} {'spread':>19} {'GB/s':>6} "
        f"{'vs fp32':>8} {'vs bf16':>8}"
    )
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        part = {r["format"]: r for r in rows if tuple(r["shape"]) == shape}
        for fmt, r in part.items():
            r["speedup_vs_fp32"] = part["fp32"]["us_median"] / r["us_median"]
            r["speedup_vs_bf16"] = part["bf16"]["us_median"] / r["us_median"]
            print(
                f"{f'{shape[0]}x{shape[1]}':<16} {fmt:<7} {r['us_median']:>9.0f} "
                f"{r['us_min']:>9.0f}-{r['us_max']:<9.0f} {r['gbs']:>6.1f} "
                f"{r['speedup_vs_fp32']:>7.2f}x {r['speedup_vs_bf16']:>7.2f}x"
            )
    result = {
        "gemv": rows,
        "copy_gbs": bandwidth,
        "llc_mb": llc / 2**20,
        "threads": torch.get_num_threads(),
        "kernel": vectorized,
        "torch": torch.__version__,
    }
    if not args.skip_decode:
        d = result["decode"] = decode(args)
        print(
            f"\nDecoding the default model, batch 1, {args.tokens} tokens after a short prompt; "
            f"median of {args.repeat} runs (min-max); each variant in its own process"
        )
        header = (
            f"{'model':<7} {'tokens/s':>9} {'ms/token':>9} {'spread':>15} {'speed-up':>9} "
            f"{'linears MB':>11} {'vs fp32':>8} {'RSS MB':>7} {'peak MB':>8}"
        )
        print(header)
        print("-" * len(header))
        for label in ("fp32", *VARIANTS):
            low, high = d[f"{label}_ms_spread"]
            ratio = d[f"{label}_weights_mb"] / d["fp32_weights_mb"]
            print(
                f"{label:<7} {d[f'{label}_tokens_per_s']:>9.1f} {d[f'{label}_ms_per_token']:>9.1f} "
                f"{low:>7.1f}-{high:<7.1f} "
                f"{d['fp32_ms_per_token'] / d[f'{label}_ms_per_token']:>8.2f}x "
                f"{d[f'{label}_weights_mb']:>11.1f} {ratio:>8.3f} "
                f"{d[f'{label}_loaded_rss_mb']:>7.0f} {d[f'{label}_peak_rss_mb']:>8.0f}"
            )
        print(
            "linears MB: the decoder linears as decoding holds them (packed indices, LUTs, sparse "
            "part and the kernel's fp32 tables); RSS: the process after loading; peak: "
            "its peak RSS while decoding"
        )
    if args.json:
        files.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
