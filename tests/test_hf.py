"""transformers loads sqlab checkpoints: from_pretrained after import sqlab, save_pretrained, and a
loud failure without sqlab instead of random weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import sqlab
from sqlab import QuantConfig, SqlabError, SqueezeLinear, experiments
from sqlab.checkpoint import quantized_layers
from tests.conftest import make_llama, make_opt, stored_as

X = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))


def _quantized(make=make_llama, tie=False, sparse=True):
    model = make()
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(
        wbits=3, outlier_pct=0.45 if sparse else 0.0, sensitive_pct=0.05 if sparse else 0.0
    )
    fisher = sqlab.fisher_information(model, ids, progress=False)
    sqlab.quantize_model(model, config, fisher, progress=False)
    return model, config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    model, config = _quantized(tie=True)
    out = tmp_path_factory.mktemp("hf") / "ckpt"
    return sqlab.save_quantized(model, out, config.as_dict(), tiny_tokenizer), model


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_from_pretrained_in_a_new_process_gives_the_logits_of_sqlab_load(ckpt):
    path, _ = ckpt
    code = f"""
import sys, torch
import sqlab
assert "transformers.quantizers.auto" not in sys.modules  # importing sqlab stays light
from transformers import AutoModelForCausalLM
x = torch.tensor({X.tolist()})
hf = AutoModelForCausalLM.from_pretrained({str(path)!r})
ours = sqlab.load({str(path)!r}, device="cpu")
layers = [m for m in hf.modules() if isinstance(m, sqlab.SqueezeLinear)]
assert len(layers) == 14 and all(m.name for m in layers), layers
assert hf.config.quantization_config.quant_method == "squeezellm" and hf.dtype == ours.dtype
with torch.no_grad():
    print("equal" if torch.equal(hf(x).logits, ours(x).logits) else "DIFFERENT")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "equal", proc.stderr[-3000:]


def test_transformers_alone_refuses_the_checkpoint_instead_of_random_weights(ckpt):
    """transformers only warns about an unknown quant_method; the guard tensor makes it stop."""
    path, _ = ckpt
    code = f"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(path)!r})
except Exception as exc:
    assert "sqlab" not in sys.modules
    print("refused:", type(exc).__name__, exc)
else:
    print("LOADED")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.startswith("refused:"), (
        proc.stdout + proc.stderr[-2000:]
    )
    assert "ignore_mismatched_sizes" in proc.stdout
    assert "squeezellm" in proc.stderr  # transformers' warning names the unknown method


@pytest.mark.parametrize(
    "make, tie, sparse",
    [(make_llama, False, True), (make_opt, False, True), (make_llama, True, False)],
)
def test_from_pretrained_matches_sqlab_load(tmp_path, tiny_tokenizer, make, tie, sparse):
    model, config = _quantized(make, tie, sparse)
    path = sqlab.save_quantized(model, tmp_path / "ckpt", config.as_dict(), tiny_tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert set(quantized_layers(hf)) == set(quantized_layers(model))
    layer = next(iter(quantized_layers(hf).values()))
    assert layer.lookup_table.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    with torch.no_grad():
        assert torch.equal(hf(X).logits, sqlab.load(str(path), device="cpu")(X).logits)
        assert torch.equal(hf(X).logits, stored_as(model)(X).logits)


def test_save_pretrained_writes_a_directory_that_loads_again(tmp_path, ckpt):
    path, model = ckpt
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    stored = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(again(X).logits, hf(X).logits)
        again = sqlab.load(str(tmp_path / "again"), device="cpu")
        assert torch.equal(again(X).logits, hf(X).logits)
    # a model quantized (or loaded) by sqlab saves the same way
    model.save_pretrained(tmp_path / "fresh")
    config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "squeezellm"
    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")
        assert torch.equal(fresh(X).logits, stored_as(model)(X).logits)
        loaded = sqlab.load(str(path), device="cpu")
        loaded.save_pretrained(tmp_path / "loaded")
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(tmp_path / "loaded")(X).logits, loaded(X).logits
        )


def test_from_pretrained_checks_every_packed_layer(tmp_path, tiny_tokenizer):
    model, config = _quantized()
    path = sqlab.save_quantized(model, tmp_path / "ckpt", config.as_dict(), tiny_tokenizer)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    layer = "model.layers.1.mlp.up_proj"
    state[f"{layer}.cols"][0] = 10_000  # an index the kernels would read memory with
    save_file(state, str(weights), metadata={"format": "sqlab-squeezellm-v2"})
    with pytest.raises(SqlabError, match=rf"{layer}: column index 10000 out of range"):
        AutoModelForCausalLM.from_pretrained(path)
    bad = json.loads((path / "config.json").read_text())
    bad["quantization_config"]["wbits"] = 5
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(SqlabError, match="quantization_config has wbits 5"):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_transformers_without_the_hooks_gives_a_clear_message(monkeypatch):
    from sqlab import hf

    monkeypatch.setattr(hf, "_problem", "not registered yet")
    monkeypatch.setattr(hf, "REGISTRY", "transformers.no_such_module")
    with pytest.raises(
        SqlabError,
        match="transformers cannot load SqueezeLLM checkpoints .* use "
        r"sqlab.load\(DIR\)",
    ):
        hf.require()
    monkeypatch.undo()
    hf.require()  # the real registry: registered
    assert isinstance(_quantized(sparse=False)[0].model.layers[0].mlp.up_proj, SqueezeLinear)


def test_the_default_model_loads_through_from_pretrained_as_through_sqlab_load(tmp_path):
    """The issue's check on the real default model (two decoder blocks quantized, for time)."""
    model = sqlab.load_model("default", device="cpu")
    tokenizer = sqlab.load_tokenizer("default")
    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05, nsamples=2, seqlen=64)
    report = experiments.quantize(
        model, tokenizer, config, blocks=[0, 1], cache=False, progress=False
    )
    path = sqlab.save_quantized(model, tmp_path / "default-w3", config.as_dict(), tokenizer)
    code = f"""
import torch
import sqlab
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = AutoTokenizer.from_pretrained({str(path)!r})("Shall I compare thee to a summer's day?",
                                                  return_tensors="pt").input_ids
hf = AutoModelForCausalLM.from_pretrained({str(path)!r})
ours = sqlab.load({str(path)!r}, device="cpu")
with torch.no_grad():
    print("equal" if torch.equal(hf(ids).logits, ours(ids).logits) else "DIFFERENT")
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "equal", proc.stderr[-3000:]
    assert len(report.layers) == 14
    alone = _python(
        f"from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    )
    assert alone.returncode != 0 and "ignore_mismatched_sizes" in alone.stderr
