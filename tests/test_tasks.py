"""lm-evaluation-harness tasks on a model in memory, offline: a task in a local YAML with local
JSON data, through the API, ``sqlab eval --tasks`` and the sweep table."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import sqlab
from sqlab import QuantConfig, RTNConfig, SqlabError, experiments, tasks
from tests.conftest import make_llama, run_cli

QUESTIONS = [
    ("Shall I compare thee to a", ["summer's day?", "winter's night?", "stone", "cold fish"], 0),
    ("Thou art more lovely and more", ["apples", "temperate", "cars", "seven"], 1),
    ("Rough winds do shake the darling buds of", ["steel", "glass", "May", "June"], 2),
    ("and summer's lease hath all too short a", ["date", "street", "war", "sea"], 0),
    ("Rough winds do shake the", ["iron", "darling buds", "kings", "wheels"], 1),
    ("Thou art more lovely and", ["more temperate", "less", "thus", "nine"], 0),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task defined the way lm-eval reads local data: dataset_path json."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "sonnet.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (folder / "sonnet_mc.yaml").write_text(
        "\n".join(
            [
                "task: sonnet_mc",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{question}}"',
                'doc_to_choice: "{{choices}}"',
                "doc_to_target: answer",
                "metric_list:",
                "  - metric: acc",
                "metadata:",
                "  version: 1.0",
                "",
            ]
        )
    )
    return folder


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQLAB_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        yield


def test_evaluate_tasks_on_a_model_in_memory(task_dir, tiny_tokenizer):
    model = make_llama()
    found = sqlab.evaluate_tasks(model, tiny_tokenizer, ["sonnet_mc"], include_path=task_dir)
    assert [r.task for r in found] == ["sonnet_mc"] and found[0].samples == len(QUESTIONS)
    acc = found[0].metrics["acc"]
    assert acc * len(QUESTIONS) == round(acc * len(QUESTIONS)) and found[0].main == ("acc", acc)
    limited = sqlab.evaluate_tasks(
        model, tiny_tokenizer, [str(task_dir / "sonnet_mc.yaml")], limit=2, batch_size=2
    )
    assert limited[0].samples == 2


def test_eval_tasks_on_a_model_and_a_quantized_checkpoint(
    tmp_path, task_dir, tiny_model_dir, tiny_tokenizer
):
    model = sqlab.load(str(tiny_model_dir), device="cpu")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    sqlab.quantize_model(
        model, config, sqlab.fisher_information(model, ids, progress=False), progress=False
    )
    ckpt = sqlab.save_quantized(model, tmp_path / "ckpt", config.as_dict(), tiny_tokenizer)
    for spec in (tiny_model_dir, ckpt):
        out = tmp_path / f"{spec.name}.json"
        status, stdout, stderr = run_cli(
            "eval",
            "--model",
            str(spec),
            "--tasks",
            "sonnet_mc",
            "--include-path",
            str(task_dir),
            "--json",
            str(out),
        )
        assert status == 0, stderr
        result = json.loads(out.read_text())
        acc = result["tasks"]["sonnet_mc"]["acc"]
        assert f"{spec} on sonnet_mc: acc {acc:.4f} (6 examples)" in stdout
        assert "perplexity" not in stdout and "ppl" not in result  # no --dataset: tasks only


def test_unknown_tasks_and_a_missing_lm_eval_are_one_line(task_dir, tiny_model_dir, monkeypatch):
    status, stdout, stderr = run_cli(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--tasks",
        "sonnet_mc,no_such_task",
        "--include-path",
        str(task_dir),
    )
    lines = [line for line in stderr.splitlines() if line.startswith("sqlab: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "unknown lm-eval task 'no_such_task'" in lines[0] and "--include-path" in lines[0]
    with pytest.raises(SqlabError, match="task folder .* does not exist"):
        tasks.task_manager(["sonnet_mc"], task_dir / "missing")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SqlabError, match=r"pip install 'sqlab\[eval\]'"):
        tasks.task_manager(["sonnet_mc"], task_dir)


def test_sweep_table_shows_accuracy_beside_perplexity(task_dir, tiny_model_dir, text_file):
    evaluation = experiments.EvalSettings(
        (f"text:{text_file}",), 32, 2, tasks=("sonnet_mc",), include_path=str(task_dir)
    )
    sweeper = experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False)
    frame = sweeper.run([RTNConfig(wbits=4)])
    assert "acc:sonnet_mc" in experiments.tidy(frame).columns
    assert frame["acc:sonnet_mc"].between(0, 1).all() and len(frame) == 2
    table = experiments.render(frame)
    assert "acc:sonnet_mc" in table.splitlines()[0] and f"text:{text_file}"[:12] in table
    again = sweeper.run([RTNConfig(wbits=4)])
    assert again["cached"].all()
    assert again["acc:sonnet_mc"].tolist() == frame["acc:sonnet_mc"].tolist()
    # settings without tasks keep the cache keys they had
    assert "tasks" not in experiments.EvalSettings().as_dict(512)


def test_builtin_next_line_task():
    plays = [
        "\n".join(f"Line number {i} of the play, spoken aloud." for i in range(40)),
        "\n".join(f"Another verse {i} with five words or more." for i in range(40)),
    ]
    items = tasks.next_line_items(plays, count=10, choices=4, seed=3)
    assert len(items) == 10 and items == tasks.next_line_items(plays, count=10, choices=4, seed=3)
    for item in items:
        assert len(set(item["choices"])) == 4
        number = int(item["context"].split()[2])
        assert item["choices"][item["answer"]].split()[2] == str(number + 1)
    assert not tasks._verse("FIRST WITCH.") and not tasks._verse("[Exeunt.]")
