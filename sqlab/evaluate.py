"""Perplexity (GPTQ methodology), generation speed and memory.

Perplexity: the evaluation tokens are cut into non-overlapping windows of
``seqlen`` tokens; each window is scored on its own (no context carried over),
and ``ppl = exp(mean token NLL)`` over every predicted token of every window.
"""

from __future__ import annotations

import inspect
import math
import resource
import statistics
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SqlabError
from .models import check_seqlen, decoder_blocks
from .threads import side_by_side


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
        raise SqlabError(
            f"token id {bad} is out of range: the model's vocabulary has {vocab} "
            f"tokens (ids 0 to {vocab - 1}); were the tokens made by another model's "
            "tokenizer?"
        )


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@dataclass(frozen=True)
class Estimate:
    """Perplexity from the windows scored so far, with a 95% interval for the full set of windows.

    Windows are scored in an order that spreads them over the text, so the first few
    stand for all of it. The interval treats the scored windows as a sample of the
    windows to score: ``exp(mean NLL ± 1.96 · standard error)``, the standard error
    from the spread of the windows' mean NLLs with a finite-population correction, so
    it closes on the final value when every window is in (and is unknown, 0 to inf,
    with fewer than two).
    """

    ppl: float
    low: float
    high: float
    nll: float  # mean NLL per predicted token so far
    windows: int  # windows scored so far
    total: int  # windows to score
    tokens: int  # predicted tokens scored so far

    @property
    def final(self) -> bool:
        return self.windows == self.total


def spread_order(n: int) -> list[int]:
    """``range(n)`` in an order whose every prefix is spread over the range (bit-reversal order)."""
    bits = max(1, (n - 1).bit_length())
    return [
        i for i in sorted(range(1 << bits), key=lambda v: int(f"{v:0{bits}b}"[::-1], 2)) if i < n
    ]


def _estimate(scores: list[tuple[float, int]], total: int) -> Estimate:
    nll_sum, count = sum(s for s, _ in scores), sum(c for _, c in scores)
    mean, n = nll_sum / count, len(scores)
    if not math.isfinite(mean):
        raise SqlabError(
            f"the model's loss is {mean} on this text: its outputs contain NaN or "
            "Inf, so its weights are damaged; a perplexity cannot be given"
        )
    low, high = 0.0, math.inf
    if n >= 2:
        means = [s / c for s, c in scores]
        centre = sum(means) / n
        spread = math.sqrt(sum((m - centre) ** 2 for m in means) / (n - 1))
        stderr = spread / math.sqrt(n) * math.sqrt(max(0.0, 1 - n / total))
        low, high = math.exp(mean - 1.96 * stderr), math.exp(mean + 1.96 * stderr)
    return Estimate(math.exp(mean), low, high, mean, n, total, count)


# causal LMs whose logits are exactly ``lm_head(base_model(ids))``: nothing scales or caps them
PLAIN_HEADS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "OPTForCausalLM"})


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output layer, where the windows can be scored through it a slice at a time."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        type(model).__name__ not in PLAIN_HEADS
        or type(head) is not nn.Linear
        or getattr(model, "hf_device_map", None)  # accelerate moves tensors in its hooks
    ):
        return None
    return head


def head_chunk(device: torch.device) -> int:
    """Vocabulary entries per slice of the output layer: on the CPU a 512-token window's
    logits of a slice (2 MiB) stay in cache; a GPU takes larger slices in fewer launches."""
    return 1024 if device.type == "cpu" else 16384


@torch.inference_mode()
def window_nll(model: nn.Module, batch: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed NLL of each window's next-token predictions: ``batch`` (windows, seqlen) ->
    (windows,) float32.

    The log-softmax needs every logit, but never all at once: for the plain causal LMs
    (``PLAIN_HEADS``) the output layer runs over ``chunk`` vocabulary entries at a time,
    keeping each slice's log-sum-exp and the targets' logits. On 2 CPU cores a window of the
    default model takes 3-6% less time than through the whole (windows, seqlen, vocab) logits
    tensor and its log-softmax (alternating runs), with the same values to float rounding.
    Other models go through their own ``forward``.
    """
    targets = batch[:, 1:].reshape(-1)  # (windows·(seqlen - 1),)
    head = _plain_head(model)
    if head is None:
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets, reduction="none"
        )
        return nll.reshape(len(batch), -1).sum(1)
    hidden = model.base_model(batch, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (windows·(seqlen - 1), hidden)
    chunk = chunk or head_chunk(hidden.device)
    vocab = head.weight.shape[0]
    sums = []  # per slice: (rows,) log-sum-exp of its logits
    picked = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        bias = head.bias[start:stop] if head.bias is not None else None
        logits = nn.functional.linear(hidden, head.weight[start:stop], bias).float()
        sums.append(logits.logsumexp(1))
        inside = (targets >= start) & (targets < stop)
        at = (targets - start).clamp(0, stop - start - 1)[:, None]
        picked = torch.where(inside, logits.gather(1, at)[:, 0], picked)
    nll = torch.stack(sums, 1).logsumexp(1) - picked
    return nll.reshape(len(batch), -1).sum(1)


@torch.inference_mode()
def perplexity_estimates(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 512,
    *,
    max_windows: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    scored: dict[int, tuple[float, int]] | None = None,
    on_window=None,
    progress: bool = True,
):
    """Score the windows of ``perplexity`` progressively, yielding an ``Estimate`` after each batch.

    ``batch_size`` windows go through the model at once, and ``workers`` batches side by
    side in threads of their own that share torch's threads. By default a GPU takes 8
    windows at once in this thread, and the CPU one window in each of as many threads as
    torch has, one torch thread each: no thread then waits for the others at every
    operator (on 2 cores a 512-token window of the default model takes about 4% less time
    than two windows at once on 2 torch threads, measured alternating).

    ``scored`` maps window starts already scored to their ``(NLL sum, tokens)``: they
    count without being computed again. ``on_window(start, nll_sum, tokens)`` is called
    for every window this call scores (to cache it). The last estimate is the result.
    """
    tokens = tokens.reshape(-1)
    check_seqlen(model, seqlen, tokens.numel(), "the evaluation text")
    check_token_ids(model, tokens)
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if value is not None and (type(value) is bool or not isinstance(value, int) or value < 1):
            raise SqlabError(f"{name} must be a positive integer (or None), got {value!r}")
    device = _device(model)
    on_cpu = device.type == "cpu"
    batch_size = batch_size or (1 if on_cpu else 8)
    starts = window_starts(tokens.numel(), seqlen, max_windows).tolist()
    order = [starts[i] for i in spread_order(len(starts))]
    done = {s: scored[s] for s in order if scored and s in scored}
    todo = [s for s in order if s not in done]
    if done:
        yield _estimate(list(done.values()), len(starts))
    parts = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    workers = min(workers or (torch.get_num_threads() if on_cpu else 1), max(1, len(parts)))

    def score(part: list[int]) -> list[float]:
        batch = torch.stack([tokens[s : s + seqlen] for s in part]).to(device)
        return window_nll(model, batch).tolist()

    bar = tqdm(total=len(todo), desc="perplexity", unit="window", disable=not progress, leave=False)
    with closing(side_by_side(score, parts, workers)) as scores:
        for part, nll in zip(parts, scores):
            for start, value in zip(part, nll):
                done[start] = (value, seqlen - 1)
                if on_window is not None:
                    on_window(start, value, seqlen - 1)
            bar.update(len(part))
            yield _estimate(list(done.values()), len(starts))
    bar.close()


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 512,
    *,
    max_windows: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` on 1-D ``tokens`` over non-overlapping ``seqlen`` windows
    (``batch_size`` and ``workers`` as for ``perplexity_estimates``)."""
    last = None
    for last in perplexity_estimates(
        model,
        tokens,
        seqlen,
        max_windows=max_windows,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    ):
        pass
    return Perplexity(
        ppl=last.ppl, nll=last.nll, windows=last.total, seqlen=seqlen, tokens=last.tokens
    )


@dataclass(frozen=True)
class GenerationBench:
    device: str
    new_tokens: int
    prompt_tokens: int
    repeats: int  # timed runs after a warm-up; times are their median
    prefill_ms: float
    decode_ms_per_token: float  # eager: the Hugging Face generate() loop
    decode_ms_spread: list[float]  # [min, max] over the runs
    tokens_per_s: float
    graph_decode_ms_per_token: float | None  # one CUDA graph replayed per token (static KV cache)
    graph_decode_ms_spread: list[float] | None
    graph_tokens_per_s: float | None
    graph_note: str  # why the graph column is empty, or what it measured
    weights_mb: float
    linear_weights_mb: float  # the decoder linears as decoding holds them (packed + kernel tables)
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


def greedy(model: nn.Module, ids: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
    """``model.generate`` of exactly ``n`` new tokens, greedy, after the prompt ``ids`` (1, T)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=model.config.eos_token_id or 0,
        streamer=streamer,
    )


class _TokenClock:
    """A ``generate()`` streamer that notes when each new token is ready
    (the prompt comes first).
    """

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed_generation(model: nn.Module, ids: torch.Tensor, n: int) -> tuple[float, float]:
    """One greedy generation of ``n`` tokens: (prefill ms, mean ms per token after the first).

    The streamer stamps every token as ``generate()`` emits it, so the decoding rate is
    measured within one run, without subtracting two noisy runs.
    """
    clock = _TokenClock(ids.device)
    _sync(ids.device)
    start = time.perf_counter()
    greedy(model, ids, n, clock)
    stamps = clock.times[1:]  # the first put() is the prompt
    return (stamps[0] - start) * 1e3, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which unlike ru_maxrss restarts at exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _forward_names(model: nn.Module) -> tuple[str, bool]:
    """The model's keyword for its KV cache, and whether it takes ``cache_position``."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def _static_cache(model: nn.Module, max_len: int, device: torch.device, dtype: torch.dtype):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": model.config, "max_cache_len": max_len}
    for name, value in (
        ("max_batch_size", 1),
        ("batch_size", 1),
        ("device", device),
        ("dtype", dtype),
    ):
        if name in params:  # older transformers size and place the cache up front
            kwargs[name] = value
    return StaticCache(**kwargs)


class StaticDecoder:
    """Greedy decoding at batch 1 over a static KV cache, one token per ``step()``.

    A step reads and writes only buffers that keep their addresses (the last token, its
    position, the cache, the output row), so on a GPU it can be captured once as a CUDA
    graph and replayed for every token (``capture()``); SqueezeLinear launches inside the
    capture get split-K counters of the graph's own. Without a capture each step runs
    eagerly, the same code.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int):
        self.model, self.device = model, prompt.device
        self.cache_kw, self.takes_position = _forward_names(model)
        dtype = next(iter(model.parameters())).dtype
        self.cache = _static_cache(model, prompt.shape[1] + new_tokens, self.device, dtype)
        self.out = torch.zeros(new_tokens, dtype=torch.long, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.arena = None
        with torch.inference_mode():
            position = torch.arange(prompt.shape[1], device=self.device)
            logits = self._forward(prompt, position[None])
            self.token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            self.position = torch.full(
                (1, 1), prompt.shape[1], dtype=torch.long, device=self.device
            )
            self.out[0] = self.token[0, 0]
            self.step_index.fill_(1)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_kw: self.cache, "position_ids": position_ids, "use_cache": True}
        if self.takes_position:
            kwargs["cache_position"] = position_ids[0]
        return self.model(ids, **kwargs).logits

    def _eager_step(self) -> None:
        logits = self._forward(self.token, self.position)
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.out.index_copy_(0, self.step_index, self.token[0])
        self.position.add_(1)
        self.step_index.add_(1)

    def step(self) -> None:
        """Decode one more token (asynchronous on a GPU: synchronise before reading ``tokens``)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._eager_step()

    def capture(self, warmup: int = 2) -> None:
        """Run ``warmup`` steps on a side stream (kernels prepared, caches filled),
        then capture one step.
        """
        from . import kernels

        if self.device.type != "cuda":
            raise SqlabError("CUDA graphs need the model on a CUDA GPU")
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                self._eager_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.arena = kernels.CounterArena(self.device)
        graph = torch.cuda.CUDAGraph()
        with (
            torch.inference_mode(),
            kernels.capture_scope(self.arena),
            torch.cuda.graph(graph, stream=stream),
        ):
            self._eager_step()
        self.graph = graph

    @property
    def tokens(self) -> torch.Tensor:
        """The tokens decoded so far (the prefill's first one included), on the CPU."""
        return self.out[: int(self.step_index)].cpu()


def _median_spread(values: list[float]) -> tuple[float, list[float]]:
    """The median and the [min, max] of repeated measurements."""
    return statistics.median(values), [min(values), max(values)]


def graph_decoding(model: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int):
    """Per-token ms of CUDA-graph decoding (median, spread), or None and why not."""
    if ids.device.type != "cuda":
        return None, None, "CUDA graphs need a GPU; this run is on the CPU"
    warmup = 2
    times = []
    try:
        for _ in range(repeats):
            decoder = StaticDecoder(model, ids, new_tokens + warmup + 1)
            decoder.capture(warmup)
            _sync(ids.device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                decoder.step()
            _sync(ids.device)
            times.append((time.perf_counter() - start) / new_tokens * 1e3)
    except (
        Exception
    ) as exc:  # a model whose forward cannot be captured: say so, keep the eager numbers
        return (
            None,
            None,
            f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
        )
    median, spread = _median_spread(times)
    return median, spread, "one captured decoding step replayed per token (static KV cache)"


@torch.inference_mode()
def generation_benchmark(
    model: nn.Module,
    tokenizer,
    new_tokens: int = 64,
    prompt: str = "To be, or not to be, that is the question:",
    repeats: int = 5,
    graph: bool = True,
) -> GenerationBench:
    """Greedy decoding of ``new_tokens`` tokens at batch 1: eager, and on a GPU from a CUDA graph.

    After a warm-up, ``repeats`` runs of ``generate()``, each stamping its tokens as they
    come out: a run's decoding time is the mean interval between its new tokens (the
    prompt excluded), its prefill the time to the first. Reported: the median over the
    runs and the min-max spread. With ``graph`` on a GPU the same decoding also runs as
    one captured CUDA graph replayed per token.
    """
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise SqlabError(f"--tokens must be an integer >= 2, got {new_tokens!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise SqlabError(f"--repeats must be a positive integer, got {repeats!r}")
    device = _device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    check_seqlen(model, ids.shape[1] + new_tokens + 3)
    greedy(model, ids, 2)  # warm-up: allocator, kernels, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, per_token = [], []
    for _ in range(repeats):
        first, rate = _timed_generation(model, ids, new_tokens)
        prefill.append(first)
        per_token.append(rate)
    decode, spread = _median_spread(per_token)
    graph_ms = graph_spread = None
    note = "not asked for"
    if graph:
        graph_ms, graph_spread, note = graph_decoding(model, ids, new_tokens, repeats)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    else:
        peak, kind = peak_rss_mb(), "process peak RSS"
    return GenerationBench(
        device=str(device),
        new_tokens=new_tokens,
        prompt_tokens=ids.shape[1],
        repeats=repeats,
        prefill_ms=statistics.median(prefill),
        decode_ms_per_token=decode,
        decode_ms_spread=spread,
        tokens_per_s=1e3 / decode if decode > 0 else float("inf"),
        graph_decode_ms_per_token=graph_ms,
        graph_decode_ms_spread=graph_spread,
        graph_tokens_per_s=1e3 / graph_ms if graph_ms else None,
        graph_note=note,
        weights_mb=weights_bytes(model) / 2**20,
        linear_weights_mb=linear_weights_bytes(model) / 2**20,
        peak_memory_mb=peak,
        peak_memory_kind=kind,
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


def memory_bandwidth(
    device: torch.device | str = "cpu", megabytes: int = 256, repeats: int = 7
) -> float:
    """Measured memory bandwidth in GB/s: a large tensor copy (bytes read + bytes written)."""
    device = torch.device(device)
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / seconds / 1e9


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The CPU's last-level cache (Linux sysfs), else ``default``."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        value, unit = int(text.rstrip("KMG")), text[-1]
        sizes.append(value * {"K": 2**10, "M": 2**20, "G": 2**30}.get(unit, 1))
    return max(sizes, default=default)


GEMV_FORMATS = (
    "fp32",
    "bf16",
    "w4",
    "w3",
    "w3s",
)  # torch fp32/bf16; sqlab's packed 4/3-bit, 3-bit + 0.45% sparse
SPARSE_DENSITY = 0.0045


def _gemv_operator(fmt: str, out_features: int, in_features: int, seed: int):
    """A batch-1 product ``x -> x @ W.T`` in ``fmt`` with random values,
    and the bytes one call reads.
    """
    from .packing import pack, to_csr
    from .qlinear import SqueezeLinear

    gen = torch.Generator().manual_seed(seed)
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        w = torch.randn(out_features, in_features, generator=gen).to(dtype)
        x = torch.randn(1, in_features, generator=gen).to(dtype)
        return (lambda: nn.functional.linear(x, w)), w.numel() * w.element_size()
    wbits = int(fmt[1])
    csr = None
    if fmt.endswith("s"):
        nnz = round(SPARSE_DENSITY * out_features * in_features)
        csr = to_csr(
            torch.randint(0, out_features, (nnz,), generator=gen),
            torch.randint(0, in_features, (nnz,), generator=gen),
            torch.randn(nnz, generator=gen),
            out_features,
        )
    idx = torch.randint(
        0, 1 << wbits, (out_features, in_features), generator=gen, dtype=torch.uint8
    )
    layer = SqueezeLinear.from_parts(
        pack(idx, wbits),
        torch.randn(out_features, 1 << wbits, generator=gen).half(),
        in_features,
        csr,
    )
    x = torch.randn(1, in_features, generator=gen)
    layer(x)  # prepare the kernel
    return (lambda: layer(x)), linear_weights_bytes(layer)


def gemv_timings(
    shapes: list[tuple[int, int]],
    formats: tuple[str, ...] = GEMV_FORMATS,
    repeats: int = 7,
    cache_bytes: int | None = None,
) -> list[dict]:
    """Batch-1 matrix-vector products on the CPU, ``(out, in)`` weights in each format,
    timed honestly.

    Each timed round calls every one of ``copies`` independent weight copies once, with
    enough copies that together they exceed twice the last-level cache, so every call
    reads its weights from memory as a decoding step does. After a warm-up round,
    ``repeats`` rounds; reported per call: the median round and its spread, and GB/s of
    the weight bytes one call reads (packed formats: indices, LUT/table, sparse part).
    """
    cache_bytes = cache_bytes or last_level_cache_bytes()
    rows = []
    for out_features, in_features in shapes:
        for fmt in formats:
            call, moved = _gemv_operator(fmt, out_features, in_features, seed=0)
            copies = max(1, -(-2 * cache_bytes // moved))
            calls = [call] + [
                _gemv_operator(fmt, out_features, in_features, seed=c)[0] for c in range(1, copies)
            ]
            rounds = []
            for round_ in range(repeats + 1):
                start = time.perf_counter()
                for c in calls:
                    c()
                if round_:  # the first round warms up
                    rounds.append((time.perf_counter() - start) / copies * 1e6)
            median, (low, high) = statistics.median(rounds), (min(rounds), max(rounds))
            rows.append(
                {
                    "shape": [out_features, in_features],
                    "format": fmt,
                    "bytes": moved,
                    "copies": copies,
                    "us_median": median,
                    "us_min": low,
                    "us_max": high,
                    "gbs": moved / median / 1e3,
                }
            )
            del calls, call
    return rows


def linear_weights_bytes(model: nn.Module) -> int:
    """Resident bytes of a model's linear weights as decoding uses them.

    ``SqueezeLinear``: its packed buffers plus what its prepared kernel keeps beside them
    (the CPU kernel's fp32 tables, a converted copy of the sparse values); ``nn.Linear``
    inside decoder blocks: weight and bias. Shared tensors count once.
    """
    from .qlinear import SqueezeLinear

    seen, total = set(), 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    if isinstance(model, SqueezeLinear):
        modules = [model]
    else:
        modules = [
            m
            for _, block in decoder_blocks(model)
            for m in block.modules()
            if isinstance(m, (SqueezeLinear, nn.Linear))
        ]
    for module in modules:
        for t in (*module.buffers(), *module.parameters()):
            add(t)
        for t in getattr(module.__dict__.get("_kernel"), "resident", lambda: ())():
            add(t)
    return total


def cuda_graph_ms(calls: list, repeat: int = 20, warmup: int = 3) -> float:
    """Median GPU time (ms) of ``calls`` run back to back,
    captured once as a CUDA graph and replayed.

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
