import json
import math

from tests.conftest import run_cli


def test_eval_on_a_local_model_and_text_writes_json(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "res" / "out.json"
    status, stdout, stderr = run_cli("eval", "--model", str(tiny_model_dir), "--dataset", f"text:{text_file}",
                                     "--seqlen", "32", "--max-windows", "3", "--json", str(out))
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert set(result) == {"model", "dataset", "seqlen", "windows", "ppl"}
    assert result["seqlen"] == 32 and result["windows"] == 3 and math.isfinite(result["ppl"])
    assert f"perplexity {result['ppl']:.3f}" in stdout


def test_bench_prints_speed_and_memory(tiny_model_dir):
    status, stdout, stderr = run_cli("bench", "--model", str(tiny_model_dir), "--tokens", "4")
    assert status == 0, stderr
    assert "tokens/s" in stdout and "weights" in stdout and "MB" in stdout


def test_bad_input_is_one_line_not_a_traceback(tiny_model_dir, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Shall I compare thee to a summer's day?")
    cases = [
        (("eval", "--model", "no-such-model"), "unknown model spec 'no-such-model'"),
        (("eval", "--model", "./missing"), "model path './missing' does not exist"),
        (("eval", "--model", str(tiny_model_dir), "--dataset", "imagenet"), "unknown dataset 'imagenet'"),
        (("eval", "--model", str(tiny_model_dir), "--dataset", "text:/nope.txt"), "'/nope.txt' does not exist"),
        (("eval", "--model", str(tiny_model_dir), "--dataset", f"text:{text_file}", "--seqlen", "1024"),
         "seqlen 1024 is longer than the model's context (256 tokens)"),
        (("eval", "--model", str(tiny_model_dir), "--dataset", f"text:{short}", "--seqlen", "250"),
         "is longer than the evaluation text"),
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
    status, stdout, stderr = run_cli("eval", "--model", "default", "--dataset", "shakespeare", "--seqlen", "512",
                                     "--max-windows", "8", "--json", str(out))
    assert status == 0, stderr
    result = json.loads(out.read_text())
    assert result["windows"] == 8 and result["seqlen"] == 512
    assert 10 < result["ppl"] < 100
