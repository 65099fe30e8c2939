"""Peak resident memory of `sqlab quantize` on the default model: streamed against in memory.

Each run is a fresh process (`sqlab.memory.command_peak_rss`): it imports torch,
transformers and sqlab, reads its resident set (the baseline), then runs the command;
`VmHWM` during the command minus the baseline is what the command needed. The Fisher
information is computed and cached first, so both runs measure quantization alone.
The checkpoints of both runs are compared byte for byte. The target: the streamed run
needs at most 0.4x the fp32 model's size (its model.safetensors).

    .venv/bin/python benchmarks/quantize_memory.py [--wbits 3] [--outlier-pct 0.45]
        [--sensitive-pct 0.05] [--nsamples 16] [--seqlen 512] [--json out/quantize_memory.json]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sqlab
from sqlab import files, memory, models

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wbits", type=int, default=3, choices=(3, 4))
    parser.add_argument("--outlier-pct", type=float, default=0.45)
    parser.add_argument("--sensitive-pct", type=float, default=0.05)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = sqlab.load_model("default", device="cpu")  # the Fisher, cached for both runs
    sqlab.compute_fisher(
        model, sqlab.load_tokenizer("default"), "shakespeare", args.nsamples, args.seqlen
    )
    del model
    fp32 = (models.assets.default_model_dir() / "model.safetensors").stat().st_size
    common = [
        "quantize",
        "--model",
        "default",
        "--wbits",
        str(args.wbits),
        "--outlier-pct",
        str(args.outlier_pct),
        "--sensitive-pct",
        str(args.sensitive_pct),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (("streamed", []), ("in memory", ["--in-memory"])):
            out = Path(tmp) / mode.replace(" ", "_")
            start = time.perf_counter()
            found = memory.command_peak_rss([*common, "--out", str(out), *extra])
            if found.get("status") != 0:
                print(found.get("stderr", "")[-2000:], file=sys.stderr)
                return 1
            rows.append(
                {
                    "mode": mode,
                    "seconds": time.perf_counter() - start,
                    "baseline_mib": found["baseline"] / MIB,
                    "peak_mib": found["peak"] / MIB,
                    "above_baseline_mib": found["above_baseline"] / MIB,
                    "vs_fp32_model": found["above_baseline"] / fp32,
                    "out": out,
                }
            )
        a, b = rows[0]["out"], rows[1]["out"]
        names = sorted(p.name for p in a.iterdir())
        same = names == sorted(p.name for p in b.iterdir()) and all(
            filecmp.cmp(a / n, b / n, shallow=False) for n in names
        )
        for row in rows:
            del row["out"]
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"sqlab quantize on the default model ({fp32 / MIB:.0f} MiB in fp32), {args.wbits}-bit "
        f"{args.outlier_pct}% + {args.sensitive_pct}%, Fisher cached; resident memory above the "
        "process's baseline after imports"
    )
    print(
        f"{'mode':<10} {'baseline MiB':>12} {'peak MiB':>9} {'above MiB':>10} {'x fp32':>7} "
        f"{'s':>6}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['baseline_mib']:>12.0f} {r['peak_mib']:>9.0f} "
            f"{r['above_baseline_mib']:>10.0f} {r['vs_fp32_model']:>7.2f} {r['seconds']:>6.0f}"
        )
    print(f"checkpoints byte-identical: {same}; target for the streamed run: <= 0.40x")
    if args.json:
        files.write_json(args.json, {"fp32_model_mib": fp32 / MIB, "identical": same, "rows": rows})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
