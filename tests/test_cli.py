import json
import math

from tests.conftest import run_cli


def test_eval_on_a_local_model_and_text_writes_json(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "res" / "out.json"
    status, stdout, stderr = run_cli(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        f"text:{text_file}",
        "--seqlen",
        "32",
        "--max-windows",
        "3",
        "--json",
        str(out),
    )
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert set(result) == {"model", "dataset", "seqlen", "windows", "ppl"}
    assert result["seqlen"] == 32 and result["windows"] == 3 and math.isfinite(result["ppl"])
    assert f"perplexity {result['ppl']:.3f}" in stdout


def test_bench_prints_speed_and_memory(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    status, stdout, stderr = run_cli(
        "bench",
        "--model",
        str(tiny_model_dir),
        "--tokens",
        "4",
        "--repeats",
        "2",
        "--json",
        str(out),
    )
    assert status == 0, stderr
    assert "tokens/s" in stdout and "weights" in stdout and "MB" in stdout
    assert "median of 2 runs" in stdout and "eager generate()" in stdout
    assert "CUDA graph:       not measured (CUDA graphs need a GPU" in stdout or "x eager" in stdout
    result = json.loads(out.read_text())
    assert result["repeats"] == 2 and result["decode_ms_spread"][0] <= result["decode_ms_per_token"]


def test_bad_input_is_one_line_not_a_traceback(tiny_model_dir, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Shall I compare thee to a summer's day?")
    cases = [
        (("eval", "--model", "no-such-model"), "unknown model spec 'no-such-model'"),
        (("eval", "--model", "./missing"), "model path './missing' does not exist"),
        (
            ("eval", "--model", str(tiny_model_dir), "--dataset", "imagenet"),
            "unknown dataset 'imagenet'",
        ),
        (
            ("eval", "--model", str(tiny_model_dir), "--dataset", "text:/nope.txt"),
            "'/nope.txt' does not exist",
        ),
        (
            (
                "eval",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                f"text:{text_file}",
                "--seqlen",
                "1024",
            ),
            "seqlen 1024 is longer than the model's context (256 tokens)",
        ),
        (
            (
                "eval",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                f"text:{short}",
                "--seqlen",
                "250",
            ),
            "is longer than the evaluation text",
        ),
    ]
    for argv, message in cases:
        status, stdout, stderr = run_cli(*argv)
        assert status == 2, (argv, stderr)
        assert message in stderr, (argv, stderr)
        assert "Traceback" not in stderr
    status, _, stderr = run_cli("eval", "--seqlen", "0")
    assert status == 2 and "expected a positive integer, got '0'" in stderr


def test_eval_default_model_on_shakespeare(tmp_path):
    """The issue's acceptance command: a finite perplexity in the tens."""
    out = tmp_path / "out.json"
    status, stdout, stderr = run_cli(
        "eval",
        "--model",
        "default",
        "--dataset",
        "shakespeare",
        "--seqlen",
        "512",
        "--max-windows",
        "8",
        "--json",
        str(out),
    )
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert result["windows"] == 8 and result["seqlen"] == 512
    assert 10 < result["ppl"] < 100


def test_quantize_then_eval_the_checkpoint(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "tiny-w3"
    status, stdout, stderr = run_cli(
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--wbits",
        "3",
        "--outlier-pct",
        "0.45",
        "--sensitive-pct",
        "0.05",
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
    assert "SqueezeLLM 3-bit 0.45%+0.05%" in stdout and "bits/weight" in stdout
    report = json.loads((out / "quant_report.json").read_text())
    assert report["config"]["wbits"] == 3 and len(report["layers"]) == 14
    assert not (tmp_path / "tiny-w3.work").exists()
    status, stdout, stderr = run_cli(
        "eval",
        "--model",
        str(out),
        "--dataset",
        f"text:{text_file}",
        "--seqlen",
        "32",
        "--max-windows",
        "2",
        "--json",
        str(tmp_path / "e.json"),
    )
    assert status == 0, stderr
    assert math.isfinite(json.loads((tmp_path / "e.json").read_text())["ppl"])


def test_quantize_bad_input(tiny_model_dir, text_file, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    cases = [
        (("--outlier-pct", "100"), r"outlier_pct is a percentage in [0, 100), got 100.0"),
        (("--calib", "nope"), "unknown dataset 'nope'"),
        (("--out", str(foreign)), "exists and is not a sqlab checkpoint"),
    ]
    for extra, message in cases:
        argv = [
            "quantize",
            "--model",
            str(tiny_model_dir),
            "--calib",
            f"text:{text_file}",
            "--nsamples",
            "1",
            "--seqlen",
            "16",
            "--out",
            str(tmp_path / "o"),
            *extra,
        ]
        status, _, stderr = run_cli(*argv)
        assert status == 2 and message in stderr and "Traceback" not in stderr, (extra, stderr)
    status, _, stderr = run_cli(
        "quantize", "--model", str(tiny_model_dir), "--wbits", "5", "--out", "x"
    )
    assert status == 2 and "invalid choice: 5" in stderr
    assert (foreign / "keep.txt").read_text() == "x"


def test_demo_fast_mode_prints_the_table_with_the_method_ordering(tmp_path):
    """A small real quantization of the default model, checked against the unquantized model."""
    import os
    import subprocess
    import sys

    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sqlab.cli", "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "SQLAB_FAST": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    rows = {r["label"]: {**r, "ppl": r["ppl_shakespeare"]} for r in table["rows"]}
    assert len(rows) == 7 and "SqueezeLLM 3-bit dense" in proc.stdout
    assert table["quantized_blocks"] == "0-1 (fast mode)"
    fp = rows["unquantized (fp16 size)"]["ppl"]
    for wbits in (3, 4):
        rtn = rows[f"RTN {wbits}-bit per-channel"]
        dense = rows[f"SqueezeLLM {wbits}-bit dense"]
        sparse = rows[f"SqueezeLLM {wbits}-bit 0.45%+0.05%"]
        assert dense["ppl"] < rtn["ppl"]
        assert wbits < dense["bits_per_weight"] < sparse["bits_per_weight"] < wbits + 1
        assert abs(dense["ppl"] - fp) / fp < 0.1  # two quantized blocks stay close to the reference
    assert rows["SqueezeLLM 3-bit 0.45%+0.05%"]["ppl"] < rows["SqueezeLLM 3-bit dense"]["ppl"]
    # a second run is a lookup
    again = subprocess.run(
        [sys.executable, "-m", "sqlab.cli", "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "SQLAB_FAST": "1"},
    )
    assert again.returncode == 0 and again.stdout.count("(cached)") == 7
