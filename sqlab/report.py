"""The paper's figures and tables on the default model, as sections of a report.

``paper_sections()`` builds every section (figures, and notes that check the
paper's claims against our numbers); ``write_report()`` writes them as one
self-contained HTML file (plotly embedded, opens offline). Both run through the
experiment engine, so once the points are cached the report renders in seconds.
Each section says which of the paper's figures or tables it reproduces, on what,
and what differs from the paper's setting.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import assets, baselines, evaluate, experiments, models, viz
from .config import MethodConfig, RTNConfig, SqueezeLLMConfig
from .preset import preset

MODEL_NOTE = (
    "SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, hidden 576) instead of "
    "LLaMA-7B/13B/30B/65B; reference weights are the dequantized values of its published Q4_1 GGUF"
)
DATA_NOTE = (
    "Shakespeare evaluation plays (macbeth, tempest) instead of WikiText-2/C4; windows of {seqlen} "
    "tokens instead of 2048; calibration {nsamples} x {calib_seqlen} tokens of other plays instead "
    "of 100 x 2048 from C4"
)


@dataclass
class Section:
    key: str
    title: str
    reproduces: str
    setting: str
    differs: str
    figures: list = field(default_factory=list)  # plotly figures (sqlab.viz)
    notes: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None


def _gap_notes(ppl: dict[str, float], bits: list[int]) -> list[str]:
    """The paper's main-table claims, checked on our numbers, in plain words."""
    fp = ppl["unquantized (fp16 size)"]
    notes = []
    for b in bits:
        dense, gptq, rtn = (
            ppl[f"SqueezeLLM {b}-bit dense"],
            ppl[f"GPTQ {b}-bit per-channel"],
            ppl[f"RTN {b}-bit per-channel"],
        )
        verdict = "agrees with the paper" if dense < gptq else "does NOT agree with the paper"
        notes.append(
            f"{b}-bit: SqueezeLLM dense-only reaches perplexity {dense:.2f} against GPTQ "
            f"per-channel {gptq:.2f} and RTN {rtn:.2f} (unquantized {fp:.2f}); dense-only beating "
            f"GPTQ at the same bit width {verdict}."
        )
    if 3 in bits:
        gap_sq = ppl["SqueezeLLM 3-bit 0.45%+0.05%"] - fp
        gap_gptq = ppl["GPTQ 3-bit per-channel"] - fp
        ratio = gap_gptq / gap_sq if gap_sq > 0 else math.inf
        notes.append(
            f"3-bit gap to the unquantized model: SqueezeLLM 0.45%+0.05% {gap_sq:.2f}, GPTQ "
            f"per-channel {gap_gptq:.2f}, {ratio:.1f}x smaller ("
            + (
                "the paper's at-least-2x holds here)."
                if ratio >= 2
                else "short of the 2x the paper reports)."
            )
        )
    return notes


class PaperReport:
    """Computes the sections; one model, one sweeper, everything cached."""

    def __init__(self, fast: bool = False, progress: bool = True):
        self.settings = preset(fast)
        self.progress = progress
        evaluation = experiments.EvalSettings(("shakespeare",), None, self.settings.windows)
        self.sweeper = experiments.Sweeper(
            "default", evaluation, progress=progress, blocks=self.settings.blocks
        )
        self.model, self.tokenizer = self.sweeper.model, self.sweeper.tokenizer
        self.fisher = self.sweeper.fisher(SqueezeLLMConfig(**self.settings.calib))
        self.weights = {
            n: self.sweeper.pristine[f"{n}.weight"] for n in models.quantizable_linears(self.model)
        }

    @property
    def data_note(self) -> str:
        c = self.settings.calib
        note = DATA_NOTE.format(
            seqlen=self.sweeper.seqlen, nsamples=c["nsamples"], calib_seqlen=c["seqlen"]
        )
        if self.settings.fast:
            note += (
                "; FAST MODE: only decoder blocks 0-1 quantized and 2 evaluation windows, numbers "
                "are not comparable"
            )
        return note

    def point(self, config: MethodConfig | None) -> dict:
        return self.sweeper.run_point(config)

    def config(self, wbits: int = 3, **kw) -> SqueezeLLMConfig:
        return SqueezeLLMConfig(wbits=wbits, **self.settings.calib, **kw)

    # -- sections -------------------------------------------------------------------------------

    def memory_wall(self, gpu_results: dict | None = None) -> Section:
        fast = self.settings.fast
        bandwidth = evaluate.memory_bandwidth("cpu", megabytes=64 if fast else 256)
        # fast mode: small matrices, few copies (they stay in cache; the figure's shape only)
        rows = evaluate.gemv_timings(
            FAST_GEMV_SHAPES if fast else GEMV_SHAPES,
            repeats=3 if fast else 7,
            cache_bytes=2**20 if fast else None,
        )
        largest = max((tuple(r["shape"]) for r in rows), key=lambda shape: shape[0] * shape[1])
        at = {r["format"]: r for r in rows if tuple(r["shape"]) == largest}
        table = pd.DataFrame(
            [
                {
                    "format": viz.FORMAT_NAMES[f],
                    "µs": r["us_median"],
                    "spread µs": f"{r['us_min']:.0f}-{r['us_max']:.0f}",
                    "GB/s": r["gbs"],
                    "vs fp32": at["fp32"]["us_median"] / r["us_median"],
                    "vs bf16": at["bf16"]["us_median"] / r["us_median"],
                }
                for f, r in at.items()
            ]
        )
        figures = [
            viz.memory_wall(rows, bandwidth),
            viz.table(table, f"Batch-1 GEMV of a {largest[0]}x{largest[1]} matrix on this CPU"),
        ]
        fp32 = statistics.median(r["gbs"] for r in rows if r["format"] == "fp32")
        notes = [
            f"All points are measured on this CPU ({torch.get_num_threads()} threads, copy "
            f"bandwidth {bandwidth:.1f} GB/s), each call reading its own copy of the weights from "
            f"memory: the fp32 GEMVs reach {fp32:.1f} GB/s (median), so time follows bytes read.",
            f"At {largest[0]}x{largest[1]} the 3-bit LUT-GEMV takes {at['w3']['us_median']:.0f} "
            f"µs: {at['fp32']['us_median'] / at['w3']['us_median']:.1f}x faster than fp32 and "
            f"{at['bf16']['us_median'] / at['w3']['us_median']:.1f}x faster than bf16; with the "
            f"0.45% sparse part {at['fp32']['us_median'] / at['w3s']['us_median']:.1f}x faster "
            "than fp32. The packed kernel decodes indices at a fraction of memory speed, which on "
            "this CPU, not the bandwidth, sets its time.",
        ]
        if gpu_results:
            gpu_figures, gpu_notes = gpu_memory_wall(gpu_results)
            figures += gpu_figures
            notes += gpu_notes
        else:
            notes.append(
                "No GPU results file found (benchmarks/kernels.py --json out/kernels.json): "
                "CPU only."
            )
        return Section(
            "memory_wall",
            "Memory wall",
            "Figure 1 (right) / Section 3: decoding is memory bound",
            "this machine's CPU: random matrices of the default model's and LLaMA-7B's shapes, "
            "torch fp32/bf16 against sqlab's packed CPU LUT-GEMV",
            "measured on a CPU, not an A6000/A100"
            + ("; FAST MODE: small matrices that stay in cache" if fast else ""),
            figures,
            notes,
            table,
        )

    def distributions(self, name: str = "model.layers.15.mlp.down_proj") -> Section:
        profile = self.sweeper.profile()
        ranges = {pct: profile.solve(pct) for pct in (0.05, 0.45)}
        thresholds = {f"{pct}% model-wide": profile.threshold(name, r) for pct, r in ranges.items()}
        hist = viz.weight_histogram(
            self.weights[name], thresholds, title=f"Weights of {name} with outlier thresholds"
        )
        fisher = viz.fisher_histogram({name: self.fisher[name]})
        share = 100 * profile.exact_count(name, ranges[0.45]) / self.weights[name].numel()
        return Section(
            "distributions",
            "Weight and sensitivity distributions of one layer",
            "Figure 2 / Figure 3: long-tailed weights and Fisher values",
            MODEL_NOTE,
            self.data_note,
            [hist, fisher],
            [f"At the model-wide 0.45% setting this matrix has {share:.3f}% outliers."],
        )

    def nonuniform(self, name: str = "model.layers.15.self_attn.q_proj", wbits: int = 3) -> Section:
        levels, errors = baselines.grid_comparison(self.weights[name], self.fisher[name], wbits)
        row = int(errors[errors.method == "RTN grid"].sort_values("weighted_error").iloc[-1]["row"])
        fig_row = viz.row_quantization(
            self.weights[name][row],
            self.fisher[name][row],
            {k: v[row] for k, v in levels.items()},
            title=f"{wbits}-bit levels of row {row} of {name}",
        )
        rows = {
            "RTN grid": self.point(RTNConfig(wbits=wbits)),
            "k-means": self.point(self.config(wbits, weighted=False)),
            "Fisher-weighted k-means": self.point(self.config(wbits)),
        }
        per_layer = viz.per_layer_error(
            {k: pd.DataFrame(v["layers"]) for k, v in rows.items()}, "mse"
        )
        totals = errors.groupby("method")[["weighted_error", "mse"]].sum()
        notes = [
            f"{name}: weighted error RTN {totals.loc['RTN grid', 'weighted_error']:.3g}, k-means "
            f"{totals.loc['k-means', 'weighted_error']:.3g}, Fisher-weighted "
            f"{totals.loc['Fisher-weighted k-means', 'weighted_error']:.3g}."
        ]
        notes += [f"{k}: perplexity {v['ppl_shakespeare']:.2f}" for k, v in rows.items()]
        return Section(
            "nonuniform",
            "Sensitivity-based non-uniform quantization",
            "Figure 2 (left/middle): uniform vs non-uniform vs sensitivity-weighted centroids",
            MODEL_NOTE,
            self.data_note,
            [fig_row, per_layer],
            notes,
        )

    def main_table(self, wbits=(3, 4)) -> Section:
        configs = experiments.paper_configs(wbits, **self.settings.calib)
        frame = self.sweeper.run(configs)
        table = experiments.tidy(frame)[["label", "bits_per_weight", "size_mb", "ppl_shakespeare"]]
        ppl = dict(zip(frame["label"], frame["ppl_shakespeare"]))
        return Section(
            "main_table",
            "Main table: perplexity at 3 and 4 bits",
            "Table 1: RTN, GPTQ, SqueezeLLM (0%, 0.05%, 0.45%) with effective bits",
            MODEL_NOTE,
            self.data_note + "; GPTQ/RTN g128 groups leave a shorter last group (576 = 4x128 + 64)",
            [
                viz.table(
                    table, title="Perplexity (lower is better) and effective bits per weight"
                ),
                viz.ppl_vs_size(frame),
            ],
            _gap_notes(ppl, list(wbits)),
            table,
        )

    def ablations(self) -> Section:
        weighting = {
            "plain k-means": self.point(self.config(3, weighted=False)),
            "Fisher-weighted": self.point(self.config(3)),
        }
        kinds = {
            "dense-only": self.point(self.config(3)),
            "outliers only (0.45%)": self.point(self.config(3, outlier_pct=0.45)),
            "sensitive only (0.05%)": self.point(self.config(3, sensitive_pct=0.05)),
            "both (0.45% + 0.05%)": self.point(
                self.config(3, outlier_pct=0.45, sensitive_pct=0.05)
            ),
        }
        levels = [
            (0.0, 0.0),
            (0.0, 0.05),
            (0.05, 0.05),
            (0.2, 0.05),
            (0.45, 0.05),
            (0.7, 0.05),
            (0.95, 0.05),
        ]
        sweep = [
            (o + s, self.point(self.config(3, outlier_pct=o, sensitive_pct=s))) for o, s in levels
        ]
        bars = viz.ablation_bars(
            [{k: r["ppl_shakespeare"] for k, r in group.items()} for group in (weighting, kinds)],
            "Ablations at 3 bits: sensitivity weighting, and what the sparse part holds",
        )
        curve = viz.sparsity_curve(
            [(sparse, r["ppl_shakespeare"], r["bits_per_weight"]) for sparse, r in sweep],
            "Perplexity versus sparsity level at 3 bits (0.05% sensitive + outliers)",
        )
        w = {k: r["ppl_shakespeare"] for k, r in weighting.items()}
        k = {name: r["ppl_shakespeare"] for name, r in kinds.items()}
        helps = w["Fisher-weighted"] < w["plain k-means"]
        verdict = "helps, as in the paper" if helps else "does NOT help here"
        notes = [
            f"Sensitivity weighting: {w['Fisher-weighted']:.2f} against {w['plain k-means']:.2f} "
            f"for plain k-means ({verdict}).",
            "Sparse part: " + ", ".join(f"{name} {v:.2f}" for name, v in k.items()) + ".",
        ]
        return Section(
            "ablations",
            "Ablations",
            "Table 4/5 and Figure 4: weighting on/off, outliers vs sensitive "
            "values, sparsity level",
            MODEL_NOTE,
            self.data_note,
            [bars, curve],
            notes,
        )

    def latency(self, gpu_results: dict | None = None) -> Section:
        if gpu_results:
            return gpu_latency(gpu_results)
        rows = [
            {
                **self.sweeper.speed(
                    config, new_tokens=self.settings.tokens, repeats=self.settings.repeats
                ),
                "label": label,
            }
            for label, config in (
                ("unquantized", None),
                ("3-bit", self.config(3)),
                ("4-bit", self.config(4)),
                ("3-bit + 0.45% sparse", self.config(3, outlier_pct=0.45, sensitive_pct=0.05)),
            )
        ]
        base = rows[0]
        for row in rows:
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["linears_vs_fp32"] = row["linear_weights_mb"] / base["linear_weights_mb"]
        table = pd.DataFrame(rows)[
            [
                "label",
                "tokens_per_s",
                "decode_ms_per_token",
                "speedup",
                "linear_weights_mb",
                "linears_vs_fp32",
                "weights_mb",
                "peak_memory_mb",
            ]
        ]
        three = rows[1]
        notes = [
            f"Packed 3-bit decodes {three['speedup']:.2f}x as many tokens/s as the unquantized "
            f"fp32 model (median of {three.get('repeats', '?')} runs after a warm-up; spreads in "
            f"the figure), and holds its decoder linears in {three['linears_vs_fp32']:.2f}x of "
            "their fp32 memory.",
            "Peak memory is the process's peak RSS, which includes the reference model this report "
            "keeps loaded; benchmarks/cpu_decode.py measures each model in a process of its own.",
            "No GPU results file found: CPU figures, not the paper's setting.",
        ]
        return Section(
            "latency",
            "Latency and memory (CPU)",
            "Table 3: generation latency and peak memory",
            "this machine's CPU, default model, greedy decoding at batch 1; packed layers run the "
            "CPU LUT-GEMV straight from their 3/4-bit indices",
            "measured on a CPU, not an A6000; "
            "GPU numbers come from benchmarks/generate.py on a GPU",
            [viz.table(table, "Greedy decoding on this CPU"), viz.speed_bars(rows)],
            notes,
            table,
        )


GEMV_SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
FAST_GEMV_SHAPES = [(576, 576), (1536, 576)]
KERNEL_COLUMNS = ["shape", "tokens", "kernel", "us", "gbs", "pct_peak", "speedup_vs_fp16"]
GENERATE_COLUMNS = [
    "label",
    "tokens_per_s",
    "decode_ms_per_token",
    "speedup_vs_fp16",
    "graph_tokens_per_s",
    "graph_speedup_vs_fp16",
    "linear_weights_mb",
    "linear_weights_vs_fp16",
    "peak_memory_mb",
]


def gpu_memory_wall(results: dict) -> tuple[list, list[str]]:
    """The memory wall on a GPU, from ``benchmarks/kernels.py --json``: time against bytes read,
    per kernel.
    """
    table_rows = pd.DataFrame(results["rows"])
    rows = (
        table_rows[table_rows["tokens"] == 1] if "tokens" in table_rows else table_rows
    )  # the figure: batch 1
    device, peak = results.get("device", "GPU"), results.get("peak_gbps")
    fig = viz.gpu_memory_wall(rows.to_dict(orient="records"), peak, device)
    table = viz.table(
        table_rows,
        title=f"GPU kernels on {device} (benchmarks/kernels.py)",
        columns=[c for c in KERNEL_COLUMNS if c in table_rows],
    )
    notes = []
    for kernel, part in rows[rows["wbits"] < 16].groupby("kernel", sort=False):
        notes.append(
            f"{device}: {kernel} at 1 token is {part['speedup_vs_fp16'].min():.2f}-"
            f"{part['speedup_vs_fp16'].max():.2f}x faster than the torch fp16 matmul"
            + (f", at {part['pct_peak'].max():.0f}% of peak bandwidth" if peak else "")
            + (
                f" ({part['pct_measured_peak'].max():.0f}% of the measured device-to-device copy)"
                if "pct_measured_peak" in part
                else ""
            )
            + "."
        )
    return [fig, table], notes


def gpu_latency(results: dict) -> Section:
    """Table 3 from ``benchmarks/generate.py --json``: decoding a LLaMA-7B-shaped model on a GPU."""
    table = pd.DataFrame(results["rows"])
    table = table[[c for c in GENERATE_COLUMNS if c in table]]
    device = results.get("device", "?")
    rows = {r["label"]: r for r in results["rows"]}
    notes = ["From benchmarks/generate.py."]
    if "fp16" in rows and "3-bit" in rows:
        speedup = rows["fp16"]["decode_ms_per_token"] / rows["3-bit"]["decode_ms_per_token"]
        notes.append(
            f"3-bit decodes {speedup:.2f}x as many tokens/s as fp16 with eager generate() (the "
            "paper reports 2.1-2.4x on an A6000 for LLaMA-7B)."
        )
        graph = [rows[k].get("graph_decode_ms_per_token") for k in ("fp16", "3-bit")]
        if all(graph):
            notes.append(
                "Replaying one captured CUDA graph per token, 3-bit decodes "
                f"{graph[0] / graph[1]:.2f}x as many tokens/s as fp16."
            )
    return Section(
        "latency",
        "Latency and memory",
        "Table 3: generation latency and peak memory",
        f"GPU: {device}, LLaMA-7B-shaped model, random weights",
        "random weights (speed does not depend on values)",
        [
            viz.table(table, f"Greedy decoding of a LLaMA-7B-shaped model on {device}"),
            viz.speed_bars(results["rows"]),
        ],
        notes,
        table,
    )


def gpu_results(name: str) -> dict | None:
    """A GPU benchmark's JSON: your own run (``benchmarks/NAME.py --json out/NAME.json``) if
    there is one, else the committed ``benchmarks/results/<device>-NAME.json`` (the first by
    name when several devices were measured); None when neither exists."""
    root = assets.REPO_DATA.parent
    own = root / "out" / f"{name}.json"
    committed = sorted((root / "benchmarks" / "results").glob(f"*-{name}.json"))
    path = own if own.exists() else (committed[0] if committed else None)
    return json.loads(path.read_text()) if path is not None else None


def paper_sections(fast: bool = False, progress: bool = True) -> list[Section]:
    report = PaperReport(fast, progress)
    return [
        report.memory_wall(gpu_results("kernels")),
        report.distributions(),
        report.nonuniform(),
        report.main_table(),
        report.ablations(),
        report.latency(gpu_results("generate")),
    ]


def render_html(sections: list[Section], title: str = "SqueezeLLM on the default model") -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
        ".meta{color:#444;font-size:.92em;background:#f4f6fa;padding:.6em 1em;border-radius:6px}"
        "li{margin:.3em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Reproduced with sqlab from cached experiment results. Every section names the paper's "
        "figure or table it reproduces and what differs from the paper's setting.</p>",
    ]
    first = True
    for s in sections:
        parts.append(f"<h2 id='{s.key}'>{html.escape(s.title)}</h2>")
        parts.append(
            f"<div class='meta'><b>Reproduces:</b> {html.escape(s.reproduces)}<br>"
            f"<b>Setting:</b> {html.escape(s.setting)}<br><b>Differs from the paper:</b> "
            f"{html.escape(s.differs)}</div>"
        )
        for fig in s.figures:
            parts.append(
                fig.to_html(full_html=False, include_plotlyjs="inline" if first else False)
            )
            first = False
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in s.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path, fast: bool = False, progress: bool = True) -> Path:
    """Write ``report.html`` (self-contained) and ``report.json``
    (the notes and tables) into ``out``.
    """
    sections = paper_sections(fast, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(render_html(sections), encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps(
            [
                {
                    "key": s.key,
                    "title": s.title,
                    "reproduces": s.reproduces,
                    "setting": s.setting,
                    "differs": s.differs,
                    "notes": s.notes,
                    "table": None if s.table is None else s.table.to_dict(orient="records"),
                }
                for s in sections
            ],
            indent=1,
            default=str,
        )
    )
    return out / "report.html"
