"""Sweep the LUT-GEMV's tile (columns per block, thread rows, load depth, K slices) on a GPU.

For every candidate ``GemvConfig`` and K split, on LLaMA-7B layer shapes at 1/4/8 tokens,
3 and 4 bits, dense: the kernel is checked against the torch reference, then timed as
benchmarks/kernels.py times it (CUDA-graph replays cycling weight copies past L2,
median). Prints the best few per (bits, tokens) and writes every row with ``--json``;
sqlab/kernels.py's ``_PAIRS`` table is chosen from this output.

    .venv/bin/python benchmarks/tune_gemv.py [--tokens 1,4,8] [--bits 3,4] [--bn 32,64,128]
        [--ky 2,4,8] [--depth 2,4,8] [--splits 1,2,3,4,6,8] [--repeat 30]
        [--json out/tune_gemv.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from sqlab import SqlabError, files, kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import gemv_calls, kernels_missing, random_packed, reference, time_graph  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096)]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def candidates(wbits: int, args):
    for bn, ky, depth in itertools.product(ints(args.bn), ints(args.ky), ints(args.depth)):
        config = kernels.GemvConfig(
            bn=bn, ky=ky, tuple=2, depth=depth, blocks_per_sm=4, min_groups=ky
        )
        if bn * (ky + 1) <= 1024 and config.table_bytes(wbits) <= 40 * 1024:
            yield config


def time_config(config, wbits: int, n: int, k: int, tokens: int, splits: int, args, l2: int):
    qweight, lut, _ = random_packed(n, k, wbits, 0.0, "cuda")
    x = torch.randn(tokens, k, device="cuda").half()
    with kernels.gemv_config_override(config):
        try:
            first = kernels.GemvKernels(qweight, lut, wbits, k, torch.float16, splits=splits)
        except SqlabError:  # the tile does not fit shared memory at some token count
            return None
        if first._launches[tokens].plan.splits != splits:
            return None  # shared memory forced another split: measured under that split already
        y = first(x)
        ref = reference(qweight, lut, None, x, wbits)
        err = (y.float() - ref).abs().max().item()
        if not err <= 1e-2 * ref.abs().max().item() + 1e-3:
            raise SystemExit(f"{config} {wbits}-bit {n}x{k} {tokens} tokens: max error {err:.3g}")
        calls = gemv_calls(first, x, l2, splits)  # the copies too under the tile in test
    return time_graph(calls, args.repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,4,8")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--splits", default="1,2,3,4,6,8")
    parser.add_argument("--bn", default="32,64,128", help="output columns per block")
    parser.add_argument("--ky", default="2,4,8", help="thread rows per block")
    parser.add_argument("--depth", default="2,4,8", help="groups loaded ahead per thread")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if kernels_missing("tune_gemv.py"):
        return 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    with torch.inference_mode():
        for wbits in ints(args.bits):
            for tokens in ints(args.tokens):
                for config in candidates(wbits, args):
                    total, best = 0.0, []
                    for n, k in SHAPES:
                        times = {
                            s: time_config(config, wbits, n, k, tokens, s, args, l2)
                            for s in ints(args.splits)
                        }
                        times = {s: t for s, t in times.items() if t is not None}
                        if not times:  # every split was forced to another by shared memory
                            times = {0: float("nan")}
                        split = min(times, key=times.get)
                        best.append((split, times[split]))
                        rows.append(
                            dict(
                                wbits=wbits,
                                tokens=tokens,
                                shape=f"{n}x{k}",
                                bn=config.bn,
                                ky=config.ky,
                                depth=config.depth,
                                us_by_splits=times,
                            )
                        )
                        total += times[split]
                    print(
                        f"{wbits}-bit {tokens} tok bn {config.bn:>3} ky {config.ky} depth "
                        f"{config.depth}: "
                        + "  ".join(f"{t:6.2f}us/s{s}" for s, t in best)
                        + f"  sum {total:7.2f}",
                        flush=True,
                    )
                torch.cuda.empty_cache()
    if args.json:
        files.write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
