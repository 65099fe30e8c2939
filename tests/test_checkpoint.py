import json

import pytest
import torch

from sqlab import (
    QuantConfig,
    SqlabError,
    export_squeezellm,
    fisher_information,
    import_squeezellm,
    load,
    load_quantized,
    quantize_model,
    save_quantized,
)
from safetensors import safe_open

from sqlab import files
from sqlab.checkpoint import _unique_state, quantized_layers
from tests.conftest import make_llama, make_opt, stored_as


def _quantized(make=make_llama, sparse=True, tie=False, hidden=64):
    model = make(hidden=hidden)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(model, ids, progress=False)
    config = QuantConfig(
        wbits=3, outlier_pct=0.45 if sparse else 0.0, sensitive_pct=0.05 if sparse else 0.0
    )
    quantize_model(model, config, fisher, progress=False)
    return model, config


X = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "make, sparse, tie, hidden",
    [(make_llama, True, False, 64), (make_llama, False, True, 48), (make_opt, True, False, 64)],
)
def test_directory_round_trip_gives_identical_logits(
    tmp_path, tiny_tokenizer, make, sparse, tie, hidden
):
    model, config = _quantized(make, sparse, tie, hidden)
    out = save_quantized(model, tmp_path / "ckpt", config.as_dict(), tiny_tokenizer)
    quant = json.loads((out / "quant_config.json").read_text())
    assert quant["wbits"] == 3 and quant["outlier_pct"] == config.outlier_pct and "format" in quant
    assert quant["dtype"] == "float16"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = load(str(out), device="cpu")
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    assert loaded.dtype == torch.float32  # stored in fp16, computed in fp32 on the CPU
    assert torch.equal(loaded(X).logits, stored_as(model)(X).logits)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    exact = save_quantized(model, tmp_path / "fp32", config.as_dict(), dtype="float32")
    assert torch.equal(load(str(exact), device="cpu")(X).logits, model(X).logits)


def test_checkpoint_stores_fp16_once_packed_buffers_as_they_are_and_the_guard(tmp_path):
    model, config = _quantized(tie=True)
    out = save_quantized(model, tmp_path / "ckpt", config.as_dict())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    layer = "model.layers.0.self_attn.q_proj"
    assert stored["model.embed_tokens.weight"].dtype == torch.float16  # tied: stored once
    assert "lm_head.weight" not in stored and stored["model.norm.weight"].dtype == torch.float16
    assert stored[f"{layer}.lookup_table"].dtype == torch.float16  # as the quantizer made them
    assert stored[f"{layer}.vals"].dtype == torch.float32
    assert stored[f"{layer}.qweight"].dtype == torch.int32
    guards = [
        k for k in stored if k.endswith(".weight") and k[: -len("weight")] + "qweight" in stored
    ]
    assert guards == ["model.layers.0.mlp.down_proj.weight"] and stored[guards[0]].numel() == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"] == {
        "quant_method": "squeezellm",
        "wbits": 3,
        "outlier_pct": 0.45,
        "sensitive_pct": 0.05,
        "format": "sqlab-squeezellm-v2",
        "dtype": "float16",
    }
    assert hf["dtype"] == "float32"  # what from_pretrained computes in by default, as sqlab.load
    with pytest.raises(SqlabError, match="storage dtype 'int8' is not supported"):
        save_quantized(model, tmp_path / "bad", config.as_dict(), dtype="int8")


def test_version_1_checkpoints_still_load(tmp_path, tiny_tokenizer):
    """Written before fp16 storage: the model's dtype, no guard, no quantization_config."""
    model, config = _quantized(tie=True)
    out = tmp_path / "v1"
    out.mkdir()
    model.config.to_json_file(out / "config.json")
    state, tied = _unique_state(model.state_dict())
    files.save_safetensors(
        state,
        out / "model.safetensors",
        {"format": "sqlab-squeezellm-v1", "tied": json.dumps(tied)},
    )
    files.write_json(out / "quant_config.json", {"wbits": 3, "format": "sqlab-squeezellm-v1"})
    assert torch.equal(load(str(out), device="cpu")(X).logits, model(X).logits)


def test_original_format_round_trip(tmp_path, tiny_model_dir):
    base = load(str(tiny_model_dir), device="cpu")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(base, ids, progress=False)
    quantize_model(
        base, QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.05), fisher, progress=False
    )
    path = export_squeezellm(base, tmp_path / "sq-tiny-w4-s45.pt")
    state = torch.load(path, weights_only=True)
    name = "model.layers.0.self_attn.q_proj"
    assert (
        state[f"{name}.qweight"].dtype == torch.int32
        and state[f"{name}.lookup_table"].dtype == torch.float32
    )
    assert state[f"sparse_threshold.{name}"] == state[f"{name}.vals"].numel()
    assert state["model.embed_tokens.weight"].dtype == torch.float16  # as pack.py loads LLaMA
    assert json.loads((tmp_path / "quant_config.json").read_text()) == {"wbits": 4}
    imported = import_squeezellm(path, str(tiny_model_dir))
    assert torch.equal(imported(X).logits, stored_as(base)(X).logits)


def test_original_format_with_only_quantized_tensors_takes_the_rest_from_the_base(
    tmp_path, tiny_model_dir
):
    base = load(str(tiny_model_dir), device="cpu")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(
        base, QuantConfig(wbits=3), fisher_information(base, ids, progress=False), progress=False
    )
    state = {
        k: v for k, v in base.state_dict().items() if k.endswith((".qweight", ".lookup_table"))
    }
    torch.save(state, tmp_path / "old-style.pt")
    imported = import_squeezellm(tmp_path / "old-style.pt", str(tiny_model_dir))
    assert torch.equal(imported(X).logits, base(X).logits)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_model_dir):
    model, config = _quantized()
    out = save_quantized(model, tmp_path / "ckpt", config.as_dict())
    other = make_llama(hidden=96)
    other.config.to_json_file(out / "config.json")
    with pytest.raises(
        SqlabError,
        match=r"model\.layers\.0\.\S+\.qweight in .* has shape \(\d+, 64\); "
        r"this model \(\d+ -> 96\) needs \(\d+, 96\)",
    ):
        load_quantized(out, device="cpu")
    export = export_squeezellm(model, tmp_path / "m.pt")
    bigger = tmp_path / "bigger"
    make_llama(hidden=96).save_pretrained(bigger)
    with pytest.raises(SqlabError, match="has shape"):
        import_squeezellm(export, str(bigger))


def test_truncated_or_foreign_files_are_clear_errors(tmp_path, tiny_model_dir):
    model, config = _quantized()
    out = save_quantized(model, tmp_path / "ckpt", config.as_dict())
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SqlabError, match="missing, truncated or not a safetensors file"):
        load_quantized(out, device="cpu")
    (out / "quant_config.json").write_text("{not json")
    with pytest.raises(SqlabError, match="is not a sqlab checkpoint"):
        load_quantized(out, device="cpu")
    pt = export_squeezellm(model, tmp_path / "m.pt")
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(SqlabError, match="cannot read .* as a SqueezeLLM state dict"):
        import_squeezellm(pt, str(tiny_model_dir))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(SqlabError, match="holds no '\\*.qweight' tensors"):
        import_squeezellm(tmp_path / "foreign.pt", str(tiny_model_dir))


def test_saving_never_overwrites_foreign_data_or_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    model, config = _quantized()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SqlabError, match="exists and is not a sqlab checkpoint"):
        save_quantized(model, precious, config.as_dict())
    assert (precious / "notes.txt").read_text() == "keep me"

    import sqlab.files

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqlab.files, "open", broken, raising=False)  # the weights' writer
    with pytest.raises(SqlabError, match="cannot write .*model.safetensors'?: No space left"):
        save_quantized(model, tmp_path / "ckpt", config.as_dict())
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_fisher_cache_second_call_is_a_load(tiny_model_dir, text_file, monkeypatch):
    from sqlab import sensitivity
    from sqlab.models import load_tokenizer

    model = load(str(tiny_model_dir), device="cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    corpus = f"text:{text_file}"
    path = sensitivity.fisher_cache_path(model, corpus, 2, 16, 0)
    path.unlink(missing_ok=True)
    first = sensitivity.compute_fisher(
        model, tokenizer, corpus, nsamples=2, seqlen=16, progress=False
    )
    assert path.exists()
    monkeypatch.setattr(
        sensitivity, "fisher_information", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    second = sensitivity.compute_fisher(
        model, tokenizer, corpus, nsamples=2, seqlen=16, progress=False
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert sensitivity.fisher_cache_path(model, corpus, 3, 16, 0) != path
    assert sensitivity.fisher_cache_path(model, corpus, 2, 16, 1) != path
    path.unlink()
