"""sqlab: a workbench for SqueezeLLM dense-and-sparse quantization."""

from .assets import fetch
from .baselines import rtn_quantize, rtn_quantize_model
from .checkpoint import export_squeezellm, import_squeezellm, load, load_quantized, save_quantized
from .config import GPTQConfig, QuantConfig, RTNConfig, SqueezeLLMConfig, config_for
from .kmeans import optimal_kmeans, weighted_kmeans
from .qlinear import SqueezeLinear
from .quantize import QuantReport, quantize_model
from .data import calibration_windows, eval_text, eval_tokens, parse_corpus
from .errors import SqlabError
from .evaluate import Perplexity, generation_benchmark, perplexity
from .sensitivity import FisherStrategy, compute_fisher, fisher_information
from .tasks import TaskResult, evaluate_tasks
from .preset import Preset, preset
from .models import decoder_blocks, family_of, load_model, load_tokenizer, quantizable_linears
from . import hf

hf.register_on_import()  # AutoModelForCausalLM.from_pretrained loads SqueezeLLM checkpoints

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "SqueezeLLMConfig",
    "RTNConfig",
    "GPTQConfig",
    "config_for",
    "QuantReport",
    "SqueezeLinear",
    "export_squeezellm",
    "import_squeezellm",
    "load",
    "load_quantized",
    "quantize_model",
    "rtn_quantize",
    "rtn_quantize_model",
    "save_quantized",
    "weighted_kmeans",
    "optimal_kmeans",
    "SqlabError",
    "calibration_windows",
    "compute_fisher",
    "fisher_information",
    "decoder_blocks",
    "eval_text",
    "eval_tokens",
    "family_of",
    "fetch",
    "generation_benchmark",
    "load_model",
    "load_tokenizer",
    "parse_corpus",
    "perplexity",
    "Perplexity",
    "quantizable_linears",
    "TaskResult",
    "evaluate_tasks",
    "Preset",
    "preset",
    "FisherStrategy",
]
