"""ipywidgets panels for the notebooks, built on ``viz`` figures.

Each panel is an ``ipywidgets.VBox`` whose ``controls`` dict names its inputs
and ``figures`` dict its plotly ``FigureWidget``s, so the notebooks (and tests)
can drive it programmatically. Figures update in place.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

from . import viz
from .config import MethodConfig, config_for
from .models import split_name


def refresh(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Replace a FigureWidget's traces and layout with those of ``figure``."""
    with widget.batch_update():
        widget.data = ()
        widget.layout = figure.layout
        widget.add_traces(list(figure.data))


class Panel(W.VBox):
    """Controls (one row, or the ``rows`` of control names given), a status line, then figures."""

    def __init__(
        self,
        controls: dict[str, W.Widget],
        figures: dict[str, go.FigureWidget],
        status: W.Widget | None = None,
        rows: list[list[str]] | None = None,
    ):
        self.controls, self.figures, self.status = controls, figures, status
        lines = [W.HBox([controls[name] for name in row]) for row in (rows or [list(controls)])]
        super().__init__(lines + ([status] if status is not None else []) + list(figures.values()))


def _matrix_pickers(names: list[str], description: str = "block") -> tuple[W.Dropdown, W.Dropdown]:
    blocks = sorted({split_name(n)[0] for n in names})
    modules = list(dict.fromkeys(split_name(n)[1] for n in names))
    return (
        W.Dropdown(options=blocks, value=blocks[len(blocks) // 2], description=description),
        W.Dropdown(options=modules, value=modules[0], description="module"),
    )


def _name(names: list[str], block: int, module: str) -> str:
    return next(n for n in names if split_name(n) == (block, module))


def sensitivity_explorer(fisher: dict, pct: float = 0.05) -> Panel:
    """Pick a block and module; see where its most sensitive weights sit."""
    names = list(fisher)
    block, module = _matrix_pickers(names)
    top = W.Dropdown(options=[0.05, 0.45, 1.0, 5.0], value=pct, description="top %")

    def figure() -> go.Figure:
        name = _name(names, block.value, module.value)
        return viz.sensitive_heatmap(
            fisher[name], top.value, title=f"Top {top.value:g}% weights by Fisher in {name}"
        )

    widget = go.FigureWidget(figure())
    for control in (block, module, top):
        control.observe(lambda _: refresh(widget, figure()), names="value")
    return Panel({"block": block, "module": module, "top": top}, {"heatmap": widget})


def outlier_explorer(profile, r: float = 2.0) -> Panel:
    """Move the IQR range r: the threshold moves on the histogram and the outlier counts update.

    ``profile`` is an ``outliers.OutlierProfile`` of the model's weights.
    """
    names = list(profile.weights)
    block, module = _matrix_pickers(names)
    slider = W.FloatSlider(
        value=r,
        min=0.0,
        max=8.0,
        step=0.05,
        description="range r",
        continuous_update=False,
        readout_format=".2f",
    )
    status = W.HTML()
    curve_r = [x / 10 for x in range(0, 81, 2)]
    curve = [profile.share(x) for x in curve_r]

    def update(*_):
        name = _name(names, block.value, module.value)
        t = profile.threshold(name, slider.value)
        w = profile.weights[name]
        here = profile.exact_count(name, slider.value)
        total = profile.share(slider.value)
        status.value = (
            f"<b>r = {slider.value:.2f}</b>: T = {t:.4f}; {here:,} outliers in {name} "
            f"({100 * here / w.numel():.3f}%); model-wide ≈ {total:.3f}% of all quantizable weights"
        )
        refresh(
            hist,
            viz.weight_histogram(w, {f"r = {slider.value:.2f}": t}, title=f"Weights of {name}"),
        )
        refresh(
            share, viz.outlier_share_curve(curve_r, curve, {"current r": (slider.value, total)})
        )

    hist, share = go.FigureWidget(), go.FigureWidget()
    update()
    for control in (block, module, slider):
        control.observe(update, names="value")
    return Panel(
        {"block": block, "module": module, "r": slider}, {"histogram": hist, "share": share}, status
    )


OUTLIER_STEPS = (0.0, 0.05, 0.1, 0.2, 0.45, 0.75, 1.0)
SENSITIVE_STEPS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5)


class SweepPanel(Panel):
    """Pick a method and its knobs; the point is quantized (simulate mode, cached) and plotted.

    ``sweeper`` is an ``experiments.Sweeper``; ``common`` holds calibration settings
    passed to every config. Points already in the cache appear at once.
    """

    def __init__(
        self, sweeper, common: dict | None = None, initial: list[MethodConfig] | None = None
    ):
        self.sweeper, self.common = sweeper, dict(common or {})
        method = W.ToggleButtons(
            options=[("SqueezeLLM", "squeezellm"), ("RTN", "rtn"), ("GPTQ", "gptq")],
            value="squeezellm",
            description="method",
        )
        wbits = W.ToggleButtons(options=[3, 4], value=3, description="bits")
        # sliders need a width of their own: squeezed into a row of buttons they render as a dot
        slider_layout, wide = W.Layout(width="420px"), {"description_width": "90px"}
        outlier = W.SelectionSlider(
            options=list(OUTLIER_STEPS),
            value=0.0,
            description="outliers %",
            continuous_update=False,
            layout=slider_layout,
            style=wide,
        )
        sensitive = W.SelectionSlider(
            options=list(SENSITIVE_STEPS),
            value=0.0,
            description="sensitive %",
            continuous_update=False,
            layout=slider_layout,
            style=wide,
        )
        group = W.Dropdown(
            options=[("per channel", 0), ("128", 128), ("64", 64), ("32", 32)],
            value=0,
            description="group size",
            disabled=True,
            style=wide,
        )
        self.progress = W.FloatProgress(
            value=0, min=0, max=1, bar_style="info", layout=W.Layout(width="200px")
        )
        self.message = W.HTML()
        status = W.HBox([self.progress, self.message])
        self.rows = [sweeper.run_point(None)] + [sweeper.run_point(c) for c in (initial or [])]
        self.size_plot, self.layer_plot = go.FigureWidget(), go.FigureWidget()
        super().__init__(
            {
                "method": method,
                "wbits": wbits,
                "outlier_pct": outlier,
                "sensitive_pct": sensitive,
                "groupsize": group,
            },
            {"ppl_vs_size": self.size_plot, "per_layer": self.layer_plot},
            status,
            rows=[["method", "wbits"], ["outlier_pct", "sensitive_pct", "groupsize"]],
        )
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self._changed()

    def config(self) -> MethodConfig:
        c = self.controls
        return config_for(
            c["method"].value,
            c["wbits"].value,
            outlier_pct=c["outlier_pct"].value,
            sensitive_pct=c["sensitive_pct"].value,
            groupsize=c["groupsize"].value or None,
            **self.common,
        )

    def _changed(self, *_):
        squeeze = self.controls["method"].value == "squeezellm"
        self.controls["outlier_pct"].disabled = self.controls[
            "sensitive_pct"
        ].disabled = not squeeze
        self.controls["groupsize"].disabled = squeeze
        config = self.config()
        label = config.label()
        if not any(r["label"] == label for r in self.rows):
            cached = self.sweeper.cached({**config.relevant(), "label": label}) is not None
            self.message.value = f"{'loading' if cached else 'quantizing'} <b>{label}</b> …"
            self.progress.bar_style, self.progress.value = "info", 0.02
            self.rows.append(
                self.sweeper.run_point(config, on_estimate=lambda *a: self._estimating(label, *a))
            )
        row = next(r for r in self.rows if r["label"] == label)
        self.progress.bar_style, self.progress.value = "success", 1.0
        ppl = {k: v for k, v in row.items() if k.startswith("ppl_")}
        self.message.value = (
            f"<b>{label}</b>: {row['bits_per_weight']:.3f} bits/weight, {row['size_mb']:.1f} MB, "
            + ", ".join(f"perplexity {v:.3f} ({k[4:]})" for k, v in ppl.items())
            + (" — from the cache" if row.get("cached") else f" — {row['seconds']:.1f} s")
        )
        self._draw(label)

    def _estimating(self, label: str, dataset: str, estimate, row: dict) -> None:
        """A new point's perplexity so far: the status line and a hollow point with its interval."""
        interval = (
            f" (95%: {estimate.low:.2f}–{estimate.high:.2f})"
            if estimate.high < float("inf")
            else " (interval from the second window on)"
        )
        self.progress.value = estimate.windows / estimate.total
        self.message.value = (
            f"evaluating <b>{label}</b> on {dataset}: perplexity ≈ {estimate.ppl:.3f}{interval} "
            f"after {estimate.windows}/{estimate.total} windows"
        )
        if "size_mb" in row:
            refresh(
                self.size_plot,
                viz.ppl_vs_size(
                    self.frame(),
                    dataset=dataset,
                    estimate={
                        "label": label,
                        "size_mb": row["size_mb"],
                        "ppl": estimate.ppl,
                        "low": estimate.low,
                        "high": estimate.high,
                        "windows": estimate.windows,
                        "total": estimate.total,
                    },
                ),
            )

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def _draw(self, label: str) -> None:
        import pandas as pd

        frame = self.frame()
        refresh(self.size_plot, viz.ppl_vs_size(frame, highlight=label))
        errors = {r["label"]: pd.DataFrame(r["layers"]) for r in self.rows if r.get("layers")}
        wbits = next(r["wbits"] for r in self.rows if r["label"] == label)
        same_bits = {r["label"] for r in self.rows if r.get("wbits") == wbits}
        shown = {label: errors[label]} if label in errors else {}
        shown.update({k: v for k, v in errors.items() if k != label and k in same_bits})
        if shown:
            refresh(self.layer_plot, viz.per_layer_error(dict(list(shown.items())[:4])))
