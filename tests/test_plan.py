"""sqlab plan: published LLaMA-2 and Mixtral configs planned from the meta device, and the plan's
memory checked against a measured Fisher pass on a tiny model."""

import json

import pytest
import torch

from sqlab import SqlabError, fisher_information
from sqlab import plan as planning
from sqlab.sensitivity import FisherStrategy
from tests.conftest import run_cli

# the published hyper-parameters (the models' config.json files)
LLAMA2 = {
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
CONFIGS = {
    "llama-2-7b": {
        **LLAMA2,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama-2-13b": {
        **LLAMA2,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "llama-2-70b": {
        **LLAMA2,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    },
}
PUBLISHED_PARAMS = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-2-70b": 68.98e9,
    "mixtral-8x7b": 46.7e9,
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, values in CONFIGS.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(values))
    return paths


@pytest.fixture(scope="module")
def shapes(configs):
    return {name: planning.model_shape(str(path), name) for name, path in configs.items()}


def test_parameters_are_counted_from_the_meta_model(shapes):
    for name, shape in shapes.items():
        assert shape.params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005), name
    seven = shapes["llama-2-7b"]
    assert seven.blocks == 32 and seven.matrices == 32 * 7
    assert seven.quantizable == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert seven.largest_linear == 4096 * 11008


@pytest.mark.parametrize(
    "name, gpus, devices",
    [("llama-2-7b", 1, 1), ("llama-2-13b", 1, 1), ("llama-2-13b", 2, 2), ("llama-2-70b", 8, 8)],
)
def test_the_judged_cases_get_a_strategy_that_fits(shapes, name, gpus, devices):
    found = planning.plan(name, gpus=gpus, gpu_mem_gb=80, cpu_mem_gb=512, shape=shapes[name])
    assert found.fisher["fits"] and found.fisher["devices"] == devices
    assert found.fisher["device_gb"] <= 80 * planning.USABLE
    assert found.quantize["streamed"] and found.quantize["kmeans"] == "fast"
    assert found.quantize["block_gb"] < found.quantize["in_memory_gb"] / 5
    stages = found.stages
    assert stages["weights"] == pytest.approx(shapes[name].params * 2 / 2**30)
    assert stages["fisher_accumulators"] == pytest.approx(shapes[name].quantizable * 4 / 2**30)
    assert stages["activations_checkpointed"] < stages["activations"] / 5
    text = planning.render(found)
    assert "strategy" in text and "Fisher: fits" in text and "estimates" in text
    if name == "llama-2-13b" and gpus == 1:  # weights + accumulators alone exceed one GPU
        assert found.fisher["offload"] != "none"


def test_a_small_host_sends_the_accumulators_to_disk(shapes):
    found = planning.plan(
        "llama-2-13b", gpus=1, gpu_mem_gb=80, cpu_mem_gb=32, shape=shapes["llama-2-13b"]
    )
    assert found.fisher["offload"] == "disk"
    cpu = planning.plan("llama-2-7b", cpu_mem_gb=64, shape=shapes["llama-2-7b"])
    assert cpu.fisher["fits"] and cpu.quantize["kmeans"] == "optimal"
    assert cpu.quantize["kmeans_seconds"] > 0
    small = planning.plan("llama-2-7b", cpu_mem_gb=24, shape=shapes["llama-2-7b"])
    assert not small.fisher["fits"] and "DOES NOT FIT" in planning.render(small)


def test_mixtral_is_planned_but_its_quantization_refused(shapes):
    found = planning.plan("mixtral-8x7b", gpus=2, gpu_mem_gb=80, shape=shapes["mixtral-8x7b"])
    assert not found.fisher and "mixture-of-experts" in found.notes[0]
    assert "strategy: none" in planning.render(found)


def test_the_command_prints_the_plan_and_json(configs, tmp_path):
    status, stdout, stderr = run_cli(
        "plan",
        "--model",
        str(configs["llama-2-70b"]),
        "--gpus",
        "8",
        "--gpu-mem",
        "80",
        "--cpu-mem",
        "1024",
    )
    assert status == 0, stderr
    assert "68.98B parameters" in stdout and "spread over 8 GPUs" in stdout
    status, stdout, stderr = run_cli(
        "plan", "--model", str(configs["llama-2-7b"]), "--gpus", "1", "--gpu-mem", "80", "--json"
    )
    assert status == 0, stderr
    found = json.loads(stdout)
    assert found["fisher"]["devices"] == 1 and found["stages"]["weights"] > 12
    status, _, stderr = run_cli("plan", "--model", str(configs["llama-2-7b"]), "--gpus", "1")
    assert status == 2 and "give each one's memory in GB (--gpu-mem)" in stderr
    status, _, stderr = run_cli("plan", "--model", "no-such/model-anywhere")
    assert (
        status == 2
        and stderr.startswith("sqlab: error: could not load")
        and len(stderr.strip().splitlines()) == 1
    )


def test_bad_values_name_what_is_accepted(shapes):
    with pytest.raises(SqlabError, match="gpus must be an integer >= 0, got -1"):
        planning.plan("x", gpus=-1, shape=shapes["llama-2-7b"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plan_matches_a_measured_fisher_pass(checkpointing):
    """Measured: the peak of live tensor bytes in the Fisher pass of a tiny LLaMA (operator
    accounting, parameters and accumulators included); planned: the same stages from the
    formulas. Within 25%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=96,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    seqlen = 256
    windows = torch.randint(0, 1000, (2, seqlen), generator=torch.Generator().manual_seed(0))
    measured = fisher_information(
        model,
        windows,
        progress=False,
        measure=True,
        strategy=FisherStrategy(checkpointing=checkpointing),
    )
    planned, _ = planning.fisher_need(
        planning.model_shape(config, "tiny"), seqlen, 4, checkpointing, "none"
    )
    assert measured.peak_bytes == pytest.approx(planned, rel=0.25), (measured.peak_bytes, planned)
