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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from . import assets, baselines, evaluate, experiments, models, viz
from .config import QuantConfig

MODEL_NOTE = ("SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, hidden 576) instead of LLaMA-7B/13B/30B/65B; "
              "reference weights are the dequantized values of its published Q4_1 GGUF")
DATA_NOTE = ("Shakespeare evaluation plays (macbeth, tempest) instead of WikiText-2/C4; windows of {seqlen} tokens "
             "instead of 2048; calibration {nsamples} x {calib_seqlen} tokens of other plays instead of 100 x 2048 "
             "from C4")


@dataclass
class Section:
    key: str
    title: str
    reproduces: str
    setting: str
    differs: str
    figures: list[go.Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None


@dataclass
class Settings:
    fast: bool = False

    @property
    def windows(self) -> int:
        return 2 if self.fast else 32

    @property
    def blocks(self) -> list[int] | None:
        return [0, 1] if self.fast else None

    @property
    def calib(self) -> dict:
        return dict(calib="shakespeare", nsamples=2 if self.fast else 16, seqlen=128 if self.fast else 512)


def _gap_notes(ppl: dict[str, float], bits: list[int]) -> list[str]:
    """The paper's main-table claims, checked on our numbers, in plain words."""
    fp = ppl["unquantized (fp16 size)"]
    notes = []
    for b in bits:
        dense, gptq, rtn = ppl[f"SqueezeLLM {b}-bit dense"], ppl[f"GPTQ {b}-bit per-channel"], ppl[f"RTN {b}-bit per-channel"]
        verdict = "agrees with the paper" if dense < gptq else "does NOT agree with the paper"
        notes.append(f"{b}-bit: SqueezeLLM dense-only reaches perplexity {dense:.2f} against GPTQ per-channel "
                     f"{gptq:.2f} and RTN {rtn:.2f} (unquantized {fp:.2f}); dense-only beating GPTQ at the same "
                     f"bit width {verdict}.")
    if 3 in bits:
        gap_sq = ppl["SqueezeLLM 3-bit 0.45%+0.05%"] - fp
        gap_gptq = ppl["GPTQ 3-bit per-channel"] - fp
        ratio = gap_gptq / gap_sq if gap_sq > 0 else math.inf
        notes.append(f"3-bit gap to the unquantized model: SqueezeLLM 0.45%+0.05% {gap_sq:.2f}, GPTQ per-channel "
                     f"{gap_gptq:.2f}, {ratio:.1f}x smaller ("
                     + ("the paper's at-least-2x holds here)." if ratio >= 2 else "short of the 2x the paper reports)."))
    return notes


class PaperReport:
    """Computes the sections; one model, one sweeper, everything cached."""

    def __init__(self, fast: bool = False, progress: bool = True):
        self.settings = Settings(fast)
        self.progress = progress
        evaluation = experiments.EvalSettings(("shakespeare",), None, self.settings.windows)
        self.sweeper = experiments.Sweeper("default", evaluation, progress=progress, blocks=self.settings.blocks)
        self.model, self.tokenizer = self.sweeper.model, self.sweeper.tokenizer
        self.fisher = self.sweeper.fisher(QuantConfig(**self.settings.calib))
        self.weights = {n: self.sweeper.pristine[f"{n}.weight"] for n in models.quantizable_linears(self.model)}

    @property
    def data_note(self) -> str:
        c = self.settings.calib
        note = DATA_NOTE.format(seqlen=self.sweeper.seqlen, nsamples=c["nsamples"], calib_seqlen=c["seqlen"])
        if self.settings.fast:
            note += "; FAST MODE: only decoder blocks 0-1 quantized and 2 evaluation windows, numbers are not comparable"
        return note

    def point(self, config: QuantConfig | None) -> dict:
        return self.sweeper.run_point(config)

    def config(self, wbits: int = 3, **kw) -> QuantConfig:
        return QuantConfig(wbits=wbits, **self.settings.calib, **kw)

    # -- sections -------------------------------------------------------------------------------

    def memory_wall(self, gpu_results: dict | None = None) -> Section:
        device = "cpu"
        bandwidth = evaluate.memory_bandwidth(device, megabytes=64 if self.settings.fast else 256)
        shapes = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096)] if not self.settings.fast else [(576, 576), (1536, 576)]
        rows = pd.DataFrame(evaluate.gemv_timings(shapes, device=device, repeats=5 if self.settings.fast else 15))
        fig = go.Figure()
        for dtype, part in rows.groupby("dtype"):
            fig.add_trace(go.Scatter(x=part["bytes"] / 1e6, y=part["seconds"] * 1e6, mode="markers+lines",
                                     name=f"measured {dtype} GEMV"))
        mb = rows["bytes"] / 1e6
        xs = [float(mb.min()) * 0.5, float(mb.max()) * 1.5]
        fig.add_trace(go.Scatter(x=xs, y=[x * 1e6 / bandwidth / 1e3 for x in xs], mode="lines",
                                 line=dict(dash="dash", color="black"),
                                 name=f"bytes / measured bandwidth ({bandwidth:.1f} GB/s)"))
        fp16 = rows[rows["dtype"] == "float32"]
        for bits in (4, 3):
            # weights at `bits` per value (plus one fp16 LUT of 2**bits per row) read at the measured bandwidth
            moved = [(o * i * bits / 8 + o * 2**bits * 2) / 1e6 for o, i in zip(fp16["out_features"], fp16["in_features"])]
            fig.add_trace(go.Scatter(x=moved, y=[m * 1e6 / bandwidth / 1e3 for m in moved], mode="markers",
                                     marker=dict(symbol="circle-open", size=10),
                                     name=f"{bits}-bit LUT-GEMV at that bandwidth (projected)"))
        fig.update_xaxes(type="log")
        fig.update_yaxes(type="log")
        fig.update_layout(title="The memory wall: a batch-1 matrix-vector product costs the bytes it reads",
                          xaxis_title="bytes read (MB, log)", yaxis_title="time (µs, log)", template="plotly_white")
        figures = [fig]
        notes = [f"CPU (2 cores): copy bandwidth {bandwidth:.1f} GB/s; the fp32 GEMVs reach "
                 f"{rows[rows.dtype == 'float32'].gbs.median():.1f} GB/s (median): time follows bytes, so fewer bits "
                 "per weight mean proportionally faster decoding, which is the paper's motivation."]
        if gpu_results:
            gpu_figures, gpu_notes = gpu_memory_wall(gpu_results)
            figures += gpu_figures
            notes += gpu_notes
        else:
            notes.append("No GPU results file found (benchmarks/kernels.py --json out/kernels.json): CPU only.")
        return Section("memory_wall", "Memory wall", "Figure 1 (right) / Section 3: decoding is memory bound",
                       f"{device.upper()} of this machine, random matrices including the default model's shapes",
                       "measured on a CPU, not an A6000/A100; 3/4-bit points are projected from the measured "
                       "bandwidth, not timed (the CPU path has no packed kernel)", figures, notes)

    def distributions(self, name: str = "model.layers.15.mlp.down_proj") -> Section:
        profile = self.sweeper.profile()
        ranges = {pct: profile.solve(pct) for pct in (0.05, 0.45)}
        thresholds = {f"{pct}% model-wide": profile.threshold(name, r) for pct, r in ranges.items()}
        hist = viz.weight_histogram(self.weights[name], thresholds, title=f"Weights of {name} with outlier thresholds")
        fisher = viz.fisher_histogram({name: self.fisher[name]})
        share = 100 * profile.exact_count(name, ranges[0.45]) / self.weights[name].numel()
        return Section("distributions", "Weight and sensitivity distributions of one layer",
                       "Figure 2 / Figure 3: long-tailed weights and Fisher values", MODEL_NOTE, self.data_note,
                       [hist, fisher], [f"At the model-wide 0.45% setting this matrix has {share:.3f}% outliers."])

    def nonuniform(self, name: str = "model.layers.15.self_attn.q_proj", wbits: int = 3) -> Section:
        levels, errors = baselines.grid_comparison(self.weights[name], self.fisher[name], wbits)
        row = int(errors[errors.method == "RTN grid"].sort_values("weighted_error").iloc[-1]["row"])
        fig_row = viz.row_quantization(self.weights[name][row], self.fisher[name][row],
                                       {k: v[row] for k, v in levels.items()},
                                       title=f"{wbits}-bit levels of row {row} of {name}")
        rows = {"RTN grid": self.point(QuantConfig(method="rtn", wbits=wbits)),
                "k-means": self.point(self.config(wbits, weighted=False)),
                "Fisher-weighted k-means": self.point(self.config(wbits))}
        per_layer = viz.per_layer_error({k: pd.DataFrame(v["layers"]) for k, v in rows.items()}, "mse")
        totals = errors.groupby("method")[["weighted_error", "mse"]].sum()
        notes = [f"{name}: weighted error RTN {totals.loc['RTN grid', 'weighted_error']:.3g}, k-means "
                 f"{totals.loc['k-means', 'weighted_error']:.3g}, Fisher-weighted "
                 f"{totals.loc['Fisher-weighted k-means', 'weighted_error']:.3g}."]
        notes += [f"{k}: perplexity {v['ppl_shakespeare']:.2f}" for k, v in rows.items()]
        return Section("nonuniform", "Sensitivity-based non-uniform quantization",
                       "Figure 2 (left/middle): uniform vs non-uniform vs sensitivity-weighted centroids",
                       MODEL_NOTE, self.data_note, [fig_row, per_layer], notes)

    def main_table(self, wbits=(3, 4)) -> Section:
        configs = experiments.paper_configs(wbits, **self.settings.calib)
        frame = self.sweeper.run(configs)
        table = experiments.tidy(frame)[["label", "bits_per_weight", "size_mb", "ppl_shakespeare"]]
        ppl = dict(zip(frame["label"], frame["ppl_shakespeare"]))
        return Section("main_table", "Main table: perplexity at 3 and 4 bits",
                       "Table 1: RTN, GPTQ, SqueezeLLM (0%, 0.05%, 0.45%) with effective bits",
                       MODEL_NOTE, self.data_note + "; GPTQ/RTN g128 groups leave a shorter last group (576 = 4x128 + 64)",
                       [viz.table(table, title="Perplexity (lower is better) and effective bits per weight"),
                        viz.ppl_vs_size(frame)], _gap_notes(ppl, list(wbits)), table)

    def ablations(self) -> Section:
        weighting = {"plain k-means": self.point(self.config(3, weighted=False)),
                     "Fisher-weighted": self.point(self.config(3))}
        kinds = {"dense-only": self.point(self.config(3)),
                 "outliers only (0.45%)": self.point(self.config(3, outlier_pct=0.45)),
                 "sensitive only (0.05%)": self.point(self.config(3, sensitive_pct=0.05)),
                 "both (0.45% + 0.05%)": self.point(self.config(3, outlier_pct=0.45, sensitive_pct=0.05))}
        levels = [(0.0, 0.0), (0.0, 0.05), (0.05, 0.05), (0.2, 0.05), (0.45, 0.05), (0.7, 0.05), (0.95, 0.05)]
        sweep = [(o + s, self.point(self.config(3, outlier_pct=o, sensitive_pct=s))) for o, s in levels]
        bars = go.Figure()
        for group in (weighting, kinds):
            bars.add_trace(go.Bar(x=list(group), y=[r["ppl_shakespeare"] for r in group.values()],
                                  text=[f"{r['ppl_shakespeare']:.2f}" for r in group.values()], textposition="outside"))
        bars.update_layout(title="Ablations at 3 bits: sensitivity weighting, and what the sparse part holds",
                           yaxis_title="perplexity", template="plotly_white", showlegend=False)
        curve = go.Figure(go.Scatter(x=[s for s, _ in sweep], y=[r["ppl_shakespeare"] for _, r in sweep],
                                     mode="lines+markers", text=[f"{r['bits_per_weight']:.2f} bits" for _, r in sweep],
                                     hovertemplate="%{x:.2f}% sparse, %{text}: ppl %{y:.2f}<extra></extra>",
                                     name="SqueezeLLM 3-bit"))
        curve.update_layout(title="Perplexity versus sparsity level at 3 bits (0.05% sensitive + outliers)",
                            xaxis_title="sparse weights (% of all)", yaxis_title="perplexity",
                            template="plotly_white")
        w = {k: r["ppl_shakespeare"] for k, r in weighting.items()}
        k = {name: r["ppl_shakespeare"] for name, r in kinds.items()}
        notes = [f"Sensitivity weighting: {w['Fisher-weighted']:.2f} against {w['plain k-means']:.2f} for plain "
                 f"k-means ({'helps, as in the paper' if w['Fisher-weighted'] < w['plain k-means'] else 'does NOT help here'}).",
                 "Sparse part: " + ", ".join(f"{name} {v:.2f}" for name, v in k.items()) + "."]
        return Section("ablations", "Ablations", "Table 4/5 and Figure 4: weighting on/off, outliers vs sensitive "
                       "values, sparsity level", MODEL_NOTE, self.data_note, [bars, curve], notes)

    def latency(self, gpu_results: dict | None = None) -> Section:
        if gpu_results:
            return gpu_latency(gpu_results)
        rows = [{**self.sweeper.speed(config, new_tokens=8 if self.settings.fast else 32), "label": label}
                for label, config in (("unquantized", None), ("3-bit", self.config(3)), ("4-bit", self.config(4)),
                                      ("3-bit + 0.45% sparse", self.config(3, outlier_pct=0.45, sensitive_pct=0.05)))]
        table = pd.DataFrame(rows)[["label", "device", "tokens_per_s", "decode_ms_per_token", "weights_mb",
                                    "peak_memory_mb"]]
        return Section("latency", "Latency and memory (CPU)", "Table 3: generation latency and peak memory",
                       "this machine's CPU, default model, greedy decoding at batch 1",
                       "CPU ONLY: the CPU path decodes packed weights once and then runs dense, so speed is not "
                       "the paper's GPU speed-up; weights memory is the packed size. GPU numbers come from "
                       "benchmarks/generate.py on a GPU", [viz.table(table, "Greedy decoding on this CPU (reference path)"),
                                                           viz.speed_bars(rows)],
                       ["No GPU results file found: CPU figures, clearly not the paper's setting."], table)


KERNEL_COLUMNS = ["shape", "tokens", "kernel", "us", "gbs", "pct_peak", "speedup_vs_fp16"]
GENERATE_COLUMNS = ["label", "tokens_per_s", "decode_ms_per_token", "speedup_vs_fp16", "graph_tokens_per_s",
                    "graph_speedup_vs_fp16", "linear_weights_mb", "linear_weights_vs_fp16", "peak_memory_mb"]


def gpu_memory_wall(results: dict) -> tuple[list[go.Figure], list[str]]:
    """The memory wall on a GPU, from ``benchmarks/kernels.py --json``: time against bytes read, per kernel."""
    table_rows = pd.DataFrame(results["rows"])
    rows = table_rows[table_rows["tokens"] == 1] if "tokens" in table_rows else table_rows  # the figure: batch 1
    device, peak = results.get("device", "GPU"), results.get("peak_gbps")
    fig = go.Figure()
    for kernel, part in rows.groupby("kernel", sort=False):
        fig.add_trace(go.Scatter(x=part["bytes"] / 1e6, y=part["us"], mode="markers", name=kernel,
                                 text=part["shape"], hovertemplate="%{text}: %{x:.1f} MB in %{y:.1f} µs"))
    if peak:
        mb = rows["bytes"] / 1e6
        xs = [float(mb.min()) * 0.7, float(mb.max()) * 1.4]
        fig.add_trace(go.Scatter(x=xs, y=[x / peak * 1e3 for x in xs], mode="lines", name=f"peak {peak:.0f} GB/s",
                                 line=dict(dash="dash", color="black")))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    fig.update_layout(title=f"The memory wall on {device}: batch-1 GEMV time against bytes read",
                      xaxis_title="bytes read (MB, log)", yaxis_title="time (µs, log)", template="plotly_white")
    table = viz.table(table_rows, title=f"GPU kernels on {device} (benchmarks/kernels.py)",
                      columns=[c for c in KERNEL_COLUMNS if c in table_rows])
    notes = []
    for kernel, part in rows[rows["wbits"] < 16].groupby("kernel", sort=False):
        notes.append(f"{device}: {kernel} at 1 token is {part['speedup_vs_fp16'].min():.2f}-"
                     f"{part['speedup_vs_fp16'].max():.2f}x faster than the torch fp16 matmul"
                     + (f", at {part['pct_peak'].max():.0f}% of peak bandwidth" if peak else "") + ".")
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
        notes.append(f"3-bit decodes {speedup:.2f}x as many tokens/s as fp16 with eager generate() (the paper "
                     "reports 2.1-2.4x on an A6000 for LLaMA-7B).")
        graph = [rows[k].get("graph_decode_ms_per_token") for k in ("fp16", "3-bit")]
        if all(graph):
            notes.append(f"Replaying one captured CUDA graph per token, 3-bit decodes {graph[0] / graph[1]:.2f}x as "
                         "many tokens/s as fp16.")
    return Section("latency", "Latency and memory", "Table 3: generation latency and peak memory",
                   f"GPU: {device}, LLaMA-7B-shaped model, random weights",
                   "random weights (speed does not depend on values)",
                   [viz.table(table, f"Greedy decoding of a LLaMA-7B-shaped model on {device}"),
                    viz.speed_bars(results["rows"])], notes, table)


def gpu_results(name: str) -> dict | None:
    """A GPU benchmark's JSON (``benchmarks/NAME.py --json out/NAME.json``), if one was written."""
    path = assets.REPO_DATA.parent / "out" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def paper_sections(fast: bool = False, progress: bool = True) -> list[Section]:
    report = PaperReport(fast, progress)
    return [report.memory_wall(gpu_results("kernels")), report.distributions(), report.nonuniform(),
            report.main_table(), report.ablations(), report.latency(gpu_results("generate"))]


def render_html(sections: list[Section], title: str = "SqueezeLLM on the default model") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             ".meta{color:#444;font-size:.92em;background:#f4f6fa;padding:.6em 1em;border-radius:6px}"
             "li{margin:.3em 0}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             "<p>Reproduced with sqlab from cached experiment results. Every section names the paper's "
             "figure or table it reproduces and what differs from the paper's setting.</p>"]
    first = True
    for s in sections:
        parts.append(f"<h2 id='{s.key}'>{html.escape(s.title)}</h2>")
        parts.append(f"<div class='meta'><b>Reproduces:</b> {html.escape(s.reproduces)}<br>"
                     f"<b>Setting:</b> {html.escape(s.setting)}<br><b>Differs from the paper:</b> "
                     f"{html.escape(s.differs)}</div>")
        for fig in s.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
            first = False
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in s.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path, fast: bool = False, progress: bool = True) -> Path:
    """Write ``report.html`` (self-contained) and ``report.json`` (the notes and tables) into ``out``."""
    sections = paper_sections(fast, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(render_html(sections), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(
        [{"key": s.key, "title": s.title, "reproduces": s.reproduces, "setting": s.setting, "differs": s.differs,
          "notes": s.notes, "table": None if s.table is None else s.table.to_dict(orient="records")}
         for s in sections], indent=1, default=str))
    return out / "report.html"
