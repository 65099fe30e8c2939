"""transformers integration: ``from_pretrained`` of SqueezeLLM checkpoints after ``import sqlab``.

transformers offers hooks for third-party quantization methods
(``transformers.quantizers.auto.register_quantization_config`` and
``register_quantizer``) and no entry point, so the method has to be registered in
the process. ``import sqlab`` does it (``register_on_import``): at once if
transformers' quantizer registry is loaded, else the moment it is, so importing
sqlab does not import transformers. The config and quantizer are in
``sqlab/hf_quantizer.py``.

Without sqlab, transformers only warns about the unknown ``quant_method`` and goes
on; the checkpoint's guard tensor (``sqlab/checkpoint.py``) makes that load fail.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from .checkpoint import QUANT_METHOD
from .errors import SqlabError

log = logging.getLogger(__name__)

REGISTRY = "transformers.quantizers.auto"
HOOKS = (
    "register_quantization_config",
    "register_quantizer",
    "AUTO_QUANTIZER_MAPPING",
    "AUTO_QUANTIZATION_CONFIG_MAPPING",
)
_problem: str | None = "not registered yet"


def register() -> str | None:
    """Register ``squeezellm`` with transformers; ``None``, or why it could not be done."""
    global _problem
    if _problem is None:
        return None
    try:
        import transformers

        auto = importlib.import_module(REGISTRY)
    except ImportError as exc:
        _problem = f"transformers cannot be imported ({exc})"
        return _problem
    hooks = [h for h in HOOKS if not hasattr(auto, h)]
    if hooks:
        _problem = (
            f"transformers {transformers.__version__} has no {', '.join(hooks)} in "
            f"{REGISTRY} (its hooks for third-party quantization methods)"
        )
        log.warning(
            "sqlab cannot register the squeezellm method: %s; load checkpoints with sqlab.load",
            _problem,
        )
        return _problem
    from .hf_quantizer import SqueezeLLMConfig, SqueezeLLMHfQuantizer

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(SqueezeLLMConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(SqueezeLLMHfQuantizer)
    _problem = None
    return None


def require() -> None:
    """Raise ``SqlabError`` unless ``from_pretrained`` can load SqueezeLLM checkpoints here."""
    problem = register()
    if problem is not None:
        raise SqlabError(
            f"transformers cannot load SqueezeLLM checkpoints in this environment: "
            f"{problem}; use sqlab.load(DIR)"
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry like the next finder would, and registers
    ``squeezellm`` right after the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once, and so the lookup below finds the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as exc:  # never break importing transformers
                log.warning("sqlab could not register the squeezellm method: %s", exc)

        spec.loader.exec_module = exec_module
        return spec


def register_on_import() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it loads."""
    if REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
