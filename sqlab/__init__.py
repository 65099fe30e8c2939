"""sqlab: a workbench for SqueezeLLM dense-and-sparse quantization."""

from .assets import fetch
from .data import calibration_windows, eval_text, eval_tokens, parse_corpus
from .errors import SqlabError
from .evaluate import Perplexity, generation_benchmark, perplexity
from .models import decoder_blocks, family_of, load_model, load_tokenizer, quantizable_linears

__version__ = "0.1.0"

__all__ = [
    "SqlabError", "calibration_windows", "decoder_blocks", "eval_text", "eval_tokens", "family_of",
    "fetch", "generation_benchmark", "load_model", "load_tokenizer", "parse_corpus", "perplexity",
    "Perplexity", "quantizable_linears",
]
