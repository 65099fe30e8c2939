"""Perplexity (GPTQ methodology), generation speed and memory.

Perplexity: the evaluation tokens are cut into non-overlapping windows of
``seqlen`` tokens; each window is scored on its own (no context carried over),
and ``ppl = exp(mean token NLL)`` over every predicted token of every window.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SqlabError
from .models import check_seqlen


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    windows: int
    seqlen: int
    tokens: int  # predicted tokens scored

    def as_dict(self) -> dict:
        return asdict(self)


def window_starts(n_tokens: int, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Start offsets of the non-overlapping windows to score.

    With ``max_windows`` smaller than the number of windows, that many windows
    spread evenly over the whole text (first and last included), so a short
    evaluation still sees every part of the corpus.
    """
    total = n_tokens // seqlen
    index = torch.arange(total)
    if max_windows and max_windows < total:
        index = torch.linspace(0, total - 1, max_windows).round().long().unique()
    return index * seqlen


def check_token_ids(model: nn.Module, tokens: torch.Tensor) -> None:
    """Token ids must be integers the model's embedding has rows for."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise SqlabError(f"tokens must be integer token ids, got a {tokens.dtype} tensor")
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        bad = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
        raise SqlabError(f"token id {bad} is out of range: the model's vocabulary has {vocab} "
                         f"tokens (ids 0 to {vocab - 1}); were the tokens made by another model's "
                         "tokenizer?")


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.inference_mode()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 512, *, max_windows: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on 1-D ``tokens`` over non-overlapping ``seqlen`` windows."""
    tokens = tokens.reshape(-1)
    check_seqlen(model, seqlen, tokens.numel(), "the evaluation text")
    check_token_ids(model, tokens)
    device = _device(model)
    batch_size = batch_size or (8 if device.type == "cuda" else 1)
    starts = window_starts(tokens.numel(), seqlen, max_windows)
    windows = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    total_nll, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress, leave=False)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                          reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
        bar.update(len(batch))
    bar.close()
    mean = total_nll / count
    if not math.isfinite(mean):
        raise SqlabError(f"the model's loss is {mean} on this text: its outputs contain NaN or "
                         "Inf, so its weights are damaged; a perplexity cannot be given")
    return Perplexity(ppl=math.exp(mean), nll=mean, windows=len(windows), seqlen=seqlen, tokens=count)


@dataclass(frozen=True)
class GenerationBench:
    device: str
    new_tokens: int
    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    tokens_per_s: float
    weights_mb: float
    peak_memory_mb: float
    peak_memory_kind: str  # what peak_memory_mb measures on this device

    def as_dict(self) -> dict:
        return asdict(self)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed buffers count at their stored size)."""
    seen = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue  # tied weights count once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model: nn.Module, ids: torch.Tensor, n: int) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=model.config.eos_token_id or 0)


@torch.inference_mode()
def generation_benchmark(model: nn.Module, tokenizer, new_tokens: int = 64,
                         prompt: str = "To be, or not to be, that is the question:") -> GenerationBench:
    """Greedy decoding of ``new_tokens`` tokens at batch 1.

    Decode speed excludes the prompt: it is ``(t(N) - t(1)) / (N - 1)``, where
    ``t(n)`` is the wall time of generating ``n`` tokens from the same prompt.
    """
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise SqlabError(f"--tokens must be an integer >= 2, got {new_tokens!r}")
    device = _device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    check_seqlen(model, ids.shape[1] + new_tokens)
    _greedy(model, ids, 2)  # warm-up: allocator, kernels, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}
    for n in (1, new_tokens):
        _sync(device)
        start = time.perf_counter()
        _greedy(model, ids, n)
        _sync(device)
        timings[n] = time.perf_counter() - start
    per_token = (timings[new_tokens] - timings[1]) / (new_tokens - 1)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return GenerationBench(
        device=str(device), new_tokens=new_tokens, prompt_tokens=ids.shape[1],
        prefill_ms=timings[1] * 1e3, decode_ms_per_token=per_token * 1e3,
        tokens_per_s=1.0 / per_token if per_token > 0 else float("inf"),
        weights_mb=weights_bytes(model) / 2**20, peak_memory_mb=peak, peak_memory_kind=kind,
    )


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in seconds after a warm-up, synchronising a GPU."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(device: torch.device | str = "cpu", megabytes: int = 256, repeats: int = 7) -> float:
    """Measured memory bandwidth in GB/s: a large tensor copy (bytes read + bytes written)."""
    device = torch.device(device)
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / seconds / 1e9


def gemv_timings(shapes: list[tuple[int, int]], dtypes=(torch.float32, torch.bfloat16),
                 device: torch.device | str = "cpu", repeats: int = 15) -> list[dict]:
    """Batch-1 matrix-vector products ``(out, in) @ (in,)``: bytes read, median time, GB/s."""
    device = torch.device(device)
    rows = []
    for out_features, in_features in shapes:
        for dtype in dtypes:
            w = torch.randn(out_features, in_features, dtype=dtype, device=device)
            x = torch.randn(1, in_features, dtype=dtype, device=device)
            seconds = _time(lambda: torch.nn.functional.linear(x, w), repeats, device)
            moved = (w.numel() + in_features + out_features) * w.element_size()
            rows.append({"out_features": out_features, "in_features": in_features,
                         "dtype": str(dtype).replace("torch.", ""), "bytes": moved, "seconds": seconds,
                         "gbs": moved / seconds / 1e9, "device": str(device)})
    return rows


def cuda_graph_ms(calls: list, repeat: int = 20, warmup: int = 3) -> float:
    """Median GPU time (ms) of ``calls`` run back to back, captured once as a CUDA graph and replayed.

    The calls are warmed up on the capture stream first (kernels compiled, memory
    allocated); each replay is timed with CUDA events, so host launch overhead is
    not counted.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
