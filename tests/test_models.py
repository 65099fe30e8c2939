import pytest
import torch
from torch import nn

from sqlab import SqlabError, models
from tests.conftest import make_llama, make_opt


def test_llama_family_quantizable_linears(tiny_llama):
    assert models.family_of(tiny_llama).name == "llama"
    names = list(models.quantizable_linears(tiny_llama))
    assert len(names) == 2 * 7
    assert names[:7] == [f"model.layers.0.{n}" for n in models.LLAMA_LINEARS]
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_opt_family_quantizable_linears(tiny_opt):
    assert models.family_of(tiny_opt).name == "opt"
    names = list(models.quantizable_linears(tiny_opt))
    assert names[:6] == [f"model.decoder.layers.0.{n}" for n in models.OPT_LINEARS]
    assert len(names) == 12
    assert "lm_head" not in " ".join(names)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.inner = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 10)


def test_generic_fallback_takes_every_linear_inside_the_blocks():
    model = Toy()
    assert models.family_of(model).name == "generic"
    names = list(models.quantizable_linears(model))
    assert names == [f"blocks.{i}.{n}" for i in range(3) for n in ("mix", "inner.0", "inner.2")]


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(SqlabError, match="unsupported model family 'Linear'"):
        models.quantizable_linears(nn.Linear(4, 4))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "is empty"),
        ("nope", "unknown model spec 'nope'"),
        ("./missing-dir", "model path './missing-dir' does not exist"),
        ("/no/such/model.gguf", "does not exist"),
    ],
)
def test_bad_specs_name_the_value_and_what_is_accepted(spec, message):
    with pytest.raises(SqlabError, match=message) as err:
        models.resolve(spec)
    assert "'default'" in str(err.value) or "empty" in str(err.value)


def test_dir_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(SqlabError, match="has no config.json"):
        models.resolve(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(SqlabError, match="is not a .gguf file"):
        models.resolve(str(other))


def test_hub_id_resolves_to_the_hub():
    source = models.resolve("meta-llama/Llama-2-7b-hf")
    assert source.hub and source.path == "meta-llama/Llama-2-7b-hf"


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SqlabError, match="from the Hugging Face hub .the hub is unreachable"):
        models.load_model("sqlab-test/definitely-not-cached-model")


def test_local_directory_loads_fp32_on_cpu(tiny_model_dir):
    model = models.load_model(str(tiny_model_dir), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("summer's day", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_fingerprint_changes_with_weights_only():
    a, b = make_llama(seed=0), make_llama(seed=0)
    assert models.fingerprint(a) == models.fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert models.fingerprint(a) != models.fingerprint(b)
    assert models.fingerprint(make_opt()) != models.fingerprint(a)


def test_default_model_from_gguf_and_from_converted_directory():
    """The embedded default: the converted directory equals a fresh load of the .gguf file."""
    from sqlab import assets

    gguf = assets.data_dir() / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = models.load_model("default", device="cpu")
    assert models.family_of(model).name == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(models.quantizable_linears(model)) == 30 * 7
    assert getattr(model.config, "quantization_config", None) is None
    from_gguf = models.load_model(str(gguf), device="cpu")
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[name], from_gguf.state_dict()[name])


def test_split_name_gives_block_and_module():
    assert models.split_name("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert models.split_name("model.decoder.layers.11.fc1") == (11, "fc1")
    with pytest.raises(SqlabError, match="'lm_head' names no decoder block"):
        models.split_name("lm_head")
