"""``sqlab plan``: the memory each stage needs and the strategy, from a model's config alone.

The model is built on the meta device (no weights are read), so any config
``transformers`` knows can be planned, 70B included. Counted from it: every
parameter, the quantizable linears per decoder block, the largest linear. The
stages, in bytes (``b``: 2 on a GPU, fp16; 4 on the CPU, fp32):

- **weights** ``P·b``;
- **gradients in flight** ``(b + 4)·L``: the Fisher hooks square each linear's
  gradient into its accumulator as soon as it exists and free it, so only the largest
  linear's ``L`` gradient and its fp32 square live at once;
- **Fisher accumulators** ``4·Q`` fp32 over the quantizable weights ``Q``;
- **activations** for one window of ``s`` tokens (batch 1). Per token and decoder block,
  what autograd keeps for the backward pass of a LLaMA-style block (SDPA attention,
  RMSNorm, gated MLP; hidden ``h``, key/value width ``kv``, MLP width ``i``, ``nh``
  heads): ``b·(6h + 2kv + 4i) + 4·(nh + 2)``, plus ``4h`` when ``b < 4`` (the norms'
  fp32 copies); counted from the tensors autograd saves, and checked against a
  measurement in the tests. With gradient checkpointing each block keeps only its input
  (``b·h``) and one block is recomputed at a time. The head adds ``12·V`` per token
  (fp32 logits, their log-softmax and its gradient, vocabulary ``V``);
- **quantization**, streamed block by block: one block's weights and Fisher in fp32
  (``8`` bytes per weight), the k-means working set of its largest group of matrices
  (``KMEANS_BYTES`` per weight), and the outlier profile (``8·65536`` bytes per matrix).

Times are estimates from the assumptions below, labelled as such; k-means on the CPU
uses the rate measured by ``benchmarks/kmeans.py --shape 7b``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SqlabError

GIB = 2**30
USABLE = 0.9  # of each device's memory; the rest for the allocator, CUDA context, fragmentation
GPU_TFLOPS = 150.0  # assumed sustained fp16 rate of one A100/H100-class GPU in the Fisher pass
CPU_GFLOPS = 30.0  # assumed fp32 throughput of the CPU per core
PCIE_GBPS = 20.0  # host <-> GPU copies of offloaded accumulators
DISK_GBPS = 2.0  # reading and writing memory-mapped accumulators
# exact k-means (kernels/kmeans_dp.cpp), seconds per weight and thread, measured by
# benchmarks/kmeans.py --shape 7b on the 2-core development machine
KMEANS_CPU_S = {3: 191e-9, 4: 315e-9}
KMEANS_BYTES = 24  # k-means working set per weight of a group: a float copy, importances, sort keys
PROFILE_BYTES = 8 * 65536  # outlier profile per matrix (sorted sample of |w|, padded copy)


@dataclass
class ModelShape:
    """What a plan needs to know about a model, counted from its meta copy."""

    name: str
    model_type: str
    params: int  # every parameter, tied ones once
    quantizable: int  # weights of the quantizable linears (0 when refused)
    blocks: int
    block_weights: int  # quantizable weights of the largest block
    largest_linear: int
    largest_group: int  # weights of the largest set of a block's linears k-means clusters together
    matrices: int
    hidden: int
    kv: int
    intermediate: int
    heads: int
    vocab: int
    refused: str | None = None  # why sqlab cannot quantize it (stacked expert tensors)


@dataclass
class Plan:
    model: ModelShape
    gpus: int
    gpu_mem_gb: float | None
    cpu_mem_gb: float
    seqlen: int
    nsamples: int
    wbits: int
    stages: dict[str, float] = field(default_factory=dict)  # GiB, as the stage needs them
    fisher: dict = field(default_factory=dict)  # strategy, per-device need, time estimate
    quantize: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _config(spec: str):
    """The ``transformers`` config of a spec: a model or checkpoint directory, a config.json, a
    .gguf file, ``default`` or a hub id (offline: the usual one-line error)."""
    from transformers import AutoConfig

    from .models import _from_hub, resolve

    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
            return AutoConfig.for_model(values.pop("model_type"), **values)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SqlabError(
                f"{spec!r} is not a model config.json with a model_type "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    return _from_hub(AutoConfig.from_pretrained, resolve(spec))


def model_shape(spec_or_config, name: str | None = None) -> ModelShape:
    """Count a model's parameters per stage from its config, on the meta device."""
    from transformers import AutoModelForCausalLM

    from .models import _find_blocks, block_linears, decoder_blocks

    config = (
        spec_or_config if not isinstance(spec_or_config, (str, Path)) else _config(spec_or_config)
    )
    try:
        with torch.device("meta"):  # no tensor is ever allocated
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown architecture, a config missing its fields
        raise SqlabError(
            f"cannot build model {name or spec_or_config!r} from its config: {exc}"
        ) from exc
    refused, sizes, groups = None, [], []
    try:
        blocks = decoder_blocks(model)
        for _, block in blocks:
            linears = block_linears(model, block).values()
            sizes.append([m.weight.numel() for m in linears])
            width: dict[int, int] = {}
            for m in linears:
                width[m.in_features] = width.get(m.in_features, 0) + m.weight.numel()
            groups.append(max(width.values(), default=0))
    except SqlabError as exc:
        refused, blocks = str(exc), _find_blocks(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    hidden = getattr(text, "hidden_size", 0)
    head_dim = getattr(text, "head_dim", None) or hidden // max(heads, 1)
    return ModelShape(
        name=str(
            name or spec_or_config
            if isinstance(spec_or_config, (str, Path))
            else name or config.model_type
        ),
        model_type=config.model_type,
        params=sum(p.numel() for p in model.parameters()),
        quantizable=sum(map(sum, sizes)),
        blocks=len(blocks),
        block_weights=max(map(sum, sizes), default=0),
        largest_linear=max((max(s) for s in sizes if s), default=0),
        largest_group=max(groups, default=0),
        matrices=sum(map(len, sizes)),
        hidden=hidden,
        kv=getattr(text, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", None)
        or getattr(text, "ffn_dim", 4 * hidden),
        heads=heads,
        vocab=getattr(text, "vocab_size", 0),
        refused=refused,
    )


def activation_bytes(m: ModelShape, seqlen: int, b: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for one window (batch 1): the formula in the module docstring."""
    per_block = b * (6 * m.hidden + 2 * m.kv + 4 * m.intermediate) + 4 * (m.heads + 2)
    per_block += 4 * m.hidden if b < 4 else 0
    head = 12 * m.vocab
    if checkpointing:  # each block's input, one block recomputed, the gradient flowing back
        return seqlen * (m.blocks * b * m.hidden + per_block + 2 * b * m.hidden + head)
    return seqlen * (m.blocks * per_block + head)


def fisher_need(
    m: ModelShape, seqlen: int, b: int, checkpointing: bool, offload: str, devices: int = 1
) -> tuple[int, int]:
    """(bytes per device, bytes of host memory) of the Fisher pass with this strategy; with several
    devices the blocks, their accumulators and activations are spread evenly."""
    acc = 4 * m.quantizable
    device = (
        m.params * b
        + activation_bytes(m, seqlen, b, checkpointing)
        + (acc if offload == "none" else 0)
    ) / devices
    device += (b + 4) * m.largest_linear
    return int(device), acc if offload == "cpu" else 0


def _fisher_strategy(m: ModelShape, plan: Plan) -> dict:
    """The strategy that fits with the shortest estimated time (on a tie: fewer devices, no
    checkpointing, accumulators nearer), among one device or all of them, with or without
    checkpointing, accumulators beside the weights, in host memory or on disk."""
    b = 2 if plan.gpus else 4
    capacity = (plan.gpu_mem_gb if plan.gpus else plan.cpu_mem_gb) * GIB * USABLE
    host = plan.cpu_mem_gb * GIB * USABLE
    counts = [1] + ([plan.gpus] if plan.gpus > 1 else [])
    ladder = [
        (n, ckpt, off) for n in counts for ckpt in (False, True) for off in ("none", "cpu", "disk")
    ]
    if not plan.gpus:  # on the CPU the accumulators already are in host memory
        ladder = [s for s in ladder if s[2] != "cpu"]
    fitting = []
    for order, (n, ckpt, offload) in enumerate(ladder):
        device, pinned = fisher_need(m, plan.seqlen, b, ckpt, offload, n)
        if device <= capacity and (offload != "cpu" or pinned <= host):
            seconds = _fisher_seconds(m, plan, ckpt, offload)
            fitting.append(
                (
                    seconds,
                    order,
                    {
                        "fits": True,
                        "devices": n,
                        "checkpointing": ckpt,
                        "offload": offload,
                        "device_gb": device / GIB,
                        "host_gb": pinned / GIB,
                        "seconds": seconds,
                    },
                )
            )
    if fitting:
        return min(fitting, key=lambda f: f[:2])[2]
    device, _ = fisher_need(m, plan.seqlen, b, True, "disk", max(counts))
    return {
        "fits": False,
        "devices": max(counts),
        "checkpointing": True,
        "offload": "disk",
        "device_gb": device / GIB,
        "host_gb": 0.0,
        "seconds": None,
    }


def _fisher_seconds(m: ModelShape, plan: Plan, checkpointing: bool, offload: str) -> float:
    """Estimate: 6 FLOPs per parameter and token (8 with recomputation) at the assumed rate; the
    devices of a device_map work one after another; plus moving the accumulators."""
    tokens = plan.seqlen * plan.nsamples
    flops = (8 if checkpointing else 6) * m.params * tokens
    rate = GPU_TFLOPS * 1e12 if plan.gpus else CPU_GFLOPS * 1e9 * (os.cpu_count() or 1)
    seconds = flops / rate
    moved = 4 * m.quantizable * plan.nsamples  # every accumulator once per window
    if offload == "cpu" and plan.gpus:
        seconds += moved / (PCIE_GBPS * 1e9)
    if offload == "disk":
        seconds += 2 * moved / (DISK_GBPS * 1e9)
    return seconds


def _quantize_strategy(m: ModelShape, plan: Plan, threads: int) -> dict:
    working = 8 * m.block_weights + KMEANS_BYTES * m.largest_group + PROFILE_BYTES * m.matrices
    whole = 4 * m.params + 4 * m.quantizable  # the in-memory path: the model and its Fisher
    on_gpu = plan.gpus > 0
    return {
        "streamed": True,
        "block_gb": working / GIB,
        "in_memory_gb": whole / GIB,
        "kmeans": "fast" if on_gpu else "optimal",
        "kmeans_device": "cuda" if on_gpu else f"cpu ({threads} threads)",
        "kmeans_seconds": None if on_gpu else m.quantizable * KMEANS_CPU_S[plan.wbits] / threads,
    }


def plan(
    spec: str,
    *,
    gpus: int = 0,
    gpu_mem_gb: float | None = None,
    cpu_mem_gb: float | None = None,
    seqlen: int | None = None,
    nsamples: int | None = None,
    wbits: int = 3,
    threads: int | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """The plan for quantizing ``spec`` on ``gpus`` GPUs of ``gpu_mem_gb`` each (none: the CPU).

    ``cpu_mem_gb`` is the host's memory (default: this machine's); ``seqlen`` and
    ``nsamples`` the calibration windows (default: the paper's 2048 x 100 with GPUs,
    sqlab's CPU defaults 512 x 16 without).
    """
    for name, value in (("gpus", gpus), ("wbits", wbits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SqlabError(f"{name} must be an integer >= 0, got {value!r}")
    if wbits not in KMEANS_CPU_S:
        raise SqlabError(f"wbits must be 3 or 4, got {wbits!r}")
    if gpus and not (isinstance(gpu_mem_gb, (int, float)) and gpu_mem_gb > 0):
        raise SqlabError(
            f"with {gpus} GPUs give each one's memory in GB (--gpu-mem), got {gpu_mem_gb!r}"
        )
    cpu_mem_gb = cpu_mem_gb or _host_memory_gb()
    shape = shape or model_shape(spec)
    result = Plan(
        shape,
        gpus,
        gpu_mem_gb if gpus else None,
        cpu_mem_gb,
        seqlen or (2048 if gpus else 512),
        nsamples or (100 if gpus else 16),
        wbits,
    )
    b = 2 if gpus else 4
    result.stages = {
        "weights": shape.params * b / GIB,
        "gradients_in_flight": (b + 4) * shape.largest_linear / GIB,
        "fisher_accumulators": 4 * shape.quantizable / GIB,
        "activations": activation_bytes(shape, result.seqlen, b, False) / GIB,
        "activations_checkpointed": activation_bytes(shape, result.seqlen, b, True) / GIB,
    }
    if shape.refused:
        result.notes.append(shape.refused)
        return result
    threads = threads or os.cpu_count() or 1
    result.fisher = _fisher_strategy(shape, result)
    result.quantize = _quantize_strategy(shape, result, threads)
    result.stages["quantize_block"] = result.quantize["block_gb"]
    if not result.fisher["fits"]:
        result.notes.append(
            "the Fisher pass does not fit even with checkpointing and accumulators "
            "on disk: add GPUs or use a shorter --seqlen"
        )
    return result


def _host_memory_gb() -> float:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / GIB
    except (ValueError, OSError):
        return 16.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 7200 else f"~{seconds / 3600:.1f} h"


def render(p: Plan) -> str:
    """The plan as text: memory per stage, the strategy, estimated times."""
    m = p.model
    where = (
        f"{p.gpus} GPU{'s' if p.gpus != 1 else ''} x {p.gpu_mem_gb:g} GB" if p.gpus else "the CPU"
    )
    lines = [
        f"{m.name} ({m.model_type}): {m.params / 1e9:.2f}B parameters, {m.blocks} decoder "
        f"blocks, {m.quantizable / 1e9:.2f}B quantizable weights in {m.matrices} matrices",
        f"on {where}, host memory {p.cpu_mem_gb:.0f} GB; calibration {p.nsamples} x "
        f"{p.seqlen} tokens; {'fp16' if p.gpus else 'fp32'} compute",
        "",
        "memory per stage (GiB)",
    ]
    labels = {
        "weights": "weights",
        "gradients_in_flight": "gradients in flight (one linear)",
        "fisher_accumulators": "Fisher accumulators (fp32)",
        "activations": f"activations, {p.seqlen} tokens",
        "activations_checkpointed": "activations with checkpointing",
        "quantize_block": "quantization, one block streamed",
    }
    lines += [f"  {labels[k]:<36} {v:>9.2f}" for k, v in p.stages.items()]
    if m.refused:
        return "\n".join(
            lines + ["", "strategy: none, sqlab does not quantize this model:", f"  {m.refused}"]
        )
    f, q = p.fisher, p.quantize
    place = {
        "none": "beside the weights",
        "cpu": "in pinned host memory" if p.gpus else "in host memory",
        "disk": "on disk (memory-mapped)",
    }[f["offload"]]
    spread = (
        f"spread over {f['devices']} GPUs (accelerate device_map)"
        if f["devices"] > 1
        else ("on one GPU" if p.gpus else "on the CPU")
    )
    lines += [
        "",
        "strategy",
        f"  Fisher: {'fits' if f['fits'] else 'DOES NOT FIT'}: model {spread}, "
        f"{'gradient checkpointing' if f['checkpointing'] else 'no checkpointing'}, "
        f"accumulators {place}; {f['device_gb']:.1f} GiB per "
        f"{'GPU' if p.gpus else 'process'}"
        + (f", {f['host_gb']:.1f} GiB pinned" if f["host_gb"] else ""),
        f"  quantization: streamed block by block from the safetensors shards "
        f"({q['block_gb']:.2f} GiB at a time instead of {q['in_memory_gb']:.1f} GiB), "
        f"k-means {q['kmeans']} on {q['kmeans_device']} (sqlab quantize --kmeans "
        f"{q['kmeans']})",
        "",
        "time (estimates from the assumptions in sqlab/plan.py)",
        f"  Fisher: {_duration(f['seconds'])} (assumed {GPU_TFLOPS:g} TFLOP/s per GPU"
        if p.gpus
        else f"  Fisher: {_duration(f['seconds'])} (assumed {CPU_GFLOPS:g} GFLOP/s per core",
    ]
    lines[-1] += "; the GPUs of a device_map work one after another)" if f["devices"] > 1 else ")"
    lines.append(
        f"  k-means: {_duration(q['kmeans_seconds'])}"
        + (
            " (no GPU measurement yet: benchmarks/kmeans.py --shape 7b on a GPU gives one)"
            if q["kmeans_seconds"] is None
            else f" ({KMEANS_CPU_S[p.wbits] * 1e9:.0f} ns per weight and thread at {p.wbits} bits, "
            "measured)"
        )
    )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def fisher_setup(spec: str, seqlen: int, nsamples: int) -> tuple:
    """The plan's Fisher strategy on this machine: ``(FisherStrategy, load_model keyword
    arguments)``, a ``device_map`` over this machine's GPUs when the plan spreads the model."""
    from .sensitivity import FisherStrategy

    gpus = torch.cuda.device_count()
    memory = (
        min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
        / GIB
    )
    found = plan(spec, gpus=gpus, gpu_mem_gb=memory or None, seqlen=seqlen, nsamples=nsamples)
    fisher = found.fisher or {"checkpointing": False, "offload": "none", "devices": 1}
    load = {}
    if fisher["devices"] > 1:  # accelerate balances the blocks over the GPUs within these caps
        load = {
            "device_map": "auto",
            "max_memory": {i: f"{memory * USABLE:.0f}GiB" for i in range(gpus)},
        }
    return FisherStrategy(fisher["checkpointing"], fisher["offload"]), load
