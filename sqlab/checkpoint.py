"""Saving and loading quantized models; the original SqueezeLLM ``.pt`` format.

A checkpoint is a directory: the Hugging Face ``config.json`` and tokenizer files,
``quant_config.json`` (``{"wbits", "outlier_pct", "sensitive_pct", "format", ...}``),
and ``model.safetensors`` holding, per quantized linear, ``qweight``,
``lookup_table`` and, with sparsity, ``rows``/``cols``/``vals``; every other
parameter as it is. ``quant_config.json`` also lists the files sqlab wrote, so
replacing a checkpoint (``overwrite``) keeps every other file in the directory.
Loading never unpickles code (safetensors here, ``torch.load(..., weights_only=True)``
for the original model-zoo files) and checks every packed layer before use.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from .packing import packed_rows
from .qlinear import SqueezeLinear

log = logging.getLogger(__name__)

FORMAT = "sqlab-squeezellm-v1"
SIMULATED = "sqlab-simulated-v1"  # a baseline's reconstructed weights in an ordinary model directory
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
REPORT = "quant_report.json"
PARTS = ("qweight", "lookup_table", "rows", "cols", "vals", "bias")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def checkpoint_format(path: str | Path) -> str | None:
    try:
        return json.loads((Path(path) / QUANT_CONFIG).read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def quantized_layers(model: nn.Module) -> dict[str, SqueezeLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SqueezeLinear)}


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without repeats of tied tensors, and which key each dropped one repeats."""
    state, tied, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if tensor.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state, tied


def check_target(out: Path, overwrite: bool, what: str | None = None) -> None:
    """Refuse to write a checkpoint into ``out`` (named ``what`` in messages) unless it is a new
    or empty directory, or, with ``overwrite``, a sqlab checkpoint."""
    what = what or repr(str(out))
    if out.exists() and not out.is_dir():
        raise SqlabError(f"{what} is a file; expected a directory (a new one, or a sqlab "
                         "checkpoint to replace)")
    if out.is_dir() and any(out.iterdir()):
        if not is_checkpoint(out):
            raise SqlabError(f"{what} exists and is not a sqlab checkpoint; refusing to write into "
                             "it, choose another directory")
        if not overwrite:
            raise SqlabError(f"{what} already holds a sqlab checkpoint; pass --overwrite "
                             "(overwrite=True in Python) to replace it; files sqlab did not write "
                             "there are kept")


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


def save_simulated(model: nn.Module, out: str | Path, quant_config: dict, tokenizer=None, *,
                   overwrite: bool = False, report: dict | None = None) -> Path:
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


def save_quantized(model: nn.Module, out: str | Path, quant_config: dict, tokenizer=None, *,
                   overwrite: bool = False, report: dict | None = None) -> Path:
    """Write a checkpoint directory.

    ``out`` must be new (it then appears complete or not at all), empty, or, with
    ``overwrite``, a sqlab checkpoint: each of its files is replaced atomically,
    ``quant_config.json`` last, and files sqlab did not write are kept. ``report``
    (a ``QuantReport.as_dict()``) is stored as ``quant_report.json``. Two saves
    give byte-identical files.
    """
    layers = quantized_layers(model)
    if not layers:
        raise SqlabError("the model has no SqueezeLinear layers; quantize it first (simulate=False)")
    with _writing(out, overwrite) as tmp:
        model.config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state, tied = _unique_state(model)
        meta = {"format": FORMAT, "tied": json.dumps(tied, sort_keys=True)}
        files.save_safetensors(state, tmp / WEIGHTS, metadata=meta)
        wbits = {m.wbits for m in layers.values()}
        payload = {"wbits": wbits.pop() if len(wbits) == 1 else sorted(wbits), "format": FORMAT, **quant_config}
        files.write_json(tmp / QUANT_CONFIG, payload)
        if report is not None:
            files.write_json(tmp / REPORT, report)
    return Path(out)


def _install_shells(model: nn.Module, shapes: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]],
                    source: str) -> None:
    """Replace the named linears with empty ``SqueezeLinear`` layers sized from stored tensors."""
    linears = dict(model.named_modules())
    for name, parts in shapes.items():
        linear = linears.get(name)
        if not isinstance(linear, nn.Linear):
            raise SqlabError(f"{source} quantizes {name!r}, which is not a linear layer of this model")
        missing = {"qweight", "lookup_table"} - set(parts)
        if missing:
            raise SqlabError(f"{source} lacks {', '.join(f'{name}.{p}' for p in sorted(missing))}")
        (lut_shape, lut_dtype) = parts["lookup_table"]
        wbits = {8: 3, 16: 4}.get(lut_shape[-1])
        if wbits is None or len(lut_shape) != 2:
            raise SqlabError(f"{name}.lookup_table in {source} has shape {lut_shape}; expected "
                             f"({linear.out_features}, 8) or ({linear.out_features}, 16)")
        expected = {"qweight": (packed_rows(linear.in_features, wbits), linear.out_features),
                    "lookup_table": (linear.out_features, 2**wbits)}
        nnz = parts["vals"][0][0] if "vals" in parts else 0
        if nnz:
            expected.update(rows=(linear.out_features + 1,), cols=(nnz,), vals=(nnz,))
        if "bias" in parts:
            expected["bias"] = (linear.out_features,)
        for part, shape in expected.items():
            if part not in parts:
                raise SqlabError(f"{source} lacks {name}.{part}")
            if tuple(parts[part][0]) != shape:
                raise SqlabError(f"{name}.{part} in {source} has shape {tuple(parts[part][0])}; this model "
                                 f"({linear.in_features} -> {linear.out_features}) needs {shape}")
        vals_dtype = parts["vals"][1] if nnz else (parts["bias"][1] if "bias" in parts else torch.float32)
        shell = SqueezeLinear(linear.in_features, linear.out_features, wbits, nnz, "bias" in parts,
                              lut_dtype, vals_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, shell)


def _group_shapes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, dict]:
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
            raise SqlabError(f"tensor {key} in {source} is {tensor.dtype}; this model needs "
                             f"floating point ({target.dtype})")
        return
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise SqlabError(f"tensor {key} in {source} is {tensor.dtype}; it must hold integers "
                         f"({target.dtype}), and casting it would change its values")
    info = torch.iinfo(target.dtype)
    if tensor.numel() and (int(tensor.min()) < info.min or int(tensor.max()) > info.max):
        raise SqlabError(f"tensor {key} in {source} holds values outside the range of "
                         f"{target.dtype} ({int(tensor.min())} to {int(tensor.max())})")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, strict: bool) -> None:
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise SqlabError(f"tensor {key} in {source} has shape {tuple(tensor.shape)}; the model needs "
                             f"{tuple(expected[key].shape)}")
        if key in expected:
            _check_cast(key, tensor, expected[key], source)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SqlabError(f"{source} holds tensors this model does not have: {', '.join(result.unexpected_keys[:5])}")
    if strict and result.missing_keys:
        raise SqlabError(f"{source} lacks tensors of this model: {', '.join(result.missing_keys[:5])}")
    for name, layer in quantized_layers(model).items():
        try:
            layer.validate(name)
        except SqlabError as exc:
            raise SqlabError(f"{exc} (in {source})") from None


def _model_from_config(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise SqlabError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _check_wbits(quant: dict, model: nn.Module, path: Path) -> None:
    """``quant_config.json`` must state the bit width the stored look-up tables have."""
    found = sorted({m.wbits for m in quantized_layers(model).values()})
    stated = quant.get("wbits")
    if stated != (found[0] if len(found) == 1 else found) or isinstance(stated, bool):
        raise SqlabError(f"{str(path / QUANT_CONFIG)!r} says wbits {stated!r}, but {WEIGHTS} holds "
                         f"{' and '.join(map(str, found))}-bit look-up tables; the wbits it states "
                         "must be the tensors' (3 or 4): the file was edited or belongs to another "
                         "checkpoint")


def load_quantized(path: str | Path, device: torch.device | str | None = None) -> nn.Module:
    """Load a checkpoint directory into ``SqueezeLinear`` layers."""
    path = Path(path)
    try:
        quant = json.loads((path / QUANT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqlabError(f"{str(path)!r} is not a sqlab checkpoint: cannot read {QUANT_CONFIG} ({exc})") from exc
    if not isinstance(quant, dict):
        raise SqlabError(f"{str(path / QUANT_CONFIG)!r} holds a {type(quant).__name__}; expected a "
                         "JSON object")
    if quant.get("format") != FORMAT:
        raise SqlabError(f"{str(path / QUANT_CONFIG)!r} has format {quant.get('format')!r}; expected {FORMAT!r}")
    weights = path / WEIGHTS
    state, meta = files.load_safetensors(weights)
    if meta.get("format") != FORMAT:
        raise SqlabError(f"{str(weights)!r} was not written by sqlab (format {meta.get('format')!r})")
    floats = [t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith("lookup_table")]
    model = _model_from_config(path, floats[0] if floats else torch.float32)
    _install_shells(model, _group_shapes({k: (tuple(t.shape), t.dtype) for k, t in state.items()}), str(weights))
    _check_wbits(quant, model, path)
    try:
        tied = json.loads(meta.get("tied", "{}"))
        for key, source in tied.items():
            state[key] = state[source]
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise SqlabError(f"{str(weights)!r} has damaged metadata: 'tied' must map tensor names to "
                         f"stored tensors, got {meta.get('tied')!r:.80}") from exc
    _load_into(model, state, str(weights), strict=True)
    device = torch.device(device) if device is not None else models.default_device()
    model.to(device).eval()
    model.sqlab_spec = str(path)
    return model


def load(spec: str, device: torch.device | str | None = None) -> nn.Module:
    """Any model sqlab knows: a quantized checkpoint directory, or what ``models.load_model`` takes."""
    if is_checkpoint(spec) and checkpoint_format(spec) != SIMULATED:
        return load_quantized(spec, device)
    return models.load_model(spec, device)


def export_squeezellm(model: nn.Module, path: str | Path) -> Path:
    """Write the original SqueezeLLM ``.pt`` state dict (model-zoo layout, fp32 LUTs and values)."""
    layers = quantized_layers(model)
    if not layers:
        raise SqlabError("the model has no SqueezeLinear layers to export")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, layer in layers.items():
        state[f"{name}.lookup_table"] = layer.lookup_table.detach().float().cpu()
        if layer.nnz:
            state[f"{name}.vals"] = layer.vals.detach().float().cpu()
            state[f"sparse_threshold.{name}"] = layer.nnz
    return files.torch_save(state, path)


def import_squeezellm(path: str | Path, base: str, device: torch.device | str | None = "cpu") -> nn.Module:
    """Load an original SqueezeLLM ``.pt`` file into ``SqueezeLinear`` layers of the ``base`` model.

    ``base`` is the unquantized model (any spec ``load_model`` takes): it supplies
    the architecture and every parameter the file does not hold (older model-zoo
    files store only the quantized layers).
    """
    path = Path(path)
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
            raise SqlabError(f"{str(path)!r} holds {what}, not only tensors; sqlab reads tensors "
                             "alone and never runs code from a file, so it refuses this "
                             "file") from None
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SqlabError(f"cannot read {str(path)!r} as a SqueezeLLM state dict (truncated, or not a "
                         f"torch.save file of tensors): {said}") from None
    if not isinstance(state, dict) or not any(k.endswith(".qweight") for k in state):
        raise SqlabError(f"{str(path)!r} is not a SqueezeLLM checkpoint: it holds no '*.qweight' tensors")
    state = {k: v for k, v in state.items() if not k.startswith("sparse_threshold.")}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SqlabError(f"{str(path)!r} holds non-tensor entries: {', '.join(bad[:5])}")
    model = models.load_model(base, device="cpu")
    _install_shells(model, _group_shapes({k: (tuple(v.shape), v.dtype) for k, v in state.items()}), str(path))
    _load_into(model, state, str(path), strict=False)
    missing = [f"{n}.{p}" for n, layer in quantized_layers(model).items() for p in ("qweight", "lookup_table")
               if f"{n}.{p}" not in state]
    if missing:
        raise SqlabError(f"{str(path)!r} lacks {', '.join(missing[:5])}")
    model.to(device).eval()
    return model
