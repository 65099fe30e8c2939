"""Shared fixtures: tiny random models and a tiny tokenizer, built locally (no download)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
) * 40


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_llama(vocab_size: int = 320, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A tiny random LLaMA; hidden 48 gives in_features that are not multiples of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_opt(vocab_size: int = 320, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return OPTForCausalLM(config).eval()


def stored_as(model, dtype=torch.float16):
    """A copy of ``model`` as a checkpoint stores it: every floating tensor outside the packed
    buffers of its ``SqueezeLinear`` layers rounded through ``dtype``."""
    import copy

    from sqlab.checkpoint import PACKED, quantized_layers

    copied = copy.deepcopy(model)
    packed = {f"{name}.{part}" for name in quantized_layers(copied) for part in PACKED}
    with torch.no_grad():
        for key, tensor in copied.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and key not in packed:
                tensor.data = tensor.data.to(dtype).to(tensor.dtype)
    return copied


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_opt():
    return make_opt()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny LLaMA saved as a local Hugging Face directory with its tokenizer."""
    path = tmp_path / "tiny-llama"
    make_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``sqlab`` in a subprocess, as a user would; returns (status, stdout, stderr)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "sqlab.cli", *argv], capture_output=True, text=True
    )
    return proc.returncode, proc.stdout, proc.stderr
