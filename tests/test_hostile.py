"""Hostile but fair input: every case ends in a clear error or a correct result.

Each case runs through the command line (``sqlab.cli.main``, as the ``sqlab``
script does; a few in a real subprocess) and through the Python API, and
checks: exit status 2 with exactly one ``sqlab: error:`` line naming the value,
no traceback, the files present before still there, and no temporary directory
left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sqlab
from sqlab import QuantConfig, RTNConfig, SqlabError, config_for, files
from sqlab.cli import main
from tests.conftest import SAMPLE_TEXT, make_llama, run_cli

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Caches (Fisher, tokens) go to a fresh data directory, so each run computes for real."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQLAB_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture(scope="module")
def packed(base):
    """A sparse 3-bit packed model of ``base`` (through the API: no calibration text needed)."""
    model = sqlab.load_model(str(base), device="cpu")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    fisher = sqlab.fisher_information(model, ids, progress=False)
    sqlab.quantize_model(model, config, fisher, progress=False)
    return model, config


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, corpus) -> Path:
    """A checkpoint written by ``sqlab quantize`` with ``quantize_args``."""
    out = tmp_path_factory.mktemp("reference") / "ckpt"
    assert main([str(a) for a in quantize_args(base, corpus, out)]) == 0
    return out


@pytest.fixture
def ckpt(tmp_path, packed, tiny_tokenizer) -> Path:
    model, config = packed
    return sqlab.save_quantized(model, tmp_path / "ckpt", config.as_dict(), tiny_tokenizer)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``sqlab ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def refused(result: tuple[int, str, str], *names: str) -> str:
    """Exit status 2, one ``sqlab: error:`` line naming every one of ``names``, no traceback."""
    status, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("sqlab: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary directories, locks and work directories in ``folder``."""
    return sorted(
        p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith((".lock", ".work"))
    )


def quantize_args(base: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    args = (
        "quantize",
        "--model",
        base,
        "--calib",
        f"text:{corpus}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--outlier-pct",
        "0.45",
        "--sensitive-pct",
        "0.05",
        "--out",
        out,
        *extra,
    )
    return [str(a) for a in args]


def edit_weights(ckpt: Path, edit) -> None:
    path = ckpt / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=meta)


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only folder, or /sys for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys"), Path("/proc")):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(name)
    pytest.skip("every folder is writable here")


# --- data lost -------------------------------------------------------------------------------


def test_quantize_never_replaces_a_checkpoint_without_overwrite_and_keeps_other_files(
    capsys, tmp_path, base, corpus, packed, tiny_tokenizer
):
    out = tmp_path / "ckpt"
    assert cli(capsys, *quantize_args(base, corpus, out))[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "results").mkdir()
    (out / "results" / "ppl.csv").write_text("ppl\n12.3\n")
    before = snapshot(out)

    again = quantize_args(base, corpus, out, "--wbits", "4")
    message = refused(cli(capsys, *again), str(out), "--overwrite")
    assert "already holds a sqlab checkpoint" in message
    assert snapshot(out) == before

    status, _, err = cli(capsys, *again, "--overwrite")
    assert status == 0, err
    after = snapshot(out)
    assert after["notes.txt"] == b"my notes" and after["results/ppl.csv"] == b"ppl\n12.3\n"
    assert json.loads(after["quant_config.json"])["wbits"] == 4
    assert sqlab.load(str(out), device="cpu").model.layers[0].self_attn.q_proj.wbits == 4
    assert leftovers(tmp_path) == []

    # the API: a saved checkpoint is replaced only with overwrite=True; files it recorded and the
    # new one lacks go (the tokenizer here), files sqlab did not write stay
    model, config = packed
    with pytest.raises(SqlabError, match="already holds a sqlab checkpoint; pass --overwrite"):
        sqlab.save_quantized(model, out, config.as_dict(), tiny_tokenizer)
    assert snapshot(out) == after
    sqlab.save_quantized(model, out, config.as_dict(), overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "quant_config.json",
        "notes.txt",
        "results",
    }
    assert json.loads((out / "quant_config.json").read_text())["files"] == [
        "config.json",
        "model.safetensors",
        "quant_config.json",
    ]


def test_out_that_is_not_a_checkpoint_is_refused_even_with_overwrite(
    capsys, tmp_path, base, corpus, packed
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    for extra in ((), ("--overwrite",)):
        result = cli(capsys, *quantize_args(base, corpus, mine, *extra))
        refused(result, str(mine), "not a sqlab checkpoint")
    with pytest.raises(SqlabError, match="not a sqlab checkpoint"):
        sqlab.save_quantized(packed[0], mine, {}, overwrite=True)
    assert snapshot(mine) == {"config.json": b"{}"}


# --- silent wrong results ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "part, value, message",
    [
        ("lookup_table", float("nan"), "lookup_table contains NaN or Inf"),
        ("lookup_table", float("inf"), "lookup_table contains NaN or Inf"),
        ("vals", float("nan"), "the sparse values contain NaN or Inf"),
    ],
)
def test_non_finite_checkpoint_values_are_refused(capsys, ckpt, corpus, part, value, message):
    edit_weights(ckpt, lambda state: state[f"{LAYER}.{part}"].view(-1)[3].fill_(value))
    refused(
        cli(capsys, "eval", "--model", ckpt, "--dataset", f"text:{corpus}", "--seqlen", "32"),
        f"{LAYER}",
        message,
    )
    with pytest.raises(SqlabError, match=f"{LAYER}.*{message}"):
        sqlab.load_quantized(ckpt, device="cpu")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weights_are_refused_by_every_method(capsys, tmp_path, corpus, tiny_tokenizer, method):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    refused(
        cli(
            capsys,
            "quantize",
            "--model",
            path,
            "--method",
            method,
            "--calib",
            f"text:{corpus}",
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--out",
            out,
        ),
        "model.layers.1.mlp.up_proj",
        "NaN",
    )
    assert not out.exists() and leftovers(tmp_path) == []
    from sqlab.experiments import quantize

    config = config_for(method, 3, calib=f"text:{corpus}", nsamples=2, seqlen=16)
    with pytest.raises(SqlabError, match="weights of model.layers.1.mlp.up_proj contain NaN"):
        quantize(model, tiny_tokenizer, config, cache=False, progress=False)
    assert torch.isnan(model.model.layers[1].mlp.up_proj.weight).sum() == 1  # nothing spread


def _moe(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = {
        "vocab_size": 320,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
    }
    torch.manual_seed(0)
    if kind == "mixtral":
        config = MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
        return MixtralForCausalLM(config)
    config = Qwen2MoeConfig(
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        **common,
    )
    return Qwen2MoeForCausalLM(config)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused_naming_the_expert_tensors(
    capsys, tmp_path, corpus, tiny_tokenizer, kind
):
    model = _moe(kind).eval()
    path = tmp_path / kind
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    for method in ("squeezellm", "rtn"):
        result = cli(
            capsys,
            "quantize",
            "--model",
            path,
            "--method",
            method,
            "--calib",
            f"text:{corpus}",
            "--nsamples",
            "1",
            "--seqlen",
            "16",
            "--out",
            tmp_path / "out",
        )
        refused(result, "model.layers.0.mlp.experts.gate_up_proj", "mixture-of-experts")
    assert not (tmp_path / "out").exists()
    ids = torch.randint(0, 320, (1, 16))
    with pytest.raises(SqlabError, match=r"layers\.0\.mlp\.experts\.down_proj \(4, 64, \d+\)"):
        sqlab.fisher_information(model, ids, progress=False)
    with pytest.raises(SqlabError, match="experts.gate_up_proj"):
        sqlab.quantize_model(model, QuantConfig(weighted=False), progress=False)
    with pytest.raises(SqlabError, match="experts.gate_up_proj"):
        sqlab.rtn_quantize_model(model, RTNConfig())


def test_float_qweight_is_refused_on_import_not_cast(tmp_path, base, packed):
    path = sqlab.export_squeezellm(packed[0], tmp_path / "sq-w3.pt")
    state = torch.load(path, weights_only=True)
    state[f"{LAYER}.qweight"] = state[f"{LAYER}.qweight"].float()
    torch.save(state, path)
    with pytest.raises(
        SqlabError,
        match=rf"{LAYER}\.qweight in .* is torch\.float32; it must hold "
        "integers",
    ):
        sqlab.import_squeezellm(path, str(base))


@pytest.mark.parametrize("stated", [5, 4, "3", [3, 4]])
def test_quant_config_must_state_the_tensors_bit_width(capsys, ckpt, corpus, stated):
    quant = json.loads((ckpt / "quant_config.json").read_text())
    (ckpt / "quant_config.json").write_text(json.dumps({**quant, "wbits": stated}))
    refused(
        cli(capsys, "eval", "--model", ckpt, "--dataset", f"text:{corpus}", "--seqlen", "32"),
        f"says wbits {stated!r}",
        "3-bit look-up tables",
    )
    with pytest.raises(SqlabError, match="3-bit look-up tables"):
        sqlab.load_quantized(ckpt, device="cpu")


@pytest.mark.parametrize("seqlen", ["4096", "1000000"])
def test_quantize_seqlen_longer_than_the_context_is_refused(
    capsys, tmp_path, base, corpus, seqlen, monkeypatch
):
    import sqlab.data

    monkeypatch.setattr(sqlab.data, "calib_documents", lambda *a: pytest.fail("read the corpus"))
    for method in ("squeezellm", "gptq"):
        args = quantize_args(base, corpus, tmp_path / "out", "--method", method)
        if method == "gptq":
            args = [a for a in args if not a.endswith("-pct") and a not in ("0.45", "0.05")]
        args[args.index("--seqlen") + 1] = seqlen
        refused(cli(capsys, *args), f"seqlen {seqlen} is longer than the model's context (256")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    model = sqlab.load_model(str(base), device="cpu")
    with pytest.raises(SqlabError, match="longer than the model's context"):
        sqlab.compute_fisher(model, None, f"text:{corpus}", nsamples=1, seqlen=int(seqlen))


def _interrupted_run(capsys, monkeypatch, base, corpus, out):
    """``sqlab quantize`` stopped by Ctrl-C after its first block: ``out.work`` holds block 0."""
    from sqlab.quantize import _WorkDir

    real = _WorkDir.save

    def save_then_stop(self, index, block):
        real(self, index, block)
        raise KeyboardInterrupt

    monkeypatch.setattr(_WorkDir, "save", save_then_stop)
    assert cli(capsys, *quantize_args(base, corpus, out))[0] == 130
    monkeypatch.setattr(_WorkDir, "save", real)
    work = out.with_name(out.name + ".work")
    assert [p.name for p in work.glob("block_*")] == ["block_0000.safetensors"]
    return work


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x10  # a byte of tensor data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty"])
def test_damaged_block_files_are_redone_and_the_result_is_exact(
    capsys, caplog, tmp_path, base, corpus, reference, monkeypatch, damage
):
    out = tmp_path / "resumed"
    block = _interrupted_run(capsys, monkeypatch, base, corpus, out) / "block_0000.safetensors"
    if damage == "flipped":
        _flip(block)
    else:
        block.write_bytes(block.read_bytes()[:100] if damage == "truncated" else b"")
    status, _, err = cli(capsys, *quantize_args(base, corpus, out))
    assert status == 0, err
    assert "block 0" in caplog.text and "quantizing the block again" in caplog.text
    assert snapshot(out) == snapshot(reference)  # byte for byte
    assert leftovers(tmp_path) == []


def test_damaged_run_json_is_rewritten_and_the_blocks_checked_one_by_one(caplog, tmp_path):
    from sqlab.quantize import _WorkDir

    config, work = QuantConfig(weighted=False), tmp_path / "work"
    first, again = make_llama(), make_llama()
    sqlab.quantize_model(first, config, work_dir=work, progress=False)
    (work / "run.json").write_text('{"config": {"wbi')  # a write cut short
    calls = []
    real = _WorkDir.save
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_WorkDir, "save", lambda self, i, b: calls.append(i) or real(self, i, b))
        sqlab.quantize_model(again, config, work_dir=work, progress=False)
    assert calls == [] and "run.json is damaged" in caplog.text  # every block was reused
    assert json.loads((work / "run.json").read_text())["config"]["wbits"] == 3
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# --- tracebacks instead of one line ------------------------------------------------------------


def test_binary_text_corpus_is_refused(capsys, tmp_path, base):
    for name, data in (("weights.bin", bytes(range(256)) * 4), ("zeros.txt", b"text\0\0\0more")):
        binary = tmp_path / name
        binary.write_bytes(data)
        result = cli(capsys, "eval", "--model", base, "--dataset", f"text:{binary}")
        refused(result, str(binary), "UTF-8 text")
        result = cli(capsys, *quantize_args(base, binary, tmp_path / "out"))
        refused(result, str(binary), "UTF-8 text")
        with pytest.raises(SqlabError, match="takes a UTF-8 text file"):
            sqlab.eval_text(f"text:{binary}")
    assert not (tmp_path / "out").exists()


def test_damaged_model_files_are_refused(capsys, tmp_path, base, corpus):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    fake = tmp_path / "model.gguf"
    fake.write_text("not a gguf file, just text\n")
    for spec in (broken, fake):
        refused(cli(capsys, "eval", "--model", spec, "--dataset", f"text:{corpus}"), str(spec))
        with pytest.raises(SqlabError, match="could not load model"):
            sqlab.load_model(str(spec))
    result = cli(capsys, "quantize", "--model", broken, "--out", tmp_path / "o")
    message = refused(result, str(broken))
    assert "could not load model" in message and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda s: s[f"{LAYER}.cols"].view(-1)[0].fill_(64),
            "column index 64 out of range; the layer has 64 inputs",
        ),
        (lambda s: s[f"{LAYER}.cols"].view(-1)[0].fill_(-1), "column index -1 out of range"),
        (lambda s: s[f"{LAYER}.rows"].view(-1)[-1].add_(1), "rows must rise from 0 to nnz"),
        (lambda s: s[f"{LAYER}.rows"].view(-1)[5].fill_(10**6), "rows must rise from 0 to nnz"),
    ],
)
def test_malformed_sparse_part_is_refused(capsys, ckpt, corpus, damage, message):
    edit_weights(ckpt, damage)
    result = cli(capsys, "eval", "--model", ckpt, "--dataset", f"text:{corpus}", "--seqlen", "32")
    refused(result, LAYER, message)
    with pytest.raises(SqlabError, match=f"{LAYER}: {message}"):
        sqlab.load_quantized(ckpt, device="cpu")


def test_out_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, base, corpus, monkeypatch
):
    import sqlab.models

    monkeypatch.setattr(sqlab.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    regular = tmp_path / "file.txt"
    regular.write_text("mine")
    refused(cli(capsys, *quantize_args(base, corpus, regular)), str(regular), "is a file")
    refused(cli(capsys, *quantize_args(base, corpus, regular / "sub")), str(regular), "is a file")
    folder = unwritable(tmp_path)
    result = cli(capsys, *quantize_args(base, corpus, folder / "out"))
    refused(result, str(folder / "out"), "not writable")
    refused(cli(capsys, *quantize_args(base, corpus, "/")), "'/'", "names no directory")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    refused(cli(capsys, *quantize_args(base, corpus, ".")), "--out '.'", "not a sqlab checkpoint")
    assert regular.read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_out_dot_in_an_empty_folder_is_written_there(capsys, tmp_path, base, corpus, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    status, _, err = cli(capsys, *quantize_args(base, corpus, "."))
    assert status == 0, err
    assert sqlab.checkpoint.is_checkpoint(here) and leftovers(tmp_path) == []


def test_json_that_cannot_be_written_is_refused_before_the_evaluation(
    capsys, tmp_path, base, corpus, monkeypatch
):
    import sqlab.evaluate

    monkeypatch.setattr(sqlab.evaluate, "perplexity", lambda *a, **k: pytest.fail("evaluated"))
    folder = unwritable(tmp_path)
    for target in (folder / "result.json", tmp_path):
        result = cli(
            capsys, "eval", "--model", base, "--dataset", f"text:{corpus}", "--json", target
        )
        refused(result, str(target))
        assert result[1] == ""  # nothing printed as if it had worked


def test_concurrent_runs_on_one_out_exclude_each_other(capsys, tmp_path, base, corpus, packed):
    out = tmp_path / "out"
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom sqlab import files\n"
        "with files.exclusive(Path(sys.argv[1]), 'test'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = refused(cli(capsys, *quantize_args(base, corpus, out)), f"--out '{out}'")
        assert f"another sqlab run (pid {holder.pid}" in message
        with pytest.raises(SqlabError, match=f"another sqlab run \\(pid {holder.pid}"):
            sqlab.save_quantized(packed[0], out, {})
    finally:
        holder.kill()  # dies holding the lock, as a run killed with -9 would
        holder.wait()
    assert not out.exists()
    assert cli(capsys, *quantize_args(base, corpus, out))[0] == 0  # the kernel released the lock
    assert leftovers(tmp_path) == []


def test_bad_values_of_the_api(tmp_path, base):
    with pytest.raises(SqlabError, match=r"wbits must be 3 or 4 \(an integer\), got 3.0"):
        QuantConfig(wbits=3.0)
    model = sqlab.load_model(str(base), device="cpu")
    tokens = torch.arange(400)
    with pytest.raises(
        SqlabError, match="token id 399 is out of range: the model's vocabulary has 320 tokens"
    ):
        sqlab.perplexity(model, tokens, seqlen=100, progress=False)
    with pytest.raises(SqlabError, match="token id -1 is out of range"):
        sqlab.perplexity(model, tokens - 1, seqlen=100, progress=False)


def test_usage_errors_and_a_tokenizer_of_another_model_are_one_line(
    capsys, tmp_path, corpus, tiny_tokenizer
):
    refused(cli(capsys, "quantize", "--wbits", "3.0", "--out", tmp_path / "o"), "--wbits", "'3.0'")
    refused(cli(capsys, "quantize", "--wbits", "5", "--out", tmp_path / "o"), "invalid choice: 5")
    small = tmp_path / "small-vocab"
    make_llama(vocab_size=100).save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    refused(
        cli(capsys, "eval", "--model", small, "--dataset", f"text:{corpus}", "--seqlen", "32"),
        "out of range",
        "vocabulary has 100 tokens",
    )


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickled_code_is_refused_without_suggesting_weights_only_false(tmp_path, base):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    qweight = torch.zeros(6, 64, dtype=torch.int32)
    torch.save({f"{LAYER}.qweight": qweight, "x": _Payload(marker)}, path)
    with pytest.raises(SqlabError) as info:
        sqlab.import_squeezellm(path, str(base))
    message = str(info.value)
    assert "reference to posix.makedirs" in message or "reference to os.makedirs" in message
    assert "never runs code" in message and "weights_only" not in message
    assert not marker.exists()


# --- leaks -------------------------------------------------------------------------------------


def test_temporary_output_of_a_killed_run_is_removed_by_the_next_save(
    capsys, tmp_path, base, corpus
):
    out = tmp_path / "out"
    with files.exclusive(out, "test"):
        killed = files.partial_dir(out)  # what a run killed while writing leaves behind
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    lookalike = tmp_path / f".{out.name}.tmp-mine"  # the user's, not sqlab's: no marker
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    assert cli(capsys, *quantize_args(base, corpus, out))[0] == 0
    assert not killed.exists() and (lookalike / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == [lookalike.name]


def test_checkpoints_are_byte_reproducible(
    capsys, tmp_path, base, corpus, reference, packed, tiny_tokenizer
):
    again = tmp_path / "again"
    assert cli(capsys, *quantize_args(base, corpus, again))[0] == 0
    assert snapshot(again) == snapshot(reference) and len(snapshot(again)) > 4
    model, config = packed
    a = sqlab.save_quantized(model, tmp_path / "a", config.as_dict(), tiny_tokenizer)
    b = sqlab.save_quantized(model, tmp_path / "b", config.as_dict(), tiny_tokenizer)
    assert snapshot(a) == snapshot(b)
    # safetensors writes metadata in hash order, which changes from run to run: sqlab sorts it
    keys = [f"key{i}" for i in range(12)]
    path = files.save_safetensors(
        {"t": torch.ones(3)}, tmp_path / "m.safetensors", {k: "v" for k in reversed(keys)}
    )
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(keys)  # in file order
    assert load_file(str(path))["t"].tolist() == [1.0, 1.0, 1.0]


def test_the_installed_command_gives_one_line_and_status_2(tmp_path, base, corpus):
    """The same refusals from the ``sqlab`` entry point in a fresh process."""
    folder = unwritable(tmp_path)
    status, stdout, stderr = run_cli(*quantize_args(base, corpus, folder / "out"))
    assert status == 2 and stderr.count("sqlab: error:") == 1 and "Traceback" not in stderr, stderr
    assert "not writable" in stderr and stdout == ""
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    status, _, stderr = run_cli("eval", "--model", str(base), "--dataset", f"text:{binary}")
    assert status == 2 and "is not UTF-8 text" in stderr and "Traceback" not in stderr, stderr


def test_lock_waits_for_nobody_and_is_reentrant(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    with files.exclusive(out, "test"), files.exclusive(out, "test"):
        assert files.lock_path(out).exists()
    assert not files.lock_path(out).exists() and time.perf_counter() - start < 5
