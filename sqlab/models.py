"""Loading models and finding the linear layers SqueezeLLM quantizes.

``load_model(spec)`` accepts ``default`` (the embedded SmolLM2-135M-Instruct), a
local Hugging Face directory, a ``.gguf`` file, or a hub id. A *family* says where
the decoder blocks are and which linears inside each block are quantized; the
embeddings and ``lm_head`` never are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import assets
from .errors import SqlabError

log = logging.getLogger(__name__)

LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
OPT_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
)


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks and what to quantize in each.

    ``linears`` are module names relative to one block; ``None`` means every
    ``nn.Linear`` inside the block (the generic fallback).
    """

    name: str
    blocks: str | None
    linears: tuple[str, ...] | None


LLAMA = Family("llama", "model.layers", LLAMA_LINEARS)
OPT = Family("opt", "model.decoder.layers", OPT_LINEARS)
GENERIC = Family("generic", None, None)

# model_type (from config.json) -> family; LLaMA 1/2, Vicuna, XGen and SmolLM report "llama"
FAMILIES: dict[str, Family] = {"llama": LLAMA, "mistral": LLAMA, "opt": OPT}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
SPECS_ACCEPTED = (
    "'default', a local Hugging Face model directory, a .gguf file, "
    "or a hub id such as 'meta-llama/Llama-2-7b-hf'"
)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type, GENERIC)
    if family.blocks is not None and _get(model, family.blocks) is None:
        return GENERIC
    return family


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks in order, as ``(qualified name, module)``.

    Refuses models whose blocks keep weights in tensors of more than two
    dimensions (mixture-of-experts layers that store every expert's matrix in one
    parameter, as Mixtral and Qwen2-MoE do): sqlab quantizes ``nn.Linear`` layers,
    and leaving those weights in full precision would misstate every result.
    """
    blocks = _find_blocks(model)
    stacked = [
        (f"{prefix}.{name}", tuple(p.shape))
        for prefix, block in blocks
        for name, p in block.named_parameters()
        if p.ndim > 2
    ]
    if stacked:
        shown = ", ".join(f"{name} {shape}" for name, shape in stacked[:4])
        raise SqlabError(
            f"unsupported model {type(model).__name__!r}: {len(stacked)} weights are stacked per "
            f"expert in tensors of 3 or more dimensions ({shown}"
            f"{', ...' if len(stacked) > 4 else ''}); sqlab quantizes nn.Linear layers only, so "
            "mixture-of-experts models such as Mixtral and Qwen2-MoE are not supported"
        )
    return blocks


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    family = family_of(model)
    if family.blocks is not None:
        return [
            (f"{family.blocks}.{i}", block) for i, block in enumerate(_get(model, family.blocks))
        ]
    # generic: the longest ModuleList that holds linears is the stack of blocks
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(
            isinstance(m, nn.Linear) for m in module.modules()
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise SqlabError(
            f"unsupported model family {type(model).__name__!r}: found no list of decoder blocks "
            f"with linear layers; supported families are {', '.join(sorted(FAMILIES))} and models "
            "whose decoder blocks are an nn.ModuleList of modules holding nn.Linear layers"
        )
    return [(f"{best[0]}.{i}", block) for i, block in enumerate(best[1])]


def block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Linear]:
    """The quantizable linears of one block, keyed by their name inside the block."""
    family = family_of(model)
    if family.linears is None:
        return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    found = {}
    for name in family.linears:
        module = _get(block, name)
        if not isinstance(module, nn.Linear):
            found_kind = "nothing" if module is None else type(module).__name__
            raise SqlabError(
                f"{family.name} block {type(block).__name__} has no nn.Linear {name!r} "
                f"(found {found_kind}; is the model already quantized?)"
            )
        found[name] = module
    return found


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every quantizable linear, keyed by qualified module name, in forward order."""
    return {
        f"{prefix}.{name}": linear
        for prefix, block in decoder_blocks(model)
        for name, linear in block_linears(model, block).items()
    }


def split_name(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``:
    block index and module in the block.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :])
    raise SqlabError(f"{name!r} names no decoder block")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on a GPU, fp32 on the CPU (CPU half-precision matmuls are slow and inexact)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: what to pass to ``from_pretrained``."""

    spec: str
    path: str
    gguf_file: str | None = None
    hub: bool = False


def resolve(spec: str) -> ModelSource:
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise SqlabError(f"model spec {spec!r} is empty; expected {SPECS_ACCEPTED}")
    spec = str(spec)
    if spec == "default":
        path = assets.default_model_dir()
        if not (path / "config.json").exists():
            raise SqlabError(
                f"the default model is not fetched yet (looked in {path}); run `sqlab fetch`"
            )
        return ModelSource(spec, str(path))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SqlabError(
                f"model directory {spec!r} has no config.json; expected {SPECS_ACCEPTED}"
            )
        return ModelSource(spec, str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise SqlabError(f"model file {spec!r} is not a .gguf file; expected {SPECS_ACCEPTED}")
        return ModelSource(spec, str(path.parent), gguf_file=path.name)
    if HUB_ID.match(spec) and not spec.endswith(".gguf"):
        return ModelSource(spec, spec, hub=True)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or "/" in spec:
        raise SqlabError(f"model path {spec!r} does not exist; expected {SPECS_ACCEPTED}")
    raise SqlabError(f"unknown model spec {spec!r}; expected {SPECS_ACCEPTED}")


def _from_hub(loader, source: ModelSource, **kwargs):
    """Call a ``from_pretrained`` loader; a hub id is tried only when the hub answers."""
    if source.hub and not assets.hub_reachable():
        kwargs["local_files_only"] = True  # a copy in the Hugging Face cache still works offline
    try:
        return loader(source.path, gguf_file=source.gguf_file, **kwargs)
    except Exception as exc:  # a damaged file surfaces as OSError, ValueError, SafetensorError, ...
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not source.hub or not isinstance(exc, OSError):
            raise SqlabError(
                f"could not load model {source.spec!r}: a file of it is missing, "
                f"truncated or not what its name says ({said})"
            ) from exc
        raise SqlabError(
            f"could not load {source.spec!r} from the Hugging Face hub "
            f"({'the hub is unreachable' if kwargs.get('local_files_only') else said}). "
            "If you meant a local directory, it does not exist; offline, download the model "
            "elsewhere and pass its local directory, a .gguf file, or 'default'."
        ) from exc


def load_model(
    spec: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    device_map: dict | str | None = None,
    max_memory: dict | None = None,
) -> nn.Module:
    """Load a causal LM in eval mode: fp32 on the CPU, fp16 on a GPU by default.

    ``device_map`` (and ``max_memory``) spread the model over several devices through
    ``accelerate``, as ``from_pretrained`` takes them (``sqlab.plan`` chooses one).
    """
    from transformers import AutoModelForCausalLM

    source = resolve(spec)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    placed = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    model = _from_hub(AutoModelForCausalLM.from_pretrained, source, dtype=dtype, **placed)
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        del model.config.quantization_config
    if device_map is None:
        model.to(device)
    model.eval()
    model.sqlab_spec = source.spec
    return model


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return _from_hub(AutoTokenizer.from_pretrained, resolve(spec))


def context_length(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(
    model: nn.Module, seqlen: int, available: int | None = None, what: str = "the text"
) -> None:
    """``seqlen`` must fit the model's context (and, given ``available``, the text)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise SqlabError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise SqlabError(f"seqlen {seqlen} is longer than the model's context ({limit} tokens)")
    if available is not None and seqlen > available:
        raise SqlabError(f"seqlen {seqlen} is longer than {what} ({available} tokens)")


def fingerprint(model: nn.Module) -> str:
    """A short content hash of a model: its config and a sample of every parameter.

    Used in cache keys, so a cached Fisher or result is reused only for the same
    weights (not merely the same spec string).
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
