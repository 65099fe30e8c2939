"""How long a new point of the sweep panel takes: quantized, a first estimate, the final perplexity.

Setup, not timed (a running sweep panel has all of it): the default model in a ``Sweeper``
(the panel's engine), its Fisher information (computed once, then from the cache), its
outlier profile, the compiled CPU kernels, and one warm-up point of other settings. The
result and window caches are cold: every run uses an empty data directory that shares only
the model, corpus, token, Fisher and compiled-kernel caches.

Timed: a new SqueezeLLM 3-bit 0.45% + 0.05% point through ``Sweeper.run_point``, as the panel
runs it (simulate mode, 32 windows of 512 tokens):

- ``quantize_s``: until the model holds the quantized weights;
- ``first_estimate_s``: until the first perplexity estimate with a 95% interval (two windows);
- ``final_32_windows_s``: until all 32 windows are in.

Median of ``--repeat`` runs (min-max spread). Targets on 2 cores: quantize <= 4 s, first
estimate <= 8 s, final <= 35 s.

    .venv/bin/python benchmarks/point_latency.py [--repeat 3] [--json out/point_latency.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlab
from sqlab import assets, experiments, files

SHARED = ("models", "corpora", "tokens", "fisher", "downloads", "cpu_kernels")
TARGETS = {"quantize_s": 4.0, "first_estimate_s": 8.0, "final_32_windows_s": 35.0}


def cold_data_dir(root: Path) -> Path:
    """A data directory with the shared caches linked in and no results, windows or blocks."""
    cache = root / "cache"
    cache.mkdir(parents=True)
    for name in SHARED:
        source = assets.data_dir() / "cache" / name
        if source.exists():
            (cache / name).symlink_to(source.resolve())
    return root


def one_point(sweeper, config) -> dict[str, float]:
    marks = {}
    quantize = experiments.quantize

    def timed_quantize(*args, **kwargs):
        report = quantize(*args, **kwargs)
        marks.setdefault("quantize_s", time.perf_counter() - start)
        return report

    def on_estimate(dataset, estimate, row):
        if math.isfinite(estimate.high):
            marks.setdefault("first_estimate_s", time.perf_counter() - start)

    experiments.quantize = timed_quantize
    try:
        start = time.perf_counter()
        row = sweeper.run_point(config, on_estimate=on_estimate)
        marks["final_32_windows_s"] = time.perf_counter() - start
    finally:
        experiments.quantize = quantize
    if row.get("cached"):
        raise SystemExit("the point came from the cache; the caches were meant to be cold")
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    parser.add_argument(
        "--json", type=Path, help="write the results here (e.g. out/point_latency.json)"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    config = sqlab.QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    sweeper = experiments.Sweeper(
        "default", experiments.EvalSettings(("shakespeare",), 512, 32), progress=False
    )
    sweeper.fisher(config)
    profile = sweeper.profile()
    runs = []
    previous = os.environ.get("SQLAB_DATA_DIR")
    warm_up = sqlab.QuantConfig(wbits=3, outlier_pct=0.40, sensitive_pct=0.05)
    try:
        for config_now in [warm_up] + [config] * args.repeat:
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["SQLAB_DATA_DIR"] = str(cold_data_dir(Path(tmp) / "data"))
                profile._solved.clear()  # the outlier range is part of a new point's work
                runs.append(one_point(sweeper, config_now))
        runs = runs[1:]  # the warm-up's times are not reported
    finally:
        if previous is None:
            os.environ.pop("SQLAB_DATA_DIR", None)
        else:
            os.environ["SQLAB_DATA_DIR"] = previous
    result = {}
    print(
        f"a new {config.label()} point on the default model, 32 windows of 512 tokens, cold result "
        f"cache; median of {args.repeat} runs (min-max)"
    )
    for key, target in TARGETS.items():
        values = [r[key] for r in runs]
        median = statistics.median(values)
        result[key] = median
        result[key.replace("_s", "_spread_s")] = [min(values), max(values)]
        verdict = "met" if median <= target else "MISSED"
        print(
            f"{key:<20} {median:>7.2f} s  ({min(values):.2f}-{max(values):.2f})  target <= "
            f"{target:g} s: {verdict}"
        )
    if args.json:
        files.write_json(args.json, {**result, "runs": runs, "config": config.label()})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
