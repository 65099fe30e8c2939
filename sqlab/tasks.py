"""Accuracy on lm-evaluation-harness tasks, for a model already in memory.

``evaluate_tasks(model, tokenizer, ["hellaswag"])`` wraps the model (quantized or
not) in lm-eval's ``HFLM``, so nothing is loaded again from the hub, and runs
``lm_eval.simple_evaluate``. Task names are those lm-eval knows, task YAML files,
or tasks defined in the YAML files of ``include_path``; offline, a task reads
local data (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

One task is built in and needs no network: ``shakespeare_next_line``, 100
multiple-choice questions from the evaluation plays (a line of verse; which of
four lines of the same play follows it), written into ``data/cache/tasks`` on
first use. lm-eval is the ``eval`` extra (``pip install 'sqlab[eval]'``).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import assets, data, files
from .errors import SqlabError

log = logging.getLogger(__name__)

BUILTIN = "shakespeare_next_line"
NEXT_LINE_ITEMS, NEXT_LINE_CHOICES = 100, 4
# the metric a table shows for a task, in order of preference
PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "mcc")


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]  # e.g. {"acc": 0.41, "acc_norm": 0.44}, stderr left out
    samples: int  # examples scored

    @property
    def main(self) -> tuple[str, float]:
        """The metric a table shows: accuracy where the task has it."""
        name = next((m for m in PREFERRED if m in self.metrics), sorted(self.metrics)[0])
        return name, self.metrics[name]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise SqlabError(
            f"lm-eval tasks need the lm-eval package ({exc}); install it with "
            "pip install 'sqlab[eval]'"
        ) from None
    return lm_eval


def _verse(line: str) -> bool:
    """A line of spoken verse: not a speaker's name, a stage direction or a heading."""
    heading = line.startswith(("[", "ACT", "SCENE")) or re.match(r"^[A-Z][A-Z .']+\.", line)
    return len(line.split()) >= 5 and not line.isupper() and not heading


def next_line_items(
    texts: Sequence[str],
    count: int = NEXT_LINE_ITEMS,
    choices: int = NEXT_LINE_CHOICES,
    seed: int = 0,
) -> list[dict]:
    """Questions ``{"context", "choices", "answer"}``: which of ``choices`` lines of the same
    play follows ``context``, drawn evenly from ``texts`` with a fixed seed."""
    rng = random.Random(seed)
    items: list[dict] = []
    for number, text in enumerate(texts):
        lines = [line.strip() for line in text.splitlines()]
        pairs = [(a, b) for a, b in zip(lines, lines[1:]) if _verse(a) and _verse(b)]
        pool = sorted({b for _, b in pairs})
        share = count // len(texts) + (number < count % len(texts))
        for context, answer in rng.sample(pairs, min(share, len(pairs))):
            options = [answer, *rng.sample([line for line in pool if line != answer], choices - 1)]
            rng.shuffle(options)
            items.append({"context": context, "choices": options, "answer": options.index(answer)})
    return items


def _builtin_yaml(data_file: Path) -> str:
    return "\n".join(
        [
            f"task: {BUILTIN}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "test_split: test",
            "output_type: multiple_choice",
            'doc_to_text: "{{context}}\\n"',
            'target_delimiter: ""',
            'doc_to_choice: "{{choices}}"',
            "doc_to_target: answer",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def builtin_tasks_dir() -> Path:
    """The folder of the built-in task (its YAML and JSON lines), written on first use."""
    folder = assets.cache_dir("tasks")
    data_file = folder / f"{BUILTIN}.jsonl"
    if not data_file.exists():
        items = next_line_items(data.shakespeare_texts("eval"))
        files.write_text(data_file, "".join(json.dumps(item) + "\n" for item in items))
    yaml_file, text = folder / f"{BUILTIN}.yaml", _builtin_yaml(data_file)
    if not yaml_file.exists() or yaml_file.read_text() != text:  # the data folder may have moved
        files.write_text(yaml_file, text)
    return folder


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def task_manager(names: Sequence[str], include_path: str | Path | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``names``, or ``SqlabError``.

    Local tasks (the built-in one, ``include_path``, YAML files) are looked up
    first; lm-eval's own index (some seconds to build) only when a name is not local.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    names = list(names)
    if not names:
        raise SqlabError(f"no lm-eval task given; name at least one, e.g. --tasks {BUILTIN}")
    if include_path is not None and not Path(include_path).is_dir():
        raise SqlabError(f"task folder {str(include_path)!r} does not exist")
    paths = [builtin_tasks_dir()] if BUILTIN in names else []
    paths += [Path(include_path)] if include_path is not None else []
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(n in manager.all_tasks or _is_yaml(n) for n in names):
        return manager
    manager = TaskManager(include_path=[str(p) for p in paths])
    unknown = [n for n in names if n not in manager.all_tasks and not _is_yaml(n)]
    if unknown:
        raise SqlabError(
            f"unknown lm-eval task {unknown[0]!r}; give a task lm-eval knows (list "
            f"them with `lm-eval ls tasks`), the built-in {BUILTIN!r}, a task YAML "
            "file, or --include-path DIR with your task YAML files"
        )
    return manager


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    names: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> list[TaskResult]:
    """Score ``model`` on lm-eval tasks; one ``TaskResult`` per task (and per subtask of a group).

    ``limit`` scores the first N examples of each task; ``num_fewshot`` overrides
    the tasks' own; ``seed`` fixes lm-eval's sampling of few-shot examples.
    """
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(names, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except SqlabError:
        raise
    except (KeyError, ValueError, OSError, ImportError) as exc:  # a task's definition or data
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SqlabError(
            f"lm-eval could not run {', '.join(names)}: {said}; offline, a task needs "
            "local data (dataset_path: json with data_files)"
        ) from exc
    results = []
    for task, values in out["results"].items():
        metrics = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and "stderr" not in key and isinstance(value, (int, float))
        }
        if not metrics:
            continue  # a group without an aggregate; its subtasks are listed
        samples = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        results.append(TaskResult(task, metrics, int(samples)))
    return results
