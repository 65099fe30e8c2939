"""Plotly figure builders: data in, figure out. No model, no I/O, no state.

Every figure says what it shows: a title, axis labels with units, a legend where
there is more than one series.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = {
    "RTN": "#d62728",
    "GPTQ": "#ff7f0e",
    "SqueezeLLM": "#1f77b4",
    "none": "#2ca02c",
    "RTN grid": "#d62728",
    "k-means": "#9467bd",
    "Fisher-weighted k-means": "#1f77b4",
}


def _np(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=float)


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        legend_title_text=kw.pop("legend", None),
        **kw,
    )
    return fig


def fisher_by_layer(summary, stat: str = "mean") -> go.Figure:
    """Per-matrix Fisher statistic across decoder blocks, one line per module (log scale)."""
    fig = go.Figure()
    for module, part in summary.sort_values("block").groupby("module", sort=False):
        fig.add_trace(go.Scatter(x=part["block"], y=part[stat], mode="lines+markers", name=module))
    _layout(
        fig,
        f"Fisher information per weight ({stat}) across the model",
        "decoder block",
        f"{stat} Fisher value (squared gradient, log scale)",
        legend="module",
    )
    fig.update_yaxes(type="log")
    return fig


def fisher_histogram(values: dict[str, object], bins: int = 80) -> go.Figure:
    """Distribution of log10 Fisher values, one step curve per group (e.g. per module)."""
    logs = {
        label: np.log10(v[v > 0])
        for label, v in ((k, _np(v).reshape(-1)) for k, v in values.items())
    }
    lo = min(float(v.min()) for v in logs.values() if v.size)
    hi = max(float(v.max()) for v in logs.values() if v.size)
    edges = np.linspace(lo, hi, bins + 1)
    fig = go.Figure()
    for label, v in logs.items():
        counts, _ = np.histogram(v, bins=edges)
        fig.add_trace(
            go.Scatter(
                x=(edges[:-1] + edges[1:]) / 2,
                y=100 * counts / max(v.size, 1),
                mode="lines",
                line_shape="hvh",
                name=label,
            )
        )
    return _layout(
        fig,
        "Distribution of Fisher values (long-tailed: a few weights matter most)",
        "log10 Fisher value",
        "share of weights (%)",
        legend="module",
    )


def sensitive_heatmap(
    fisher, pct: float = 0.05, bins: int = 48, title: str | None = None
) -> go.Figure:
    """Where the top ``pct``% most sensitive weights of one matrix sit:
    binned counts over rows × columns.
    """
    f = _np(fisher)
    k = max(1, round(pct / 100 * f.size))
    flat = np.argpartition(f.reshape(-1), -k)[-k:]
    rows, cols = np.unravel_index(flat, f.shape)
    hist, r_edges, c_edges = np.histogram2d(
        rows,
        cols,
        bins=[min(bins, f.shape[0]), min(bins, f.shape[1])],
        range=[[0, f.shape[0]], [0, f.shape[1]]],
    )
    fig = make_subplots(
        rows=2,
        cols=2,
        column_widths=[0.8, 0.2],
        row_heights=[0.2, 0.8],
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.02,
        vertical_spacing=0.02,
    )
    fig.add_trace(
        go.Heatmap(
            z=hist,
            x=(c_edges[:-1] + c_edges[1:]) / 2,
            y=(r_edges[:-1] + r_edges[1:]) / 2,
            colorscale="Viridis",
            colorbar=dict(title="count"),
            name="top weights",
        ),
        2,
        1,
    )
    fig.add_trace(
        go.Bar(
            x=(c_edges[:-1] + c_edges[1:]) / 2,
            y=hist.sum(0),
            name="per column bin",
            marker_color="#1f77b4",
        ),
        1,
        1,
    )
    fig.add_trace(
        go.Bar(
            y=(r_edges[:-1] + r_edges[1:]) / 2,
            x=hist.sum(1),
            orientation="h",
            name="per row bin",
            marker_color="#1f77b4",
        ),
        2,
        2,
    )
    fig.update_xaxes(title_text="input channel (column)", row=2, col=1)
    fig.update_yaxes(title_text="output channel (row)", row=2, col=1, autorange="reversed")
    fig.update_layout(
        title=title or f"Positions of the top {pct:g}% weights by Fisher information",
        template="plotly_white",
        showlegend=False,
    )
    return fig


def fisher_mass(mass: dict[float, float]) -> go.Figure:
    """How much of the total Fisher information the top p% of weights hold."""
    pcts = sorted(mass)
    fig = go.Figure(
        go.Bar(
            x=[f"top {p:g}%" for p in pcts],
            y=[100 * mass[p] for p in pcts],
            text=[f"{100 * mass[p]:.1f}%" for p in pcts],
            textposition="outside",
            marker_color="#1f77b4",
            name="Fisher mass",
        )
    )
    fig.update_yaxes(range=[0, 105])
    return _layout(
        fig,
        "Share of the total Fisher information held by the most sensitive weights",
        "weights kept (per matrix, by Fisher)",
        "share of total Fisher information (%)",
    )


def weight_histogram(
    weight,
    thresholds: dict[str, float] | None = None,
    title: str = "Weight distribution",
    bins: int = 200,
) -> go.Figure:
    """Histogram of one matrix's weights (log counts) with the outlier thresholds ±T drawn."""
    w = _np(weight).reshape(-1)
    counts, edges = np.histogram(w, bins=bins)
    fig = go.Figure(
        go.Bar(
            x=(edges[:-1] + edges[1:]) / 2,
            y=counts,
            width=np.diff(edges),
            name="weights",
            marker_color="#7f7f7f",
        )
    )
    colors = ["#d62728", "#ff7f0e", "#9467bd", "#2ca02c"]
    for (label, t), color in zip((thresholds or {}).items(), colors):
        share = 100 * float((np.abs(w) >= t).mean())
        for sign in (-1, 1):
            fig.add_vline(x=sign * t, line_dash="dash", line_color=color)
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                line=dict(color=color, dash="dash"),
                name=f"{label}: T = {t:.4f} ({share:.3f}% outliers)",
            )
        )
    fig.update_yaxes(type="log")
    return _layout(fig, title, "weight value", "count (log scale)", legend="outlier threshold ±T")


def outlier_share_curve(
    ranges, shares, marks: dict[str, tuple[float, float]] | None = None
) -> go.Figure:
    """Model-wide outlier percentage as a function of the IQR range r."""
    fig = go.Figure(
        go.Scatter(
            x=list(ranges), y=list(shares), mode="lines", name="outlier share", line_color="#1f77b4"
        )
    )
    for label, (r, pct) in (marks or {}).items():
        fig.add_trace(
            go.Scatter(
                x=[r],
                y=[pct],
                mode="markers+text",
                text=[label],
                textposition="top right",
                marker=dict(size=10),
                name=label,
            )
        )
    fig.update_yaxes(type="log")
    return _layout(
        fig,
        "Outlier share versus the IQR range r (T = max(|q1 − r·IQR|, |q3 + r·IQR|))",
        "IQR range r",
        "outliers, % of all quantizable weights (log scale)",
    )


def outlier_heatmap(by_matrix) -> go.Figure:
    """Outlier percentage of every matrix: decoder blocks × modules."""
    table = by_matrix.pivot(index="module", columns="block", values="outlier_pct")
    fig = go.Figure(
        go.Heatmap(
            z=table.values,
            x=list(table.columns),
            y=list(table.index),
            colorscale="Reds",
            colorbar=dict(title="% outliers"),
        )
    )
    return _layout(
        fig,
        "Where the outliers are: share of each matrix beyond its threshold",
        "decoder block",
        "module",
    )


def channel_counts(mask) -> go.Figure:
    """Outliers per output channel (row) and per input channel (column) of one matrix."""
    m = _np(mask) > 0
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("per output channel (row)", "per input channel (column)")
    )
    fig.add_trace(go.Bar(y=m.sum(1), name="rows", marker_color="#d62728"), 1, 1)
    fig.add_trace(go.Bar(y=m.sum(0), name="columns", marker_color="#ff7f0e"), 1, 2)
    fig.update_xaxes(title_text="output channel", row=1, col=1)
    fig.update_xaxes(title_text="input channel", row=1, col=2)
    fig.update_yaxes(title_text="outliers (count)", row=1, col=1)
    fig.update_layout(
        title="Outliers cluster in a few channels", template="plotly_white", showlegend=False
    )
    return fig


def overlap_bars(table) -> go.Figure:
    """Per module: outliers, sensitive values, and weights that are both."""
    sums = table.groupby("module")[["outliers", "sensitive", "both"]].sum()
    fig = go.Figure()
    for column, color in (("outliers", "#d62728"), ("sensitive", "#1f77b4"), ("both", "#9467bd")):
        fig.add_trace(go.Bar(x=list(sums.index), y=sums[column], name=column, marker_color=color))
    fig.update_layout(barmode="group")
    return _layout(
        fig,
        "Outliers and sensitive values are mostly different weights",
        "module",
        "weights (count, all blocks)",
        legend="kind",
    )


def row_quantization(
    weight_row, fisher_row, levels: dict[str, object], title: str | None = None, bins: int = 120
) -> go.Figure:
    """One row's weights (count and Fisher mass per bin) with the levels each method picks."""
    w, f = _np(weight_row), _np(fisher_row)
    counts, edges = np.histogram(w, bins=bins)
    mass, _ = np.histogram(w, bins=edges, weights=f)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(
            x=centers,
            y=counts,
            width=np.diff(edges),
            name="weights (count)",
            marker_color="#c7c7c7",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=centers,
            y=mass / max(mass.sum(), 1e-30) * 100,
            mode="lines",
            name="Fisher mass (%)",
            line=dict(color="#2ca02c"),
        ),
        secondary_y=True,
    )
    top = counts.max() * 1.05
    for offset, (label, lv) in enumerate(levels.items()):
        color = PALETTE.get(label, None)
        xs, ys = [], []
        for v in _np(lv).reshape(-1):
            xs += [v, v, None]
            ys += [0, top * (1 - 0.08 * offset), None]
        fig.add_trace(
            go.Scatter(x=xs, y=ys, mode="lines", name=label, line=dict(color=color, width=2)),
            secondary_y=False,
        )
    fig.update_yaxes(title_text="weights in bin (count)", secondary_y=False)
    fig.update_yaxes(title_text="Fisher mass in bin (%)", secondary_y=True)
    fig.update_xaxes(title_text="weight value")
    fig.update_layout(
        title=title or "Quantization levels of one output channel",
        template="plotly_white",
        legend_title_text="levels",
    )
    return fig


def per_layer_error(errors: dict[str, object], metric: str = "mse") -> go.Figure:
    """Reconstruction error of every quantized matrix, in model order, one line per method."""
    fig = go.Figure()
    for label, table in errors.items():
        fig.add_trace(
            go.Scatter(
                x=list(range(len(table))),
                y=table[metric],
                mode="lines",
                name=label,
                text=table["name"],
                hovertemplate="%{text}<br>%{y:.3g}<extra>" + label + "</extra>",
            )
        )
    names = {"mse": "mean squared weight error", "weighted_error": "Fisher-weighted squared error"}
    fig.update_yaxes(type="log")
    return _layout(
        fig,
        f"Per-layer {names.get(metric, metric)}",
        "quantized matrix (model order)",
        f"{names.get(metric, metric)} (log scale)",
        legend="method",
    )


def bits_budget(budgets: dict[str, dict[str, float]]) -> go.Figure:
    """Effective bits per weight split into indices, look-up tables and the sparse part."""
    parts = ["indices", "lut", "sparse"]
    names = {"indices": "indices", "lut": "look-up tables (fp16)", "sparse": "sparse part (CSR)"}
    fig = go.Figure()
    for part, color in zip(parts, ("#1f77b4", "#2ca02c", "#d62728")):
        fig.add_trace(
            go.Bar(
                x=list(budgets),
                y=[b.get(part, 0.0) for b in budgets.values()],
                name=names[part],
                marker_color=color,
            )
        )
    totals = [sum(b.values()) for b in budgets.values()]
    fig.add_trace(
        go.Scatter(
            x=list(budgets),
            y=totals,
            mode="text",
            text=[f"{t:.3f}" for t in totals],
            textposition="top center",
            showlegend=False,
        )
    )
    fig.update_layout(barmode="stack")
    return _layout(
        fig, "Bits per weight, and where they go", "configuration", "bits per weight", legend="part"
    )


FAMILIES = {
    "squeezellm": "SqueezeLLM",
    "rtn": "RTN",
    "gptq": "GPTQ",
    "none": "none",
}  # method -> name shown


def ppl_vs_size(
    frame, highlight: str | None = None, dataset: str | None = None, estimate: dict | None = None
) -> go.Figure:
    """Perplexity against the size of the quantized linears: lower-left is better.

    ``estimate``, a point still being evaluated (``label``, ``size_mb``, ``ppl``, ``low``,
    ``high``, ``windows``, ``total``), is drawn hollow with its 95% interval.
    """
    column = f"ppl_{dataset}" if dataset else next(c for c in frame.columns if c.startswith("ppl_"))
    fig = go.Figure()
    reference = frame[frame["method"] == "none"]
    quantized = frame[frame["method"] != "none"].sort_values("size_mb")
    for (method, wbits), part in quantized.groupby(["method", "wbits"], sort=False):
        family = FAMILIES.get(method, method)
        fig.add_trace(
            go.Scatter(
                x=part["size_mb"],
                y=part[column],
                mode="lines+markers",
                name=f"{family} {int(wbits)}-bit",
                text=part["label"],
                marker=dict(
                    symbol="circle" if wbits == 3 else "diamond", size=9, color=PALETTE.get(family)
                ),
                line=dict(color=PALETTE.get(family), dash="solid" if wbits == 3 else "dot"),
                hovertemplate="%{text}<br>%{x:.1f} MB, ppl %{y:.2f}<extra></extra>",
            )
        )
    for _, row in reference.iterrows():
        fig.add_hline(
            y=row[column],
            line_dash="dash",
            line_color=PALETTE["none"],
            annotation_text=f"unquantized: {row[column]:.2f}",
            annotation_position="top right",
        )
    if highlight is not None and (frame["label"] == highlight).any():
        row = frame[frame["label"] == highlight].iloc[0]
        fig.add_trace(
            go.Scatter(
                x=[row["size_mb"]],
                y=[row[column]],
                mode="markers",
                name=f"current: {highlight}",
                marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=3, color="black")),
            )
        )
    if estimate is not None:
        bounded = math.isfinite(estimate["high"])
        fig.add_trace(
            go.Scatter(
                x=[estimate["size_mb"]],
                y=[estimate["ppl"]],
                mode="markers",
                name=(
                    f"estimating: {estimate['label']} "
                    f"({estimate['windows']}/{estimate['total']} windows)"
                ),
                marker=dict(size=14, symbol="circle-open", color="black", line=dict(width=2)),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[estimate["high"] - estimate["ppl"]] if bounded else [0],
                    arrayminus=[estimate["ppl"] - estimate["low"]] if bounded else [0],
                    visible=bounded,
                ),
                hovertemplate="%{x:.1f} MB, ppl ≈ %{y:.2f} so far<extra></extra>",
            )
        )
    values = frame[column].astype(float)
    fig.update_yaxes(type="log" if values.max() / max(values.min(), 1e-9) > 5 else "linear")
    return _layout(
        fig,
        f"Perplexity versus size ({column[4:]})",
        "size of the quantized linears (MB)",
        "perplexity (lower is better)",
        legend="method",
    )


def speed_bars(rows: list[dict]) -> go.Figure:
    """Decoding speed (tokens/s, with the spread of repeated runs) and memory of several models,
    side by side.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decoding speed", "memory"))
    labels = [r["label"] for r in rows]
    speed = [r["tokens_per_s"] for r in rows]
    # tokens/s of the slowest and fastest run, from the spread of ms per token
    spread = [r.get("decode_ms_spread") or [r["decode_ms_per_token"]] * 2 for r in rows]
    high = [1e3 / low - s for (low, _), s in zip(spread, speed)]
    low = [s - 1e3 / hi for (_, hi), s in zip(spread, speed)]
    fig.add_trace(
        go.Bar(
            x=labels,
            y=speed,
            name="tokens/s (median)",
            marker_color="#1f77b4",
            error_y=dict(type="data", array=high, arrayminus=low),
        ),
        1,
        1,
    )
    if all("linear_weights_mb" in r for r in rows):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[r["linear_weights_mb"] for r in rows],
                name="decoder linears (MB)",
                marker_color="#9467bd",
            ),
            1,
            2,
        )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=[r["weights_mb"] for r in rows],
            name="all weights (MB)",
            marker_color="#2ca02c",
        ),
        1,
        2,
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=[r["peak_memory_mb"] for r in rows],
            name=rows[0].get("peak_memory_kind", "peak memory") + " (MB)",
            marker_color="#ff7f0e",
        ),
        1,
        2,
    )
    fig.update_yaxes(title_text="tokens per second (batch 1)", row=1, col=1)
    fig.update_yaxes(title_text="MB", row=1, col=2)
    fig.update_layout(
        title=f"Greedy decoding on {rows[0].get('device', '?')}",
        template="plotly_white",
        barmode="group",
    )
    return fig


FORMAT_NAMES = {
    "fp32": "fp32 (torch)",
    "bf16": "bf16 (torch)",
    "w4": "4-bit LUT-GEMV",
    "w3": "3-bit LUT-GEMV",
    "w3s": "3-bit + 0.45% sparse LUT-GEMV",
}


def memory_wall(rows: list[dict], bandwidth: float, device: str = "CPU") -> go.Figure:
    """Batch-1 GEMV time against the bytes it reads, per weight format,
    beside bytes / copy bandwidth.

    ``rows`` as ``sqlab.evaluate.gemv_timings`` returns them (median and min-max per call).
    """
    fig = go.Figure()
    formats = list(dict.fromkeys(r["format"] for r in rows))
    for fmt in formats:
        part = [r for r in rows if r["format"] == fmt]
        fig.add_trace(
            go.Scatter(
                x=[r["bytes"] / 1e6 for r in part],
                y=[r["us_median"] for r in part],
                mode="markers",
                name=FORMAT_NAMES.get(fmt, fmt),
                text=[f"{r['shape'][0]}x{r['shape'][1]}" for r in part],
                marker=dict(size=9),
                hovertemplate="%{text}: %{x:.2f} MB in %{y:.0f} µs<extra></extra>",
                error_y=dict(
                    type="data",
                    array=[r["us_max"] - r["us_median"] for r in part],
                    arrayminus=[r["us_median"] - r["us_min"] for r in part],
                ),
            )
        )
    mb = [r["bytes"] / 1e6 for r in rows]
    xs = [min(mb) * 0.7, max(mb) * 1.4]
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=[x / bandwidth * 1e3 for x in xs],
            mode="lines",
            line=dict(dash="dash", color="black"),
            name=f"bytes / copy bandwidth ({bandwidth:.1f} GB/s)",
        )
    )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return _layout(
        fig,
        f"The memory wall on this {device}: batch-1 GEMV time against bytes read (all measured)",
        "weight bytes read per call (MB, log)",
        "time per call (µs, log; bars: min-max)",
        legend="format",
    )


def ablation_bars(groups: list[dict[str, float]], title: str) -> go.Figure:
    """Perplexity of each variant, one bar trace per group of variants compared with each other."""
    fig = go.Figure()
    for group in groups:
        fig.add_trace(
            go.Bar(
                x=list(group),
                y=list(group.values()),
                text=[f"{v:.2f}" for v in group.values()],
                textposition="outside",
            )
        )
    _layout(fig, title, "", "perplexity")
    fig.update_layout(showlegend=False)
    return fig


def sparsity_curve(points: list[tuple[float, float, float]], title: str) -> go.Figure:
    """Perplexity against the sparse share: ``(sparse %, perplexity, bits per weight)`` points."""
    fig = go.Figure(
        go.Scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            mode="lines+markers",
            text=[f"{p[2]:.2f} bits" for p in points],
            name="SqueezeLLM 3-bit",
            hovertemplate="%{x:.2f}% sparse, %{text}: ppl %{y:.2f}<extra></extra>",
        )
    )
    return _layout(fig, title, "sparse weights (% of all)", "perplexity")


def gpu_memory_wall(rows: list[dict], peak: float | None, device: str) -> go.Figure:
    """GPU kernel time against bytes read, per kernel (rows of ``benchmarks/kernels.py --json``)."""
    fig = go.Figure()
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    for kernel in kernels:
        part = [r for r in rows if r["kernel"] == kernel]
        fig.add_trace(
            go.Scatter(
                x=[r["bytes"] / 1e6 for r in part],
                y=[r["us"] for r in part],
                mode="markers",
                name=kernel,
                text=[r["shape"] for r in part],
                hovertemplate="%{text}: %{x:.1f} MB in %{y:.1f} µs",
            )
        )
    if peak:
        mb = [r["bytes"] / 1e6 for r in rows]
        xs = [min(mb) * 0.7, max(mb) * 1.4]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[x / peak * 1e3 for x in xs],
                mode="lines",
                name=f"peak {peak:.0f} GB/s",
                line=dict(dash="dash", color="black"),
            )
        )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return _layout(
        fig,
        f"The memory wall on {device}: batch-1 GEMV time against bytes read",
        "bytes read (MB, log)",
        "time (µs, log)",
    )


def table(frame, title: str, columns: list[str] | None = None) -> go.Figure:
    """A DataFrame as a plotly table (for reports where a figure is easier to embed than HTML)."""
    frame = frame[columns] if columns else frame
    fmt = [
        (f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else v)
        for v in frame.values.ravel()
    ]
    cells = np.array(fmt, dtype=object).reshape(frame.shape).T.tolist()
    fig = go.Figure(
        go.Table(
            header=dict(values=list(frame.columns), fill_color="#e8eef7", align="left"),
            cells=dict(values=cells, align="left"),
        )
    )
    fig.update_layout(title=title, margin=dict(t=40, b=10))
    return fig
