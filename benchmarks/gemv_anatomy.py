"""Where a LUT-GEMV call's time goes: the kernel timed with one phase taken out at a time.

Each variant is kernels/lut_gemv.cu with one edit, compiled into a temporary folder:
``no staging`` skips filling the centroid table (its lookups then read whatever shared
memory holds), ``no decoding`` replaces the lookups and fp16 sums by one xor of the loaded
words (the loads stay), ``no combine`` returns once the block's partial sums are written
(no counter, no last-block sum) and ``empty`` returns at once (the launch alone). Only the
full kernel computes y; the others are for timing. Also timed: the full kernel at 1/2/4/8
K slices, and torch's fp16 matmul. Shapes: LLaMA-7B's, 3-bit, 1 token; timed as
benchmarks/kernels.py times (CUDA-graph replays cycling weight copies past L2, median).

    python3 benchmarks/gemv_anatomy.py [--repeat 100] [--json out/gemv_anatomy.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from sqlab import files, kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import (  # noqa: E402  (benchmarks/kernels.py)
    fp16_calls,
    gemv_calls,
    kernels_missing,
    random_packed,
    reference,
    time_graph,
)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
STAGING = "  {\n    // every thread fills entries"
AFTER_STAGING = "  }\n  for (int i = tid; i < B * L; i += nthreads) {"
DECODE = "if (gd < g1) decode_group<B>(cur[d], tbase, tx << 2, xs + (gd - g0) * GROUP, L, acc);"
XOR = "if (gd < g1) acc[0] += __uint_as_float((cur[d][0] ^ cur[d][WBITS - 1]) & 0x3fffffffu);"
TOP = "  __shared__ bool last;\n"


def edited(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"lut_gemv.cu has changed: {old!r} is not there exactly once")
    return text.replace(old, new)


def variants(source: str) -> dict[str, str]:
    no_staging = edited(source, STAGING, "#if 0\n" + STAGING)
    return {
        "full": source,
        "no staging": edited(no_staging, AFTER_STAGING, "  }\n#endif" + AFTER_STAGING[3:]),
        "no decoding": edited(source, DECODE, XOR),
        "no combine": edited(source, "  if (!split) return;", "  return;"),
        "empty": edited(source, TOP, TOP + "  if (K > 0) return;\n"),
    }


def time_layer(wbits, n, k, splits, repeat, l2, check):
    qweight, lut, _ = random_packed(n, k, wbits, 0.0, "cuda")
    x = torch.randn(1, k, device="cuda").half()
    first = kernels.GemvKernels(qweight, lut, wbits, k, torch.float16, splits=splits)
    if check:
        ref = reference(qweight, lut, None, x, wbits)
        err = ((first(x).float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise SystemExit(f"{n}x{k}: relative error {err:.3g} against the reference")
    return time_graph(gemv_calls(first, x, l2, splits), repeat), first._launches[1].plan.splits


def fp16_us(n, k, repeat, l2):
    return time_graph(fp16_calls(torch.randn(1, k, device="cuda").half(), n, l2), repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--wbits", type=int, default=3, choices=(3, 4))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if kernels_missing("gemv_anatomy.py"):
        return 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    source = (kernels.KERNEL_DIR / "lut_gemv.cu").read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folders = {}
        for i, (name, text) in enumerate(variants(source).items()):
            folders[name] = Path(tmp) / f"v{i}"
            folders[name].mkdir()
            (folders[name] / "lut_gemv.cu").write_text(text)
            (folders[name] / "numeric.cuh").write_text(
                (kernels.KERNEL_DIR / "numeric.cuh").read_text()
            )
        original = kernels.KERNEL_DIR
        try:
            for n, k in SHAPES:
                shape = f"{n}x{k}"
                rows.append(
                    dict(shape=shape, variant="torch fp16", us=fp16_us(n, k, args.repeat, l2))
                )
                runs = [(name, None) for name in folders] + [("full", s) for s in (1, 2, 4, 8)]
                for name, splits in runs:
                    kernels.KERNEL_DIR = folders[name]
                    kernels._source.cache_clear()
                    kernels._cuda_function.cache_clear()
                    us, used = time_layer(
                        args.wbits, n, k, splits, args.repeat, l2, check=name == "full"
                    )
                    label = name if splits is None else f"full, {splits} K slices"
                    rows.append(dict(shape=shape, variant=label, splits=used, us=us))
        finally:
            kernels.KERNEL_DIR = original
            kernels._source.cache_clear()
            kernels._cuda_function.cache_clear()
    print(f"{torch.cuda.get_device_name()}: {args.wbits}-bit LUT-GEMV, 1 token, median µs")
    print(f"{'shape':<12} {'variant':<22} {'slices':>6} {'µs':>8}")
    for row in rows:
        print(
            f"{row['shape']:<12} {row['variant']:<22} {row.get('splits', ''):>6} {row['us']:8.2f}"
        )
    if args.json:
        files.write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
