"""The experiment engine: one entry point for every method, and cached, resumable sweeps.

``quantize(model, tokenizer, config)`` runs SqueezeLLM, RTN or GPTQ with the same
calibration settings. ``run_sweep`` evaluates a list of configs and returns a
tidy table; every finished point is stored under ``data/cache/results`` by a
content key (model weights, the settings its method reads, the evaluation
settings), so running a sweep again is a lookup, and an interrupted sweep
resumes at the first missing point. Fisher information, SqueezeLLM look-up
tables and GPTQ Hessians are cached the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import assets, baselines, data, evaluate, files, models
from .config import CONFIGS, GPTQConfig, MethodConfig, RTNConfig, SqueezeLLMConfig, config_for
from .errors import SqlabError
from .preset import preset
from .quantize import QuantReport, quantize_model
from .sensitivity import compute_fisher

log = logging.getLogger(__name__)


_HANDLERS: dict[type, Callable] = {}


def handles(config_type: type[MethodConfig]):
    """Register the function that quantizes a model with configs of ``config_type``."""

    def register(fn):
        _HANDLERS[config_type] = fn
        return fn

    return register


def quantize(
    model: nn.Module,
    tokenizer,
    config: MethodConfig,
    *,
    fisher: dict | None = None,
    simulate: bool = False,
    work_dir: str | Path | None = None,
    blocks: list[int] | None = None,
    profile=None,
    cache: bool = True,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` in place with the method of ``config``, calibrating on ``config.calib``.

    SqueezeLLM computes (or loads) the Fisher information and packs
    ``SqueezeLinear`` layers unless ``simulate``; packing with ``cache`` keeps its
    finished blocks in ``data/cache/quant`` (unless a ``work_dir`` is given), so
    quantizing the same model with the same settings again is a load. A simulated
    run writes nothing (the sweeps cache its results). RTN and GPTQ always
    write their reconstructed weights into the ``nn.Linear`` layers (they have no
    packed format here). ``fisher``, when given, is also used to report the
    baselines' Fisher-weighted error per layer.
    """
    if hasattr(config, "seqlen"):
        models.check_seqlen(model, config.seqlen)  # before any calibration text is read
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise SqlabError(f"no quantizer is registered for {type(config).__name__}")
    return handler(
        model,
        tokenizer,
        config,
        fisher=fisher,
        simulate=simulate,
        work_dir=work_dir,
        blocks=blocks,
        profile=profile,
        cache=cache,
        progress=progress,
    )


@handles(SqueezeLLMConfig)
def _squeezellm(
    model,
    tokenizer,
    config: SqueezeLLMConfig,
    *,
    fisher,
    simulate,
    work_dir,
    blocks,
    profile,
    cache,
    progress,
) -> QuantReport:
    if fisher is None and config.needs_fisher:
        fisher = compute_fisher(
            model,
            tokenizer,
            config.calib,
            config.nsamples,
            config.seqlen,
            config.seed,
            cache=cache,
            progress=progress,
        )
    if (
        work_dir is None and cache and not simulate
    ):  # simulated points are cached as results instead
        work_dir = assets.cache_path("quant", config.key(models.fingerprint(model)))
    return quantize_model(
        model,
        config,
        fisher,
        simulate=simulate,
        work_dir=work_dir,
        blocks=blocks,
        profile=profile,
        progress=progress,
    )


def _linears_of(model, blocks: list[int] | None) -> set[str] | None:
    """The quantizable linears of the chosen blocks (None: all)."""
    if blocks is None:
        return None
    chosen = [models.decoder_blocks(model)[b][0] + "." for b in blocks]
    return {n for n in models.quantizable_linears(model) if n.startswith(tuple(chosen))}


@handles(RTNConfig)
def _rtn(model, tokenizer, config: RTNConfig, *, fisher, blocks, **_) -> QuantReport:
    return baselines.rtn_quantize_model(model, config, fisher, only=_linears_of(model, blocks))


@handles(GPTQConfig)
def _gptq(
    model, tokenizer, config: GPTQConfig, *, fisher, blocks, cache, progress, **_
) -> QuantReport:
    windows = data.calibration_windows(
        tokenizer, config.calib, config.nsamples, config.seqlen, config.seed
    )
    key = config.key(models.fingerprint(model), blocks) if cache else None
    return baselines.gptq_quantize_model(
        model,
        windows,
        config,
        fisher=fisher,
        cache_dir=assets.cache_path("hessians"),
        cache_key=key,
        only_blocks=blocks,
        progress=progress,
    )


def reference_config() -> dict:
    return {"method": "none", "label": "unquantized (fp16 size)", "wbits": 16}


def sweep_configs(
    methods=("squeezellm",),
    wbits=(3, 4),
    outlier_pct=(0.0,),
    sensitive_pct=(0.0,),
    groupsize=(None,),
    **common,
) -> list[MethodConfig]:
    """The grid: SqueezeLLM over outlier % × sensitive %, the baselines over group size.

    ``common`` settings (calibration, seed, ``weighted``, ``act_order``, ...) go to
    the methods that read them.
    """
    configs = []
    for method, bits in itertools.product(methods, wbits):
        if method == "squeezellm":
            grid = [
                {"outlier_pct": o, "sensitive_pct": s}
                for o, s in itertools.product(outlier_pct, sensitive_pct)
            ]
        else:
            grid = [{"groupsize": g or None} for g in groupsize]
        configs += [config_for(method, bits, **common, **cell) for cell in grid]
    return list(dict.fromkeys(configs))


# the paper's main table: RTN and GPTQ per channel and g128; SqueezeLLM dense-only,
# 0.05% (sensitive values only) and 0.45% outliers + 0.05% sensitive values
PAPER_BASELINES = (("rtn", None), ("rtn", 128), ("gptq", None), ("gptq", 128))
PAPER_SQUEEZELLM = ((0.0, 0.0), (0.0, 0.05), (0.45, 0.05))


def paper_configs(wbits=(3, 4), **common) -> list[MethodConfig]:
    configs = []
    for bits in wbits:
        configs += [config_for(m, bits, groupsize=g, **common) for m, g in PAPER_BASELINES]
        configs += [
            config_for("squeezellm", bits, outlier_pct=o, sensitive_pct=s, **common)
            for o, s in PAPER_SQUEEZELLM
        ]
    return configs


@dataclass
class EvalSettings:
    datasets: tuple[str, ...] = ("shakespeare",)
    seqlen: int | None = None  # None: 512 on the CPU, 2048 on a GPU
    max_windows: int | None = 32
    tasks: tuple[str, ...] = ()  # lm-eval tasks (sqlab.tasks): accuracy beside perplexity
    task_limit: int | None = None  # examples per task
    include_path: str | None = None  # a folder of the user's task YAMLs

    def as_dict(self, seqlen: int) -> dict:
        settings = {
            "datasets": list(self.datasets),
            "seqlen": seqlen,
            "max_windows": self.max_windows,
        }
        if self.tasks:  # only then, so results without tasks keep their cache keys
            settings.update(
                tasks=list(self.tasks), task_limit=self.task_limit, include_path=self.include_path
            )
        return settings


# bumped whenever a result row changes shape, so older cache entries are not reused
RESULT_SCHEMA = 2
SPEED_VERSION = 2  # speed rows: medians of repeated runs, spreads, linear weight memory


def result_key(fingerprint: str, point: dict, evaluation: dict) -> str:
    version = CONFIGS[point["method"]].version if point.get("method") in CONFIGS else None
    payload = json.dumps(
        [RESULT_SCHEMA, version, fingerprint, point, evaluation], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _WindowStore:
    """The windows of one point and dataset scored so far:
    ``{start: (NLL sum, tokens)}`` in a JSON file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.scored: dict[int, tuple[float, int]] = {}
        if path.exists():
            try:
                self.scored = {
                    int(k): (float(v[0]), int(v[1]))
                    for k, v in json.loads(path.read_text()).items()
                }
            except (ValueError, TypeError, IndexError, KeyError):
                log.warning("ignoring an unreadable window cache %s", path)

    def add(self, start: int, nll_sum: float, tokens: int) -> None:
        self.scored[start] = (nll_sum, tokens)
        files.write_json(self.path, {str(k): list(v) for k, v in sorted(self.scored.items())})


class Sweeper:
    """Evaluates configs on one model, each point cached on disk by content key.

    The model is loaded once; between points its original weights are restored
    in place (points run in simulate mode, which gives the packed model's
    numbers exactly).
    """

    def __init__(
        self,
        model_spec: str = "default",
        evaluation: EvalSettings | None = None,
        cache: bool = True,
        progress: bool = True,
        blocks: list[int] | None = None,
    ):
        self.spec, self.cache, self.progress = model_spec, cache, progress
        self.blocks = sorted(set(blocks)) if blocks is not None else None
        self.evaluation = evaluation or EvalSettings()
        for name in self.evaluation.datasets:
            data.parse_corpus(name)
        if self.evaluation.tasks:
            from .tasks import task_manager

            task_manager(self.evaluation.tasks, self.evaluation.include_path)  # names known?
        self.tokenizer = models.load_tokenizer(model_spec)
        self.model = models.load_model(model_spec)
        if self.model.device.type == "cpu":  # every point's forward passes reuse freed memory
            from .memory import reuse_freed_tensors

            reuse_freed_tensors()
        self.fingerprint = models.fingerprint(self.model)
        self.seqlen = self.evaluation.seqlen or (2048 if self.model.device.type == "cuda" else 512)
        self.pristine = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._tokens: dict[str, torch.Tensor] = {}
        self._fisher: dict[tuple, dict] = {}
        self._profile = None

    def tokens(self, dataset: str) -> torch.Tensor:
        if dataset not in self._tokens:
            self._tokens[dataset] = data.eval_tokens(self.tokenizer, dataset, self.seqlen)
        return self._tokens[dataset]

    def fisher(self, config: SqueezeLLMConfig) -> dict:
        key = (config.calib, config.nsamples, config.seqlen, config.seed)
        if key not in self._fisher:
            self._fisher[key] = compute_fisher(
                self.model, self.tokenizer, *key, cache=self.cache, progress=self.progress
            )
        return self._fisher[key]

    def profile(self):
        """The outlier profile of the unquantized weights, built once."""
        if self._profile is None:
            from .outliers import OutlierProfile

            names = models.quantizable_linears(self.model)
            self._profile = OutlierProfile({n: self.pristine[f"{n}.weight"] for n in names})
        return self._profile

    def key(self, point: dict) -> str:
        evaluation = self.evaluation.as_dict(self.seqlen)
        if self.blocks is not None:
            evaluation["blocks"] = self.blocks
        return result_key(self.fingerprint, point, evaluation)

    def cached(self, point: dict) -> dict | None:
        path = assets.cache_path("results", f"{self.key(point)}.json")
        if self.cache and path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                path.unlink()
        return None

    def speed(self, config: MethodConfig | None, new_tokens: int = 32, repeats: int = 5) -> dict:
        """Greedy decoding speed and memory of one point on this machine (``None``: unquantized).

        A fresh copy of the model is quantized (packed ``SqueezeLinear`` layers for
        SqueezeLLM) and timed with ``evaluate.generation_benchmark`` (median of
        ``repeats`` runs after a warm-up, with the spread); the row is cached like a
        result, keyed also by the device, the token count and how it was timed, so a
        report shows the measurement it took once instead of timing again.
        """
        from . import cpu_kernels

        point = (
            reference_config() if config is None else {**config.relevant(), "label": config.label()}
        )
        device = str(models.default_device())
        # what the numbers depend on besides the point: how it is timed and which kernel runs
        how = {
            "speed": new_tokens,
            "repeats": repeats,
            "device": device,
            "blocks": self.blocks,
            "timing": SPEED_VERSION,
            "cpu_kernel": device == "cpu" and cpu_kernels.available(),
        }
        key = result_key(self.fingerprint, point, how)
        path = assets.cache_path("speed", f"{key}.json")
        if self.cache and path.exists():
            return {**json.loads(path.read_text()), "cached": True}
        model = models.load_model(self.spec)
        if config is not None:
            quantize(
                model,
                self.tokenizer,
                config,
                fisher=self.fisher(config) if config.packed else None,
                blocks=self.blocks,
                cache=self.cache,
                progress=self.progress,
            )
        bench = evaluate.generation_benchmark(
            model, self.tokenizer, new_tokens=new_tokens, repeats=repeats
        )
        row = {"label": point["label"], **bench.as_dict()}
        if self.cache:
            files.write_json(path, row)
        return row

    def _evaluate(self, point: dict, on_estimate=None, row: dict | None = None) -> dict[str, float]:
        """Perplexity per dataset, window by window: each scored window is cached, so a point whose
        evaluation was cut short (or asked again with more windows) scores only what is missing.
        ``on_estimate(dataset, evaluate.Estimate, row)`` sees every intermediate estimate."""
        result = {}
        for d in self.evaluation.datasets:
            store = _WindowStore(
                assets.cache_path(
                    "windows",
                    result_key(
                        self.fingerprint,
                        point,
                        {"dataset": d, "seqlen": self.seqlen, "blocks": self.blocks},
                    )
                    + ".json",
                )
                if self.cache
                else None
            )
            estimate = None
            for estimate in evaluate.perplexity_estimates(
                self.model,
                self.tokens(d),
                self.seqlen,
                max_windows=self.evaluation.max_windows,
                scored=store.scored if store else None,
                on_window=store.add if store else None,
                progress=self.progress,
            ):
                if on_estimate is not None:
                    on_estimate(d, estimate, row or point)
            result[f"ppl_{d}"] = estimate.ppl
        result.update(self._task_scores())
        return result

    def _task_scores(self) -> dict[str, float]:
        """Each lm-eval task's accuracy (or main metric), in the columns ``task_column`` names."""
        if not self.evaluation.tasks:
            return {}
        from .tasks import evaluate_tasks

        found = evaluate_tasks(
            self.model,
            self.tokenizer,
            self.evaluation.tasks,
            include_path=self.evaluation.include_path,
            limit=self.evaluation.task_limit,
        )
        return {task_column(r.task, r.main[0]): r.main[1] for r in found}

    def _restore(self) -> None:
        self.model.load_state_dict(self.pristine)

    def run_point(self, config: MethodConfig | None, on_estimate=None) -> dict:
        """One row: ``None`` is the unquantized reference.

        ``on_estimate(dataset, estimate, row)`` is called as the perplexity of a new
        point refines window by window (``evaluate.Estimate``: value and 95% interval;
        ``row``: the point's settings and size, known before its evaluation).
        """
        point = (
            reference_config() if config is None else {**config.relevant(), "label": config.label()}
        )
        found = self.cached(point)
        if found is not None:
            return {**found, "cached": True}
        start = time.perf_counter()
        if config is None:
            weights = sum(
                m.weight.numel()
                for n, m in models.quantizable_linears(self.model).items()
                if self.blocks is None or models.split_name(n)[0] in self.blocks
            )
            row = {**point, "bits_per_weight": 16.0, "size_mb": weights * 2 / 2**20, "layers": []}
        else:
            fisher = self.fisher(config) if config.packed else None
            try:
                report = quantize(
                    self.model,
                    self.tokenizer,
                    config,
                    fisher=fisher,
                    simulate=True,
                    blocks=self.blocks,
                    profile=self.profile() if getattr(config, "uses_outliers", False) else None,
                    cache=self.cache,
                    progress=self.progress,
                )
                row = {
                    **point,
                    "bits_per_weight": report.bits_per_weight,
                    "size_mb": report.size_mb,
                    "bits_breakdown": report.bits_breakdown(),
                    "outlier_range": report.outlier_range,
                    "sparse_pct": report.sparse_pct if config.packed else 0.0,
                    "layers": [
                        {"name": s.name, "mse": s.mse, "weighted_error": s.weighted_error}
                        for s in report.layers
                    ],
                }
                row.update(self._evaluate(point, on_estimate, row))
            finally:
                self._restore()
        if config is None:
            row.update(self._evaluate(point, on_estimate, row))
        row["seconds"] = time.perf_counter() - start
        if self.cache:
            files.write_json(assets.cache_path("results", f"{self.key(point)}.json"), row)
        return {**row, "cached": False}

    def run(self, configs: list[MethodConfig], include_reference: bool = True, on_row=None):
        """All points as a pandas DataFrame (one row per point; per-layer errors in ``layers``)."""
        import pandas as pd

        points = ([None] if include_reference else []) + list(configs)
        rows = []
        for config in tqdm(
            points, desc="sweep", unit="point", disable=not self.progress, leave=False
        ):
            row = self.run_point(config)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return pd.DataFrame(rows)


TABLE_COLUMNS = (
    "label",
    "method",
    "wbits",
    "outlier_pct",
    "sensitive_pct",
    "groupsize",
    "act_order",
    "weighted",
    "bits_per_weight",
    "size_mb",
)


def task_column(task: str, metric: str) -> str:
    """The column of a task's accuracy (or main metric) in a sweep table, e.g. ``acc:hellaswag``."""
    return f"{metric}:{task}"


def _score_columns(frame) -> tuple[list[str], list[str]]:
    """The perplexity columns and the task columns of a sweep table."""
    return (
        [c for c in frame.columns if c.startswith("ppl_")],
        [c for c in frame.columns if ":" in c],
    )


def tidy(frame):
    """The table without per-layer details: settings, size, one perplexity column per dataset,
    one accuracy column per lm-eval task, time."""
    ppl, scores = _score_columns(frame)
    columns = [c for c in TABLE_COLUMNS if c in frame.columns] + ppl + scores
    columns += ["seconds", "cached"]
    return frame[columns]


def render(frame) -> str:
    """A plain-text table of a sweep."""
    ppl, scores = _score_columns(frame)
    names = [c[4:] for c in ppl] + scores
    widths = [max(12, len(n)) for n in names]
    head = (
        f"{'method':<38} {'bits/weight':>11} {'size MB':>8} "
        + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))
        + f" {'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for _, r in frame.iterrows():
        lines.append(
            f"{r['label']:<38} {r['bits_per_weight']:>11.3f} {r['size_mb']:>8.1f} "
            + " ".join(f"{r[c]:>{w}.3f}" for c, w in zip(ppl + scores, widths))
            + f" {r['seconds']:>7.1f}"
            + (" (cached)" if r.get("cached") else "")
        )
    return "\n".join(lines)


REFERENCE_NOTE = (
    "reference weights: SmolLM2-135M-Instruct dequantized from its published Q4_1 GGUF; "
    "computed in fp32 on the CPU, sized as fp16"
)


def run_demo(
    max_windows: int | None = None,
    seqlen: int | None = None,
    fast: bool = False,
    progress: bool = True,
):
    """The main job: the comparison table on the default model.

    Rows: unquantized; RTN per-channel 3/4-bit; SqueezeLLM dense-only and 0.45%
    outliers + 0.05% sensitive values at 3/4-bit. ``fast`` shrinks it to seconds:
    two decoder blocks, two evaluation windows, a tiny calibration set.
    Returns ``(frame, settings)``.
    """
    size = preset(fast)
    calib = size.calib
    configs = [RTNConfig(wbits=b) for b in (3, 4)]
    configs += [
        SqueezeLLMConfig(wbits=b, outlier_pct=o, sensitive_pct=s, **calib)
        for b in (3, 4)
        for o, s in ((0.0, 0.0), (0.45, 0.05))
    ]
    evaluation = EvalSettings(("shakespeare",), seqlen, max_windows or size.windows)
    sweeper = Sweeper("default", evaluation, progress=progress, blocks=size.blocks)
    frame = sweeper.run(configs)
    blocks = "0-1 (fast mode)" if fast else f"all {len(models.decoder_blocks(sweeper.model))}"
    settings = {
        "model": "default (SmolLM2-135M-Instruct)",
        "dataset": "shakespeare",
        "eval_texts": list(data.EVAL_TEXTS),
        "seqlen": sweeper.seqlen,
        "windows": evaluation.max_windows,
        "calibration": calib,
        "quantized_blocks": blocks,
        "note": REFERENCE_NOTE,
    }
    return frame, settings
