"""Saving and loading quantized models; the original SqueezeLLM ``.pt`` format.

A checkpoint is a directory that ``transformers`` loads: ``config.json`` carrying a
``quantization_config`` (``quant_method: "squeezellm"``, see ``sqlab/hf.py``) and the
tokenizer files, ``quant_config.json`` (``{"wbits", "outlier_pct", "sensitive_pct",
"format", ...}``), and ``model.safetensors`` holding, per quantized linear,
``qweight``, ``lookup_table`` and, with sparsity, ``rows``/``cols``/``vals``, in their
own dtypes; every other tensor in fp16 (``dtype``), tied tensors once.
``quant_config.json`` also lists the files sqlab wrote, so replacing a checkpoint
(``overwrite``) keeps every other file in the directory. Loading never unpickles
code (safetensors here, ``torch.load(..., weights_only=True)`` for the original
model-zoo files) and checks every packed layer before use.

The guard: transformers skips a ``quant_method`` it does not know with a warning
and would then fill the quantized linears with random weights. So the file also
holds ``<first quantized linear>.weight`` as an empty tensor: without sqlab, that
name exists in the model with another shape, and transformers stops with a size
mismatch; with sqlab, the layer is a ``SqueezeLinear`` and the guard is skipped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import files, models
from .errors import SqlabError
from .packing import (
    CSR,
    GROUP,
    ORIGINAL_NNZ_PER_THREAD,
    csr_row_indices,
    original_startrows,
    packed_rows,
    to_csr,
)
from .qlinear import SqueezeLinear

log = logging.getLogger(__name__)

FORMAT = "sqlab-squeezellm-v2"  # fp16 storage, quantization_config in config.json, the guard
READABLE = ("sqlab-squeezellm-v1", FORMAT)  # v1: tensors in the model's dtype, no guard
SIMULATED = (
    "sqlab-simulated-v1"  # a baseline's reconstructed weights in an ordinary model directory
)
QUANT_METHOD = "squeezellm"  # the quant_method transformers sees in config.json
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
REPORT = "quant_report.json"
PACKED = ("qweight", "lookup_table", "rows", "cols", "vals")  # stored in their own dtypes
PARTS = (*PACKED, "bias")
PACKED_WBITS = {8: 3, 16: 4}  # look-up table entries per row -> wbits
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def checkpoint_format(path: str | Path) -> str | None:
    try:
        return json.loads((Path(path) / QUANT_CONFIG).read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def quantized_layers(model: nn.Module) -> dict[str, SqueezeLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SqueezeLinear)}


def _unique_state(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict without repeats of tied tensors, and which key each dropped one repeats."""
    state, tied, seen = {}, {}, {}
    for key, tensor in state_dict.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if tensor.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state, tied


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The dtype non-quantized tensors are stored in: ``torch.float16`` or its name, and so on."""
    found = STORAGE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in STORAGE_DTYPES.values():
        raise SqlabError(
            f"storage dtype {dtype!r} is not supported; expected one of {', '.join(STORAGE_DTYPES)}"
        )
    return found


def guard_key(model: nn.Module) -> str:
    """The name of the guard tensor: ``weight`` of the first quantized linear (see above)."""
    return f"{min(quantized_layers(model))}.weight"


def is_guard(key: str, keys) -> bool:
    """Whether ``key`` is a guard: the ``weight`` of a module whose ``qweight`` is stored."""
    module, _, part = key.rpartition(".")
    return part == "weight" and f"{module}.qweight" in keys


def _cast_state(model: nn.Module, dtype: torch.dtype | str) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, every floating tensor outside the packed buffers cast to
    ``dtype``; tied tensors stay one tensor."""
    dtype = storage_dtype(dtype)
    packed = {f"{name}.{part}" for name in quantized_layers(model) for part in PACKED}
    state, cast = {}, {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and key not in packed:
            ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
            tensor = cast.setdefault(ident, tensor.detach().to("cpu", dtype))
        state[key] = tensor.detach().cpu()
    return state


def storage_state(
    model: nn.Module, dtype: torch.dtype | str = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint stores, and which dropped tied key repeats which stored one.

    The state dict without repeats of tied tensors, every floating tensor outside
    the packed buffers cast to ``dtype``, and the guard.
    """
    if not quantized_layers(model):
        raise SqlabError(
            "the model has no SqueezeLinear layers; quantize it first (simulate=False)"
        )
    state, tied = _unique_state(_cast_state(model, dtype))
    state[guard_key(model)] = torch.zeros(0, dtype=torch.uint8)
    return state, tied


def wbits_of(model: nn.Module) -> int | list[int]:
    found = sorted({m.wbits for m in quantized_layers(model).values()})
    return found[0] if len(found) == 1 else found


def quantization_config(
    model: nn.Module | int | list[int], quant_config: dict, dtype: torch.dtype | str = torch.float16
) -> dict:
    """The ``quantization_config`` entry of ``config.json`` (what ``hf.SqueezeLLMConfig`` reads);
    ``model`` is the quantized model or its ``wbits``."""
    name = str(storage_dtype(dtype)).removeprefix("torch.")
    wbits = model if isinstance(model, (int, list)) else wbits_of(model)
    return {
        "quant_method": QUANT_METHOD,
        "wbits": wbits,
        "outlier_pct": quant_config.get("outlier_pct", 0.0),
        "sensitive_pct": quant_config.get("sensitive_pct", 0.0),
        "format": FORMAT,
        "dtype": name,
    }


def mark_quantized(
    model: nn.Module, quant_config: dict, dtype: torch.dtype | str = torch.float16
) -> None:
    """Record in ``model.config`` that it is SqueezeLLM-quantized, as ``from_pretrained`` does for
    a model it loads, so that ``model.save_pretrained`` writes a directory that loads again."""
    from . import hf

    if hf.register() is not None:
        return  # this transformers has no hooks for it; save_quantized still works
    from .hf_quantizer import SqueezeLLMConfig, SqueezeLLMHfQuantizer

    config = SqueezeLLMConfig(**quantization_config(model, quant_config, dtype))
    model.config.quantization_config = config
    model.hf_quantizer = SqueezeLLMHfQuantizer(config, pre_quantized=True)


def check_target(out: Path, overwrite: bool, what: str | None = None) -> None:
    """Refuse to write a checkpoint into ``out`` (named ``what`` in messages) unless it is a new
    or empty directory, or, with ``overwrite``, a sqlab checkpoint."""
    what = what or repr(str(out))
    if out.exists() and not out.is_dir():
        raise SqlabError(
            f"{what} is a file; expected a directory (a new one, or a sqlab checkpoint to replace)"
        )
    if out.is_dir() and any(out.iterdir()):
        if not is_checkpoint(out):
            raise SqlabError(
                f"{what} exists and is not a sqlab checkpoint; refusing to write into "
                "it, choose another directory"
            )
        if not overwrite:
            raise SqlabError(
                f"{what} already holds a sqlab checkpoint; pass --overwrite "
                "(overwrite=True in Python) to replace it; files sqlab did not write "
                "there are kept"
            )


def _written_files(out: Path) -> list[str]:
    """The files a checkpoint's writer recorded as its own (none if it recorded none)."""
    try:
        names = json.loads((out / QUANT_CONFIG).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


@contextlib.contextmanager
def _writing(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory to fill, published as checkpoint ``out`` when the block succeeds.

    Holds the lock on ``out`` meanwhile. Replacing a checkpoint rewrites the files
    sqlab writes, deletes those the old one recorded and the new one lacks, and keeps
    every other file in the directory; ``quant_config.json`` moves last.
    """
    out = Path(os.path.abspath(out))
    with files.exclusive(out, repr(str(out))):
        check_target(out, overwrite)
        stale = _written_files(out) if out.is_dir() else []
        tmp = files.partial_dir(out)
        try:
            yield tmp
            written = sorted(p.name for p in tmp.iterdir() if p.name != files.PARTIAL_MARKER)
            quant = json.loads((tmp / QUANT_CONFIG).read_text())
            files.write_json(tmp / QUANT_CONFIG, {**quant, "files": written})
            files.publish(tmp, out, stale=stale, last=QUANT_CONFIG)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def save_simulated(
    model: nn.Module,
    out: str | Path,
    quant_config: dict,
    tokenizer=None,
    *,
    overwrite: bool = False,
    report: dict | None = None,
) -> Path:
    """Write a baseline's fake-quantized model as an ordinary model directory, marked as such.

    ``overwrite`` and ``report`` as in ``save_quantized``.
    """
    with _writing(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files.write_json(tmp / QUANT_CONFIG, {**quant_config, "format": SIMULATED})
        if report is not None:
            files.write_json(tmp / REPORT, report)
    return Path(out)


def save_quantized(
    model: nn.Module,
    out: str | Path,
    quant_config: dict,
    tokenizer=None,
    *,
    overwrite: bool = False,
    report: dict | None = None,
    dtype: torch.dtype | str = torch.float16,
) -> Path:
    """Write a checkpoint directory.

    ``out`` must be new (it then appears complete or not at all), empty, or, with
    ``overwrite``, a sqlab checkpoint: each of its files is replaced atomically,
    ``quant_config.json`` last, and files sqlab did not write are kept. ``report``
    (a ``QuantReport.as_dict()``) is stored as ``quant_report.json``. Tensors outside
    the packed layers are stored in ``dtype`` (fp16 by default); ``config.json``
    keeps the dtype the model computes in, which ``from_pretrained`` uses by
    default. Two saves give byte-identical files.
    """
    state, tied = storage_state(model, dtype)
    with _writing(out, overwrite) as tmp:
        files.save_safetensors(state, tmp / WEIGHTS, metadata=_weights_metadata(tied))
        _write_beside(
            tmp,
            model.config,
            wbits_of(model),
            model.get_input_embeddings().weight.dtype,
            quant_config,
            tokenizer,
            report,
            dtype,
        )
    return Path(out)


def _weights_metadata(tied: dict[str, str]) -> dict[str, str]:
    return {"format": FORMAT, "tied": json.dumps(tied, sort_keys=True)}


def _write_beside(
    tmp: Path,
    model_config,
    wbits,
    compute_dtype: torch.dtype,
    quant_config: dict,
    tokenizer,
    report: dict | None,
    dtype: torch.dtype | str,
) -> None:
    """Every file of a checkpoint but the weights: config.json with its quantization_config (and the
    dtype the model computes in, which from_pretrained uses), the tokenizer, quant_config.json,
    the report."""
    config = copy.deepcopy(model_config)
    config.quantization_config = quantization_config(wbits, quant_config, dtype)
    config.dtype = compute_dtype
    config.to_json_file(tmp / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    payload = {
        "wbits": wbits,
        "format": FORMAT,
        **quant_config,
        "dtype": str(storage_dtype(dtype)).removeprefix("torch."),
    }
    files.write_json(tmp / QUANT_CONFIG, payload)
    if report is not None:
        files.write_json(tmp / REPORT, report)


def save_streamed(
    source,
    blocks: list[Path],
    out: str | Path,
    quant_config: dict,
    tokenizer=None,
    *,
    overwrite: bool = False,
    report: dict | None = None,
    dtype: torch.dtype | str = torch.float16,
) -> Path:
    """The checkpoint ``save_quantized`` writes, assembled one tensor at a time.

    ``source`` is a ``streaming.ShardedModel`` (its meta model names every tensor, its
    shards hold the unquantized ones); ``blocks`` are the work-directory files holding
    the packed linears. The same files, byte for byte, without the model in memory.
    """
    storage = storage_dtype(dtype)
    packed = {}  # tensor name -> the reader of the block file holding it
    for path in blocks:
        reader = files.SafetensorsReader(path)
        packed.update(dict.fromkeys(reader.keys(), reader))
    for key in [k for k in packed if k.endswith(".vals") and not math.prod(packed[k].shape(k))]:
        module = key.rpartition(".")[0]  # no sparse values: no CSR buffers (as from_parts makes)
        for part in ("rows", "cols", "vals"):
            del packed[f"{module}.{part}"]
    quantized = {k.rpartition(".")[0] for k in packed}
    if not quantized:
        raise SqlabError("the work directory holds no quantized layers")
    specs, tied = [], source.tied
    for key in source.keys():
        if key in tied:
            continue
        module, _, part = key.rpartition(".")
        if module in quantized and part == "weight":
            specs += [
                files.TensorSpec(
                    f"{module}.{p}",
                    packed[f"{module}.{p}"].dtype(f"{module}.{p}"),
                    packed[f"{module}.{p}"].shape(f"{module}.{p}"),
                )
                for p in PACKED
                if f"{module}.{p}" in packed
            ]
            continue
        kind = storage if source.is_floating(key) else source.stored_dtype(key)
        specs.append(files.TensorSpec(key, kind, source.shape(key)))
    guard = files.TensorSpec(f"{min(quantized)}.weight", torch.uint8, (0,))

    def pieces(spec: files.TensorSpec):
        if spec == guard:
            yield torch.zeros(0, dtype=torch.uint8)
        elif spec.name in packed:
            yield packed[spec.name].get(spec.name)
        else:
            for part in source.row_chunks(spec.name):
                yield part.to(spec.dtype)

    with _writing(out, overwrite) as tmp:
        files.write_safetensors(tmp / WEIGHTS, [*specs, guard], pieces, _weights_metadata(tied))
        wbits = sorted(
            {PACKED_WBITS[packed[k].shape(k)[1]] for k in packed if k.endswith(".lookup_table")}
        )
        _write_beside(
            tmp,
            source.config,
            wbits[0] if len(wbits) == 1 else wbits,
            source.dtype,
            quant_config,
            tokenizer,
            report,
            dtype,
        )
    return Path(out)


def install_shells(
    model: nn.Module,
    shapes: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]],
    source: str,
    bias_dtype: torch.dtype | None = None,
) -> None:
    """Replace the named linears with empty ``SqueezeLinear`` layers sized from stored tensors.

    Each layer's buffers take the stored dtypes; ``bias_dtype`` (the model's) if given.
    """
    linears = dict(model.named_modules())
    for name, parts in shapes.items():
        linear = linears.get(name)
        if not isinstance(linear, nn.Linear):
            raise SqlabError(
                f"{source} quantizes {name!r}, which is not a linear layer of this model"
            )
        missing = {"qweight", "lookup_table"} - set(parts)
        if missing:
            raise SqlabError(f"{source} lacks {', '.join(f'{name}.{p}' for p in sorted(missing))}")
        (lut_shape, lut_dtype) = parts["lookup_table"]
        wbits = {8: 3, 16: 4}.get(lut_shape[-1])
        if wbits is None or len(lut_shape) != 2:
            raise SqlabError(
                f"{name}.lookup_table in {source} has shape {lut_shape}; expected "
                f"({linear.out_features}, 8) or ({linear.out_features}, 16)"
            )
        _check_truncated(name, linear, wbits, parts["qweight"][0], source)
        expected = {
            "qweight": (packed_rows(linear.in_features, wbits), linear.out_features),
            "lookup_table": (linear.out_features, 2**wbits),
        }
        nnz = parts["vals"][0][0] if "vals" in parts else 0
        if nnz:
            expected.update(rows=(linear.out_features + 1,), cols=(nnz,), vals=(nnz,))
        if "bias" in parts:
            expected["bias"] = (linear.out_features,)
        for part, shape in expected.items():
            if part not in parts:
                raise SqlabError(f"{source} lacks {name}.{part}")
            if tuple(parts[part][0]) != shape:
                raise SqlabError(
                    f"{name}.{part} in {source} has shape {tuple(parts[part][0])}; "
                    f"this model ({linear.in_features} -> {linear.out_features}) "
                    f"needs {shape}"
                )
        vals_dtype = (
            parts["vals"][1] if nnz else (parts["bias"][1] if "bias" in parts else torch.float32)
        )
        shell = SqueezeLinear(
            linear.in_features,
            linear.out_features,
            wbits,
            nnz,
            "bias" in parts,
            lut_dtype,
            vals_dtype,
            bias_dtype=bias_dtype,
        )
        shell.name = name
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, shell)


def _check_truncated(
    name: str, linear: nn.Linear, wbits: int, shape: tuple[int, ...], source: str
) -> None:
    """Name the one layout that cannot be read: the original packer's for ``in % 32 != 0``."""
    kept = linear.in_features // GROUP * GROUP
    if kept != linear.in_features and tuple(shape) == (kept // GROUP * wbits, linear.out_features):
        raise SqlabError(
            f"{name}.qweight in {source} has shape {tuple(shape)}: it packs only "
            f"the first {kept} of the layer's {linear.in_features} inputs, as the "
            "original packer does for inputs that are not a multiple of 32, so the "
            f"indices of the last {linear.in_features - kept} are not in the file and "
            "it cannot be imported faithfully"
        )


def group_shapes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, dict]:
    """``{module: {part: (shape, dtype)}}`` for every module that has a ``qweight``."""
    grouped: dict[str, dict] = {}
    for key, value in shapes.items():
        module, _, part = key.rpartition(".")
        if part in PARTS:
            grouped.setdefault(module, {})[part] = value
    return {m: parts for m, parts in grouped.items() if "qweight" in parts}


def _check_cast(key: str, tensor: torch.Tensor, target: torch.Tensor, source: str) -> None:
    """Refuse a stored tensor whose values would change when cast to the model's dtype."""
    if tensor.dtype == target.dtype:
        return
    if target.is_floating_point():
        if not tensor.is_floating_point():
            raise SqlabError(
                f"tensor {key} in {source} is {tensor.dtype}; this model needs "
                f"floating point ({target.dtype})"
            )
        return
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise SqlabError(
            f"tensor {key} in {source} is {tensor.dtype}; it must hold integers "
            f"({target.dtype}), and casting it would change its values"
        )
    info = torch.iinfo(target.dtype)
    if tensor.numel() and (int(tensor.min()) < info.min or int(tensor.max()) > info.max):
        raise SqlabError(
            f"tensor {key} in {source} holds values outside the range of "
            f"{target.dtype} ({int(tensor.min())} to {int(tensor.max())})"
        )


def _load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    strict: bool,
    assign: bool = False,
) -> None:
    """Load ``state`` into ``model``, checking shapes and casts first. ``assign``: the model's
    own parameters are empty (meta) and take the stored tensors, cast once to its dtypes,
    so no second copy of the weights is made."""
    expected = model.state_dict()
    cast: dict[int, torch.Tensor] = {}  # one cast per stored tensor: tied names stay shared
    for key, tensor in list(state.items()):
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise SqlabError(
                f"tensor {key} in {source} has shape {tuple(tensor.shape)}; the model needs "
                f"{tuple(expected[key].shape)}"
            )
        if key in expected:
            _check_cast(key, tensor, expected[key], source)
            if assign and tensor.dtype != expected[key].dtype:
                if id(tensor) not in cast:
                    cast[id(tensor)] = tensor.to(expected[key].dtype)
                state[key] = cast[id(tensor)]
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.unexpected_keys:
        raise SqlabError(
            f"{source} holds tensors this model does not have: "
            f"{', '.join(result.unexpected_keys[:5])}"
        )
    if strict and result.missing_keys:
        raise SqlabError(
            f"{source} lacks tensors of this model: {', '.join(result.missing_keys[:5])}"
        )
    empty = [name for name, t in model.state_dict().items() if t.is_meta]
    if empty:
        raise SqlabError(f"{source} lacks tensors of this model: {', '.join(empty[:5])}")
    validate_layers(model, source)


def validate_layers(model: nn.Module, source: str) -> None:
    """Check every packed layer loaded from ``source`` (the kernels index memory with them)."""
    for name, layer in quantized_layers(model).items():
        layer.name = name
        try:
            layer.validate(name)
        except SqlabError as exc:
            raise SqlabError(f"{exc} (in {source})") from None


def _model_from_config(path: Path, dtype: torch.dtype) -> nn.Module:
    """The architecture of the checkpoint at ``path`` with empty (meta) parameters: loading
    assigns the stored tensors, so the unquantized weights are never allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise SqlabError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _check_wbits(quant: dict, model: nn.Module, path: Path) -> None:
    """``quant_config.json`` must state the bit width the stored look-up tables have."""
    found = sorted({m.wbits for m in quantized_layers(model).values()})
    stated = quant.get("wbits")
    if stated != (found[0] if len(found) == 1 else found) or isinstance(stated, bool):
        raise SqlabError(
            f"{str(path / QUANT_CONFIG)!r} says wbits {stated!r}, but {WEIGHTS} holds "
            f"{' and '.join(map(str, found))}-bit look-up tables; the wbits it states "
            "must be the tensors' (3 or 4): the file was edited or belongs to another "
            "checkpoint"
        )


def read_quant_config(path: Path) -> dict:
    """``quant_config.json`` of a sqlab checkpoint directory, checked to be one sqlab reads."""
    try:
        quant = json.loads((path / QUANT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqlabError(
            f"{str(path)!r} is not a sqlab checkpoint: cannot read {QUANT_CONFIG} ({exc})"
        ) from exc
    if not isinstance(quant, dict):
        raise SqlabError(
            f"{str(path / QUANT_CONFIG)!r} holds a {type(quant).__name__}; expected a JSON object"
        )
    if quant.get("format") not in READABLE:
        raise SqlabError(
            f"{str(path / QUANT_CONFIG)!r} has format {quant.get('format')!r}; "
            f"expected one of {', '.join(map(repr, READABLE))}"
        )
    return quant


def load_quantized(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a checkpoint directory into ``SqueezeLinear`` layers.

    The model computes in ``dtype``: by default fp32 on the CPU and fp16 on a GPU,
    as ``models.load_model``; the packed buffers keep their stored dtypes.
    """
    path = Path(path)
    quant = read_quant_config(path)
    weights = path / WEIGHTS
    state, meta = files.load_safetensors(weights)
    if meta.get("format") not in READABLE:
        raise SqlabError(
            f"{str(weights)!r} was not written by sqlab (format {meta.get('format')!r})"
        )
    state = {k: v for k, v in state.items() if not is_guard(k, state)}
    device = torch.device(device) if device is not None else models.default_device()
    dtype = dtype or models.default_dtype(device)
    model = _model_from_config(path, dtype)
    install_shells(
        model,
        group_shapes({k: (tuple(t.shape), t.dtype) for k, t in state.items()}),
        str(weights),
        bias_dtype=dtype,
    )
    _check_wbits(quant, model, path)
    try:
        tied = json.loads(meta.get("tied", "{}"))
        for key, source in tied.items():
            state[key] = state[source]
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise SqlabError(
            f"{str(weights)!r} has damaged metadata: 'tied' must map tensor names to "
            f"stored tensors, got {meta.get('tied')!r:.80}"
        ) from exc
    _load_into(model, state, str(weights), strict=True, assign=True)
    del state  # the model holds the tensors now
    model.tie_weights()  # assigned tensors are new parameters: tied ones become one again
    mark_quantized(model, quant, quant.get("dtype", "float32"))
    model.to(device).eval()
    model.sqlab_spec = str(path)
    return model


def load(spec: str, device: torch.device | str | None = None) -> nn.Module:
    """Any model sqlab knows: a quantized checkpoint directory, or what ``models.load_model`` takes
    (a directory that ``save_pretrained`` wrote from a quantized model among them)."""
    if is_checkpoint(spec) and checkpoint_format(spec) != SIMULATED:
        return load_quantized(spec, device)
    return models.load_model(spec, device)


ORIGINAL_CONFIG = {"wbits"}  # the keys of the quant_config.json the original pack.py writes


def export_squeezellm(
    model: nn.Module,
    path: str | Path,
    *,
    balanced: bool = False,
    nnz_per_thread: int = ORIGINAL_NNZ_PER_THREAD,
    dtype: torch.dtype | str = torch.float16,
    padded: bool = False,
) -> Path:
    """Write the original release's ``.pt`` state dict and, beside it, its ``quant_config.json``.

    As its ``pack.py`` writes them: every tensor of the model under its Hugging Face
    name, other floating tensors in ``dtype`` (fp16, as it loads models); per quantized
    linear ``qweight`` and an fp32 ``lookup_table``; when any layer has a sparse part,
    for *every* quantized linear ``rows``/``cols``/fp32 ``vals`` (rows of zeros and
    empty ``cols``/``vals`` where a layer has none) and ``sparse_threshold.NAME``, its
    number of values, by which the original loader sizes its buffers; with
    ``balanced``, ``startrows`` for its balanced kernel (``original_startrows``).
    The original layout packs whole groups of 32 inputs only, so a layer whose
    inputs are not a multiple of 32 is refused, unless ``padded``: then sqlab's
    padded layout is written, which ``import_squeezellm`` reads and the original
    loader rejects.
    """
    layers = quantized_layers(model)
    if not layers:
        raise SqlabError("the model has no SqueezeLinear layers to export")
    wbits = wbits_of(model)
    if isinstance(wbits, list):
        raise SqlabError(
            f"the model mixes {' and '.join(map(str, wbits))}-bit layers; the "
            "original format has one wbits for the whole model"
        )
    ragged = {n: m.in_features for n, m in layers.items() if m.in_features % GROUP}
    if ragged and not padded:
        name, width = next(iter(ragged.items()))
        raise SqlabError(
            f"{name} has {width} inputs, not a multiple of 32 ({len(ragged)} "
            "layers like it): the original format packs whole groups of 32 inputs "
            "(its packer drops the rest and its loader expects in_features // 32 * "
            "wbits rows), so it cannot hold this model; pass padded=True to write "
            "sqlab's padded layout, which import_squeezellm reads but the original "
            "loader rejects"
        )
    if ragged:
        log.warning(
            "%d layers have inputs that are not a multiple of 32; writing sqlab's padded "
            "layout, which the original loader rejects",
            len(ragged),
        )
    path = Path(path)
    config_path = path.parent / QUANT_CONFIG
    _check_original_config(config_path, wbits)
    state = _cast_state(model, dtype)  # tied tensors saved once, as in pack.py's file
    sparse = any(layer.nnz for layer in layers.values())
    for name, layer in layers.items():
        state[f"{name}.lookup_table"] = layer.lookup_table.detach().float().cpu()
        if not sparse:
            continue
        csr = layer.csr() or _empty_csr(layer.out_features)
        state.update(
            {
                f"{name}.rows": csr.rows.detach().cpu(),
                f"{name}.cols": csr.cols.detach().cpu(),
                f"{name}.vals": csr.vals.detach().float().cpu(),
            }
        )
        state[f"sparse_threshold.{name}"] = csr.nnz
        if balanced:
            state[f"{name}.startrows"] = original_startrows(csr.rows.cpu(), nnz_per_thread)
    files.torch_save(state, path)
    files.write_json(config_path, {"wbits": wbits})
    return path


def _empty_csr(out_features: int) -> CSR:
    """A sparse part without values, as the original packer stores one."""
    return CSR(
        torch.zeros(out_features + 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, dtype=torch.float32),
    )


def _check_original_config(config_path: Path, wbits: int) -> None:
    """Write ``quant_config.json`` beside an export only over one that says the same thing."""
    if not config_path.exists():
        return
    try:
        found = json.loads(config_path.read_text())
    except (OSError, ValueError):
        found = None
    if found != {"wbits": wbits}:
        what = (
            "belongs to a sqlab checkpoint"
            if isinstance(found, dict) and "format" in found
            else f"holds {found!r}, for another export"
            if isinstance(found, dict)
            else "is not the original format's"
        )
        raise SqlabError(
            f"{str(config_path)!r} {what}; the original format keeps its "
            f'{{"wbits": {wbits}}} beside the .pt file, so export into another '
            "folder"
        )


def _read_original(path: Path) -> dict:
    """The state dict of an original ``.pt`` file, read without running code from it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SqlabError(f"SqueezeLLM checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:
        refused = str(exc).startswith("Weights only load failed")
        if isinstance(exc, pickle.UnpicklingError) and refused:
            # torch's message suggests weights_only=False, which would run the file's code: never
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"a reference to {found.group(1)}" if found else "Python objects"
            raise SqlabError(
                f"{str(path)!r} holds {what}, not only tensors; sqlab reads tensors "
                "alone and never runs code from a file, so it refuses this "
                "file"
            ) from None
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SqlabError(
            f"cannot read {str(path)!r} as a SqueezeLLM state dict (truncated, or not "
            f"a torch.save file of tensors): {said}"
        ) from None
    if not isinstance(state, dict) or not any(str(k).endswith(".qweight") for k in state):
        raise SqlabError(
            f"{str(path)!r} is not a SqueezeLLM checkpoint: it holds no '*.qweight' tensors"
        )
    return state


def _sparse_thresholds(state: dict, source: str) -> dict[str, int]:
    """Pop the ``sparse_threshold.NAME`` entries: each layer's number of sparse values."""
    found = {}
    for key in [k for k in state if str(k).startswith("sparse_threshold.")]:
        value = state.pop(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SqlabError(
                f"{key} in {source} is {value!r}; expected the layer's number of "
                "sparse values (an integer >= 0)"
            )
        found[key.removeprefix("sparse_threshold.")] = value
    return found


def _check_thresholds(thresholds: dict[str, int], state: dict, source: str) -> None:
    """Each ``sparse_threshold`` must count its layer's stored values (the original loader sizes
    its buffers by it)."""
    for name, count in thresholds.items():
        if f"{name}.qweight" not in state:
            raise SqlabError(
                f"sparse_threshold.{name} in {source} names no quantized layer of the file"
            )
        vals = state.get(f"{name}.vals")
        stored = vals.numel() if isinstance(vals, torch.Tensor) else 0
        if stored != count:
            raise SqlabError(
                f"sparse_threshold.{name} in {source} says {count} sparse values, but "
                f"{name}.vals holds {stored}; the file is inconsistent"
            )


def _drop_startrows(state: dict, source: str) -> None:
    """``startrows`` only schedule the original balanced kernel; sqlab plans its own."""
    for key in [k for k in state if str(k).endswith(".startrows")]:
        value = state.pop(key)
        if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.is_floating_point():
            raise SqlabError(f"{key} in {source} is not a 1-D integer tensor")


def _drop_empty_sparse(state: dict, name: str, out_features: int, source: str) -> None:
    """A layer without sparse values: the original stores rows of zeros and empty cols/vals."""
    rows, cols = state.get(f"{name}.rows"), state.get(f"{name}.cols")
    if not isinstance(rows, torch.Tensor) or not isinstance(cols, torch.Tensor):
        raise SqlabError(f"{source} holds {name}.vals without {name}.rows and {name}.cols")
    if tuple(rows.shape) != (out_features + 1,) or bool(rows.any()) or cols.numel():
        raise SqlabError(
            f"{name} in {source} has no sparse values, but its rows (shape "
            f"{tuple(rows.shape)}) or cols (shape {tuple(cols.shape)}) describe some; "
            f"an empty sparse part has {out_features + 1} zero rows and no cols"
        )
    for part in ("rows", "cols", "vals"):
        del state[f"{name}.{part}"]


def _merge_full_rows(state: dict, name: str, linear: nn.Linear, source: str) -> None:
    """Fold the original's dense rows of the sparse part (``full_rows``) into the CSR part.

    The original's hybrid kernel adds, for each ``t``, the dense row ``full_rows[:, t]``
    (``(in_features, topX)``) times the input to output ``full_row_indices[t]``, on top
    of the CSR part: they are rows of ``S`` stored whole. Their non-zero entries become
    CSR entries of those rows (a position held by both keeps both, adjacent, and
    every SpMV adds them), so ``S`` is the same matrix.
    """
    full, index = state.pop(f"{name}.full_rows", None), state.pop(f"{name}.full_row_indices", None)
    if full is None and index is None:
        return
    if full is None or index is None:
        have, lack = (
            ("full_rows", "full_row_indices")
            if index is None
            else ("full_row_indices", "full_rows")
        )
        raise SqlabError(
            f"{source} holds {name}.{have} without {name}.{lack}; the original's "
            "dense rows need both"
        )
    topx = index.numel()
    if (
        index.ndim != 1
        or index.is_floating_point()
        or not full.is_floating_point()
        or tuple(full.shape) != (linear.in_features, topx)
    ):
        raise SqlabError(
            f"{name}.full_rows ({full.dtype}, {tuple(full.shape)}) and "
            f"{name}.full_row_indices ({index.dtype}, {tuple(index.shape)}) in "
            f"{source} do not fit: expected floats ({linear.in_features}, topX) and "
            "topX integers"
        )
    if topx and (int(index.min()) < 0 or int(index.max()) >= linear.out_features):
        raise SqlabError(
            f"{name}.full_row_indices in {source} holds row {int(index.max())} or "
            f"{int(index.min())}; the layer has {linear.out_features} output rows"
        )
    if not bool(torch.isfinite(full).all()):
        raise SqlabError(f"{name}.full_rows in {source} contains NaN or Inf")
    t, c = (full.T != 0).nonzero(as_tuple=True)  # (m,) dense-row slot and column of each value
    if not t.numel():
        return  # rows of zeros add nothing (the original loader's default when a file has none)
    rows, cols, vals = index.long()[t], c, full.T[t, c]
    if f"{name}.vals" in state and state[f"{name}.vals"].numel():
        old = state[f"{name}.rows"]
        rows = torch.cat([csr_row_indices(old.long()), rows])
        cols = torch.cat([state[f"{name}.cols"].long(), cols])
        vals = torch.cat([state[f"{name}.vals"], vals.to(state[f"{name}.vals"].dtype)])
    csr = to_csr(rows, cols, vals, linear.out_features)
    state.update({f"{name}.rows": csr.rows, f"{name}.cols": csr.cols, f"{name}.vals": csr.vals})


def _from_original(state: dict, model: nn.Module, source: str) -> dict:
    """The original format's entries as ``SqueezeLinear`` buffers: thresholds checked and
    dropped, ``startrows`` dropped, dense rows folded in, empty sparse parts dropped."""
    state = dict(state)
    _check_thresholds(_sparse_thresholds(state, source), state, source)
    _drop_startrows(state, source)
    modules = dict(model.named_modules())
    for name in [str(k).removesuffix(".qweight") for k in state if str(k).endswith(".qweight")]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            continue  # install_shells names it
        _merge_full_rows(state, name, linear, source)
        vals = state.get(f"{name}.vals")
        if isinstance(vals, torch.Tensor) and not vals.numel():
            _drop_empty_sparse(state, name, linear.out_features, source)
    return state


def import_squeezellm(
    path: str | Path, base: str, device: torch.device | str | None = "cpu"
) -> nn.Module:
    """Load an original SqueezeLLM ``.pt`` file into ``SqueezeLinear`` layers of the ``base`` model.

    ``base`` is the unquantized model (any spec ``load_model`` takes): it supplies
    the architecture and every parameter the file does not hold (older model-zoo
    files store only the quantized layers). Read as the original writes it:
    ``sparse_threshold.NAME`` must count the layer's values; ``startrows`` (written
    with ``--balanced``) are skipped; a layer without sparse values may carry rows
    of zeros and empty ``cols``/``vals``; dense rows of the sparse part
    (``full_rows``/``full_row_indices``) are folded into its CSR part.
    """
    path = Path(path)
    state = _read_original(path)
    bad = [
        k
        for k, v in state.items()
        if not isinstance(v, torch.Tensor) and not str(k).startswith("sparse_threshold.")
    ]
    if bad:
        raise SqlabError(f"{str(path)!r} holds non-tensor entries: {', '.join(map(str, bad[:5]))}")
    model = models.load_model(base, device="cpu")
    state = _from_original(state, model, str(path))
    install_shells(
        model, group_shapes({k: (tuple(v.shape), v.dtype) for k, v in state.items()}), str(path)
    )
    _load_into(model, state, str(path), strict=False)
    missing = [
        f"{n}.{p}"
        for n, layer in quantized_layers(model).items()
        for p in ("qweight", "lookup_table")
        if f"{n}.{p}" not in state
    ]
    if missing:
        raise SqlabError(f"{str(path)!r} lacks {', '.join(missing[:5])}")
    mark_quantized(model, {"source": path.name})
    model.to(device).eval()
    return model
