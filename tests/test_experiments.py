import dataclasses
import json

import pytest
import torch

from sqlab import GPTQConfig, QuantConfig, RTNConfig, config_for
from sqlab import experiments
from sqlab import config as config_module
from tests.conftest import run_cli


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Sweeps write their caches under a temporary data directory."""
    monkeypatch.setenv("SQLAB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _settings(text_file):
    return dict(calib=f"text:{text_file}", nsamples=2, seqlen=16)


def test_quantize_dispatches_every_method(tiny_model_dir, text_file, isolated_cache):
    from sqlab import SqueezeLinear, load, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    for method, extra in (
        ("squeezellm", {"sensitive_pct": 0.5}),
        ("rtn", {"groupsize": 32}),
        ("gptq", {}),
    ):
        model = load(str(tiny_model_dir), device="cpu")
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        config = config_for(method, 4, **_settings(text_file), **extra)
        report = experiments.quantize(model, tokenizer, config, progress=False)
        assert (
            4 < report.bits_per_weight < 10 and len(report.layers) == 14
        )  # tiny rows: large LUT share
        layer = model.model.layers[0].mlp.up_proj
        if method == "squeezellm":
            assert isinstance(layer, SqueezeLinear) and layer.nnz > 0
        else:
            assert not torch.equal(layer.weight, before)


def test_cache_keys_change_with_what_matters_and_only_then():
    base = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    for change in (
        dict(wbits=4),
        dict(outlier_pct=0.4),
        dict(sensitive_pct=0.0),
        dict(calib="text:x"),
        dict(nsamples=8),
        dict(seqlen=256),
        dict(seed=1),
        dict(weighted=False),
    ):
        assert dataclasses.replace(base, **change).key() != base.key(), change
    rtn = RTNConfig(wbits=3, groupsize=128)
    assert (
        config_for("rtn", 3, groupsize=128, calib="text:x", nsamples=5, seed=3).key() == rtn.key()
    )
    assert RTNConfig(wbits=3, groupsize=64).key() != rtn.key()
    gptq = GPTQConfig(wbits=3)
    assert GPTQConfig(wbits=3, calib="text:x").key() != gptq.key()
    assert GPTQConfig(wbits=3, act_order=True).key() != gptq.key()
    assert config_for("gptq", 3, kmeans_restarts=5).key() == gptq.key()
    evaluation = {"datasets": ["shakespeare"], "seqlen": 512, "max_windows": 32}
    point = rtn.relevant()
    key = experiments.result_key("model-a", point, evaluation)
    assert experiments.result_key("model-a", point, dict(evaluation)) == key
    assert experiments.result_key("model-b", point, evaluation) != key
    assert experiments.result_key("model-a", point, {**evaluation, "max_windows": 8}) != key
    assert (
        experiments.result_key("model-a", point, {**evaluation, "datasets": ["wikitext2"]}) != key
    )


def test_a_method_version_bump_retires_its_cached_results_only(monkeypatch):
    sq, rtn = QuantConfig(wbits=3), RTNConfig(wbits=3)
    evaluation = {"datasets": ["shakespeare"], "seqlen": 512, "max_windows": 32}
    before = {
        c.method: (c.key(), experiments.result_key("m", c.relevant(), evaluation))
        for c in (sq, rtn)
    }
    monkeypatch.setattr(
        config_module.SqueezeLLMConfig, "version", config_module.SqueezeLLMConfig.version + 1
    )
    after = {
        c.method: (c.key(), experiments.result_key("m", c.relevant(), evaluation))
        for c in (sq, rtn)
    }
    assert after["rtn"] == before["rtn"]
    assert (
        after["squeezellm"][0] != before["squeezellm"][0]
        and after["squeezellm"][1] != before["squeezellm"][1]
    )


def test_grids_and_presets():
    grid = experiments.sweep_configs(
        ["squeezellm", "rtn"],
        [3, 4],
        [0, 0.45],
        [0, 0.05],
        [None, 128],
        calib="shakespeare",
        act_order=True,
    )
    assert len(grid) == 2 * 4 + 2 * 2
    assert {c.method for c in grid} == {"squeezellm", "rtn"} and not any(
        hasattr(c, "act_order") for c in grid
    )
    labels = [c.label() for c in experiments.paper_configs([3])]
    assert labels == [
        "RTN 3-bit per-channel",
        "RTN 3-bit g128",
        "GPTQ 3-bit per-channel",
        "GPTQ 3-bit g128",
        "SqueezeLLM 3-bit dense",
        "SqueezeLLM 3-bit 0%+0.05%",
        "SqueezeLLM 3-bit 0.45%+0.05%",
    ]


def test_ablation_switches_change_what_they_claim(tiny_model_dir, text_file, isolated_cache):
    evaluation = experiments.EvalSettings((f"text:{text_file}",), 32, 2)
    sweeper = experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False)
    s = _settings(text_file)
    from sqlab.quantize import quantize_model

    def counts(config):
        report = quantize_model(
            sweeper.model, config, sweeper.fisher(config), simulate=True, progress=False
        )
        sweeper._restore()
        return sum(x.outliers for x in report.layers), sum(x.sensitive for x in report.layers)

    assert (
        counts(QuantConfig(outlier_pct=1.0, **s))[1] == 0
        and counts(QuantConfig(outlier_pct=1.0, **s))[0] > 0
    )
    assert (
        counts(QuantConfig(sensitive_pct=1.0, **s))[0] == 0
        and counts(QuantConfig(sensitive_pct=1.0, **s))[1] > 0
    )
    both = counts(QuantConfig(outlier_pct=1.0, sensitive_pct=1.0, **s))
    assert both[0] > 0 and both[1] > 0


def test_sweep_is_cached_and_resumes(tiny_model_dir, text_file, isolated_cache, monkeypatch):
    evaluation = experiments.EvalSettings((f"text:{text_file}",), 32, 2)
    configs = [
        QuantConfig(wbits=3, **_settings(text_file)),
        RTNConfig(wbits=3),
        GPTQConfig(wbits=4, **_settings(text_file)),
    ]
    real = experiments.quantize
    calls = []

    def crash_on_gptq(model, tokenizer, config, **kw):
        calls.append(config.method)
        if config.method == "gptq":
            raise KeyboardInterrupt
        return real(model, tokenizer, config, **kw)

    monkeypatch.setattr(experiments, "quantize", crash_on_gptq)
    with pytest.raises(KeyboardInterrupt):
        experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False).run(configs)
    assert calls == ["squeezellm", "rtn", "gptq"]
    calls.clear()
    monkeypatch.setattr(
        experiments, "quantize", lambda *a, **k: calls.append(a[2].method) or real(*a, **k)
    )
    sweeper = experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False)
    frame = sweeper.run(configs)
    assert calls == ["gptq"]  # the finished points came from the cache
    assert list(frame["cached"]) == [True, True, True, False]
    assert list(frame["method"]) == ["none", "squeezellm", "rtn", "gptq"]
    # the pristine model is restored between points: the reference is unchanged
    calls.clear()
    again = experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False).run(configs)
    assert calls == [] and all(again["cached"])
    col = f"ppl_text:{text_file}"
    assert list(again[col]) == list(frame[col])
    table = experiments.tidy(frame)
    assert list(table.columns[:3]) == ["label", "method", "wbits"] and col in table.columns
    assert "layers" not in table.columns and len(frame["layers"][1]) == 14


def test_sweep_cli_writes_and_prints_the_table(tiny_model_dir, text_file, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SQLAB_DATA_DIR": str(tmp_path / "data")}
    argv = [
        sys.executable,
        "-m",
        "sqlab.cli",
        "sweep",
        "--model",
        str(tiny_model_dir),
        "--methods",
        "squeezellm,rtn",
        "--wbits",
        "3,4",
        "--outlier-pct",
        "0,1",
        "--sensitive-pct",
        "0",
        "--groupsize",
        "0,32",
        "--datasets",
        f"text:{text_file}",
        "--eval-seqlen",
        "32",
        "--max-windows",
        "2",
        "--calib",
        f"text:{text_file}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--out",
        str(tmp_path / "sweep"),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(rows) == 1 + 4 + 4
    assert "SqueezeLLM 3-bit 1%+0%" in proc.stdout and "RTN 4-bit g32" in proc.stdout
    assert (tmp_path / "sweep" / "results.csv").read_text().startswith("label,method,wbits")
    bad = subprocess.run(
        argv[:4] + ["--methods", "awq", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "unknown method 'awq'" in bad.stderr


def test_quantize_cli_baseline_writes_a_loadable_directory(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "gptq"
    status, stdout, stderr = run_cli(
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--method",
        "gptq",
        "--wbits",
        "4",
        "--groupsize",
        "32",
        "--calib",
        f"text:{text_file}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--out",
        str(out),
    )
    assert status == 0, stderr
    assert "GPTQ 4-bit g32" in stdout
    assert json.loads((out / "quant_config.json").read_text())["format"] == "sqlab-simulated-v1"
    status, _, stderr = run_cli(
        "eval",
        "--model",
        str(out),
        "--dataset",
        f"text:{text_file}",
        "--seqlen",
        "32",
        "--max-windows",
        "1",
    )
    assert status == 0, stderr
    status, _, stderr = run_cli(
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--method",
        "rtn",
        "--outlier-pct",
        "1",
        "--out",
        str(tmp_path / "y"),
    )
    assert status == 2 and "method 'rtn' keeps no sparse part" in stderr


def test_speed_is_measured_once_on_the_packed_model(
    tiny_model_dir, text_file, isolated_cache, monkeypatch
):
    from sqlab import SqueezeLinear, evaluate

    sweeper = experiments.Sweeper(
        str(tiny_model_dir), experiments.EvalSettings((f"text:{text_file}",), 32, 2), progress=False
    )
    measured = []
    real = evaluate.generation_benchmark

    def spy(model, tokenizer, new_tokens, repeats):
        measured.append(sum(isinstance(m, SqueezeLinear) for m in model.modules()))
        return real(model, tokenizer, new_tokens=new_tokens, repeats=repeats)

    monkeypatch.setattr(evaluate, "generation_benchmark", spy)
    config = QuantConfig(wbits=3, outlier_pct=1.0, **_settings(text_file))
    first = sweeper.speed(config, new_tokens=3)
    assert (
        measured == [14]
        and first["label"] == "SqueezeLLM 3-bit 1%+0%"
        and first["tokens_per_s"] > 0
    )
    assert sweeper.speed(config, new_tokens=3) == {**first, "cached": True} and len(measured) == 1
    sweeper.speed(config, new_tokens=4)  # another token count is another measurement
    reference = sweeper.speed(None, new_tokens=3)
    assert measured == [14, 14, 0] and reference["label"] == "unquantized (fp16 size)"
    assert len(list((isolated_cache / "cache" / "speed").glob("*.json"))) == 3
