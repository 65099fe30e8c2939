"""Greedy decoding speed of a LLaMA-7B-shaped model: fp16 against SqueezeLLM 4-bit, 3-bit,
3-bit + 0.45% sparse.

The model is built from its config (hidden 4096, MLP 11008, 32 layers, 32 heads, vocabulary
32000) with random fp16 weights, directly on the GPU: no download. The quantized variants
replace every decoder linear with a ``SqueezeLinear`` of random packed indices, random
fp16 LUTs and, for the sparse variant, a random 0.45% CSR part with fp16 values; speed
does not depend on the values. Variants are measured one at a time in the same run.

Decoding runs two ways at batch 1 after a short random prompt. Eager: ``model.generate(
do_sample=False, use_cache=True)``; per-token latency excludes the prompt, ``(t(N) - t(1)) /
(N - 1)`` where ``t(n)`` is the wall time of generating ``n`` tokens (median of ``--repeat``
runs after a warm-up); every token runs ~7 x layers linears launched from Python, so host
overhead is part of the numbers. Graph: one decoding step over a static KV cache captured
as a CUDA graph (``sqlab.evaluate.StaticDecoder``) and replayed per token, which removes
the host work; median of ``--repeat`` runs of ``--tokens`` replays. "linears ms" is the
GPU time of one token's decoder linears alone (a CUDA graph of them), which is what the
kernels change.

    .venv/bin/python benchmarks/generate.py [--layers 32] [--tokens 128] [--json out/generate.json]
        [--profile out/generate-profile.txt]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from sqlab import files
from torch import nn

from sqlab.evaluate import cuda_graph_ms, graph_decoding, greedy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import kernels_missing  # noqa: E402  (benchmarks/kernels.py)

DENSITY = 0.0045
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def build_fp16(layers: int):
    """A LLaMA-7B-shaped model with random fp16 weights, allocated on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def decoder_linears(model) -> dict[str, nn.Module]:
    return {
        f"model.layers.{i}.{name}": model.get_submodule(f"model.layers.{i}.{name}")
        for i in range(model.config.num_hidden_layers)
        for name in LINEARS
    }


def random_squeeze_linear(in_features: int, out_features: int, wbits: int, density: float):
    """A SqueezeLinear of random packed indices, fp16 LUT and fp16 CSR values, on the GPU."""
    from sqlab import SqueezeLinear
    from sqlab.packing import to_csr

    device = torch.device("cuda")
    nnz = round(density * in_features * out_features)
    layer = SqueezeLinear(
        in_features,
        out_features,
        wbits,
        nnz,
        lut_dtype=torch.float16,
        vals_dtype=torch.float16,
        device=device,
    )
    layer.qweight.copy_(
        torch.randint(-(2**31), 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=device)
    )
    layer.lookup_table.copy_(torch.randn(out_features, 2**wbits, device=device) * 0.02)
    if nnz:
        csr = to_csr(
            torch.randint(0, out_features, (nnz,), device=device),
            torch.randint(0, in_features, (nnz,), device=device),
            (torch.randn(nnz, device=device) * 0.05).half(),
            out_features,
        )
        layer.rows.copy_(csr.rows)
        layer.cols.copy_(csr.cols)
        layer.vals.copy_(csr.vals)
    return layer


def quantize_randomly(model, wbits: int, density: float) -> None:
    """Replace every decoder linear (nn.Linear or an earlier SqueezeLinear) in place,
    one at a time.
    """
    for name in list(decoder_linears(model)):  # names only: no reference keeps an old layer alive
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        in_features, out_features = (
            getattr(owner, child).in_features,
            getattr(owner, child).out_features,
        )
        setattr(owner, child, None)  # free the old weights before allocating the new ones
        setattr(owner, child, random_squeeze_linear(in_features, out_features, wbits, density))
    torch.cuda.empty_cache()


def linear_bytes(model) -> int:
    """Bytes of the decoder linears' weights as stored (packed: indices + LUT + CSR)."""
    total = 0
    for module in decoder_linears(model).values():
        total += sum(
            t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
        )
    return total


def all_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def linears_ms(model, repeat: int = 20) -> float:
    """GPU time (ms) of one decoding token's decoder linears, replayed as one CUDA graph."""
    modules = list(decoder_linears(model).values())
    inputs = [torch.randn(1, m.in_features, device="cuda", dtype=torch.float16) for m in modules]
    return cuda_graph_ms([lambda m=m, x=x: m(x) for m, x in zip(modules, inputs)], repeat, warmup=1)


def profile_step(model, label: str, path: Path) -> None:
    """Append where one eager decoding token's time goes
    (torch profiler, kernels by GPU time) to ``path``.
    """
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    greedy(model, ids, 2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        greedy(model, ids, 9)  # the prompt and 8 decoded tokens
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70
    )
    with path.open("a") as f:
        f.write(
            f"== {label}: generate() of 9 tokens after a 16-token prompt (eager) ==\n{table}\n\n"
        )


@torch.inference_mode()
def measure(model, label: str, args, fp16_linear_bytes: int) -> dict:
    ids = torch.randint(
        3, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    ).cuda()
    out = greedy(model, ids, 2)  # warm-up: kernels compiled, allocator and caches filled
    assert out.shape == (1, args.prompt + 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t1 = statistics.median(timed(lambda: greedy(model, ids, 1)) for _ in range(args.repeat))
    tn = statistics.median(
        timed(lambda: greedy(model, ids, args.tokens)) for _ in range(args.repeat)
    )
    per_token = (tn - t1) / (args.tokens - 1)
    graph_ms, graph_spread, graph_note = graph_decoding(model, ids, args.tokens, args.repeat)
    if graph_ms is None:
        print(f"  ({label}: {graph_note})", file=sys.stderr)
    try:
        lin = linears_ms(model)
    except RuntimeError as error:  # a refused capture should not cost the whole run
        print(f"  ({label}: CUDA graph of the linears failed: {error})", file=sys.stderr)
        lin = float("nan")
    weights = linear_bytes(model)
    if args.profile:
        profile_step(model, label, args.profile)
    return dict(
        label=label,
        device=torch.cuda.get_device_name(),
        layers=model.config.num_hidden_layers,
        prompt_tokens=args.prompt,
        new_tokens=args.tokens,
        prefill_ms=t1 * 1e3,
        decode_ms_per_token=per_token * 1e3,
        tokens_per_s=1 / per_token,
        graph_decode_ms_per_token=graph_ms,
        graph_decode_ms_spread=graph_spread,
        graph_tokens_per_s=1e3 / graph_ms if graph_ms else None,
        linears_ms_per_token=lin,
        weights_mb=all_bytes(model) / 2**20,
        linear_weights_mb=weights / 2**20,
        linear_weights_vs_fp16=weights / fp16_linear_bytes,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers",
        type=int,
        default=32,
        help="decoder layers (32 is LLaMA-7B; fewer for a quick run)",
    )
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed generations per length (median)"
    )
    parser.add_argument("--json", type=Path, help="write the rows here (e.g. out/generate.json)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="write each variant's torch-profiler table of a few eager "
        "decoding tokens here (kernels sorted by GPU time)",
    )
    args = parser.parse_args()
    if args.profile:
        args.profile.write_text("")
    if args.layers < 1 or args.tokens < 2 or args.prompt < 1 or args.repeat < 1:
        parser.error("--layers, --prompt and --repeat must be >= 1 and --tokens >= 2")
    if kernels_missing("generate.py"):
        return 2

    print(
        f"device: {torch.cuda.get_device_name()}; LLaMA-7B shapes, {args.layers} layers, random "
        f"weights; batch 1, prompt {args.prompt} tokens, {args.tokens} new tokens (greedy), "
        f"median of {args.repeat}"
    )
    model = build_fp16(args.layers)
    fp16_bytes = linear_bytes(model)
    rows = [measure(model, "fp16", args, fp16_bytes)]
    for label, wbits, density in (
        ("4-bit", 4, 0.0),
        ("3-bit", 3, 0.0),
        ("3-bit + 0.45% sparse", 3, DENSITY),
    ):
        quantize_randomly(
            model, wbits, density
        )  # the previous variant's linears are freed as they go
        gc.collect()
        rows.append(measure(model, label, args, fp16_bytes))
    base = rows[0]["decode_ms_per_token"]
    graph_base = rows[0]["graph_decode_ms_per_token"]
    header = (
        f"{'variant':<22} {'tokens/s':>9} {'ms/token':>9} {'speed-up':>9} {'graph tok/s':>11} "
        f"{'graph ms':>9} {'speed-up':>9} {'linears ms':>10} {'linear MB':>10} {'vs fp16':>8} "
        f"{'weights MB':>10} {'peak MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        row["speedup_vs_fp16"] = base / row["decode_ms_per_token"]
        graph = row["graph_decode_ms_per_token"]
        row["graph_speedup_vs_fp16"] = graph_base / graph if graph and graph_base else None
        graph_cells = (
            f"{row['graph_tokens_per_s']:>11.1f} {graph:>9.2f} "
            f"{row['graph_speedup_vs_fp16']:>8.2f}x"
            if row["graph_speedup_vs_fp16"]
            else f"{'-':>11} {'-':>9} {'-':>9}"
        )
        print(
            f"{row['label']:<22} {row['tokens_per_s']:>9.1f} {row['decode_ms_per_token']:>9.2f} "
            f"{row['speedup_vs_fp16']:>8.2f}x {graph_cells} {row['linears_ms_per_token']:>10.2f} "
            f"{row['linear_weights_mb']:>10.0f} {row['linear_weights_vs_fp16']:>8.3f} "
            f"{row['weights_mb']:>10.0f} {row['peak_memory_mb']:>9.0f}"
        )
    print(
        "ms/token: wall time per decoded token, eager generate() (host overhead included); graph: "
        "one captured decoding step replayed per token (static KV cache); linears ms: GPU time of "
        "one token's decoder linears in a CUDA graph; linear MB: decoder linear weights as stored "
        "(vs fp16 ~ bits/16 + LUT + CSR); weights MB: the whole model incl. "
        "embeddings and lm_head; peak MB: torch's peak allocated memory"
    )
    if args.json:
        files.write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
