"""The ``squeezellm`` quantization method as transformers sees it: a config and a quantizer.

``AutoModelForCausalLM.from_pretrained(dir)`` of a checkpoint whose ``config.json``
holds ``quantization_config: {"quant_method": "squeezellm", ...}`` builds the model
on the meta device, then asks ``SqueezeLLMHfQuantizer`` to replace every linear
whose ``qweight`` the weight files hold by an empty ``SqueezeLinear`` sized from
the stored tensors (their shapes and dtypes, read from the files' headers);
transformers then loads the packed buffers into those layers as they are, and
the quantizer checks every layer (``SqueezeLinear.validate``) before the model is
returned. ``save_pretrained`` writes the storage state of ``checkpoint`` (packed
buffers as they are, other tensors in the config's dtype, the guard), so the
directory loads again. Registered by ``sqlab.hf.register``.
"""

from __future__ import annotations

import re

import torch
from safetensors import safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checkpoint
from .errors import SqlabError


class SqueezeLLMConfig(QuantizationConfigMixin):
    """``quantization_config`` of a SqueezeLLM checkpoint (what ``checkpoint.quantization_config``
    writes); settings sqlab does not read (calibration, labels) are kept as given."""

    def __init__(
        self,
        wbits: int | list[int] = 3,
        outlier_pct: float = 0.0,
        sensitive_pct: float = 0.0,
        format: str = checkpoint.FORMAT,
        dtype: str = "float16",
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        self.quant_method = checkpoint.QUANT_METHOD
        self.wbits, self.outlier_pct, self.sensitive_pct = wbits, outlier_pct, sensitive_pct
        self.format, self.dtype = format, dtype
        self.__dict__.update(kwargs)
        widths = wbits if isinstance(wbits, list) else [wbits]
        if not widths or any(isinstance(w, bool) or w not in (3, 4) for w in widths):
            raise SqlabError(
                f"quantization_config has wbits {wbits!r}; SqueezeLLM checkpoints are 3- or 4-bit"
            )
        if format not in checkpoint.READABLE:
            raise SqlabError(
                f"quantization_config has format {format!r}; this sqlab reads "
                f"{', '.join(checkpoint.READABLE)}"
            )
        checkpoint.storage_dtype(dtype)


def _stored(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor in the weight files, from their headers alone."""
    shapes = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise SqlabError(
                f"{path!r} is not a safetensors file; SqueezeLLM checkpoints are "
                "loaded from safetensors only"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    shapes[key] = (tuple(part.get_shape()), _DTYPES.get(part.get_dtype()))
        except SqlabError:
            raise
        except Exception as exc:
            raise SqlabError(
                f"cannot read {str(path)!r}: missing, truncated or not a safetensors file ({exc})"
            ) from exc
    return shapes


_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SqueezeLLMHfQuantizer(HfQuantizer):
    """Loads (never makes) SqueezeLLM checkpoints; quantizing is ``sqlab quantize``'s job."""

    requires_calibration = True  # transformers refuses to quantize on the fly with it

    def _process_model_before_weight_loading(
        self, model, checkpoint_files=None, dtype=None, **kwargs
    ):
        if checkpoint_files is None:
            import transformers

            raise SqlabError(
                f"transformers {transformers.__version__} does not tell quantizers "
                "which weight files it loads, so it cannot build SqueezeLinear layers "
                "before loading; load SqueezeLLM checkpoints with sqlab.load(DIR), or "
                "use transformers 5"
            )
        stored = _stored(checkpoint_files)
        source = ", ".join(str(p) for p in checkpoint_files) or "the checkpoint"
        layers = checkpoint.group_shapes(stored)
        if not layers:
            raise SqlabError(
                f"{source} holds no packed layers ('*.qweight'), but its config says "
                "quant_method 'squeezellm'"
            )
        checkpoint.install_shells(model, layers, source, bias_dtype=dtype)
        guards = {f"^{re.escape(k)}$" for k in stored if checkpoint.is_guard(k, stored)}
        model._keys_to_ignore_on_load_unexpected = {
            *(model._keys_to_ignore_on_load_unexpected or ()),
            *guards,
        }
        self._source = source
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        checkpoint.validate_layers(model, getattr(self, "_source", "the checkpoint"))
        return model

    def get_state_dict_and_metadata(self, model):
        dtype = getattr(self.quantization_config, "dtype", "float16")
        state, _ = checkpoint.storage_state(model, dtype)
        return state, {"sqlab_format": checkpoint.FORMAT}

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False
