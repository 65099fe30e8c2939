"""Figures say what they show; panels respond to their controls."""

import pandas as pd
import pytest
import torch

from sqlab import QuantConfig, experiments, fisher_information, outliers, viz, widgets
from sqlab.models import quantizable_linears
from tests.conftest import make_llama


def _labelled(fig):
    layout = fig.layout
    assert layout.title.text, "a title"
    return layout


@pytest.fixture(scope="module")
def tiny():
    model = make_llama(layers=3)
    fisher = fisher_information(
        model,
        torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)),
        progress=False,
    )
    weights = {n: m.weight.detach() for n, m in quantizable_linears(model).items()}
    return model, fisher, weights


def test_figures_have_titles_and_axis_labels(tiny):
    from sqlab import baselines, sensitivity

    model, fisher, weights = tiny
    name = "model.layers.1.mlp.down_proj"
    profile = outliers.OutlierProfile(weights)
    r = profile.solve(1.0)
    levels, errors = baselines.grid_comparison(weights[name], fisher[name], 3)
    layers = pd.DataFrame(
        [
            {"name": n, "mse": 1e-4 * (i + 1), "weighted_error": 1e-6 * (i + 1)}
            for i, n in enumerate(weights)
        ]
    )
    frame = pd.DataFrame(
        [
            {
                "label": "unquantized (fp16 size)",
                "method": "none",
                "wbits": 16,
                "size_mb": 10.0,
                "ppl_x": 10.0,
            },
            {
                "label": "RTN 3-bit per-channel",
                "method": "rtn",
                "wbits": 3,
                "size_mb": 2.0,
                "ppl_x": 30.0,
            },
            {
                "label": "SqueezeLLM 3-bit dense",
                "method": "squeezellm",
                "wbits": 3,
                "size_mb": 2.1,
                "ppl_x": 12.0,
            },
            {
                "label": "SqueezeLLM 4-bit dense",
                "method": "squeezellm",
                "wbits": 4,
                "size_mb": 2.8,
                "ppl_x": 11.0,
            },
        ]
    )
    figures = [
        viz.fisher_by_layer(sensitivity.fisher_summary(fisher)),
        viz.fisher_histogram(sensitivity.fisher_by_module(fisher)),
        viz.fisher_mass(sensitivity.top_mass(fisher)),
        viz.weight_histogram(weights[name], {"1%": profile.threshold(name, r)}),
        viz.outlier_share_curve([0, 1, 2], [profile.share(x) for x in (0, 1, 2)], {"1%": (r, 1.0)}),
        viz.outlier_heatmap(profile.by_matrix(r)),
        viz.row_quantization(
            weights[name][0], fisher[name][0], {k: v[0] for k, v in levels.items()}
        ),
        viz.per_layer_error({"a": layers}, "mse"),
        viz.bits_budget(
            {
                "dense": {"indices": 3.0, "lut": 0.2},
                "sparse": {"indices": 3.0, "lut": 0.2, "sparse": 0.3},
            }
        ),
        viz.ppl_vs_size(frame, highlight="SqueezeLLM 3-bit dense"),
    ]
    for fig in figures:
        layout = _labelled(fig)
        assert layout.xaxis.title.text and layout.yaxis.title.text
    assert viz.sensitive_heatmap(fisher[name]).layout.title.text
    assert len(viz.ppl_vs_size(frame).data) == 3  # one series per method and bit width
    assert errors.groupby("method")["weighted_error"].sum().idxmin() == "Fisher-weighted k-means"


def test_outlier_explorer_moves_the_threshold(tiny):
    _, _, weights = tiny
    panel = widgets.outlier_explorer(outliers.OutlierProfile(weights), r=3.0)
    before = panel.status.value
    shapes = panel.figures["histogram"].layout.shapes
    panel.controls["r"].value = 0.5
    assert panel.status.value != before and "r = 0.50" in panel.status.value
    assert panel.figures["histogram"].layout.shapes != shapes


def test_sensitivity_explorer_follows_the_picker(tiny):
    _, fisher, _ = tiny
    panel = widgets.sensitivity_explorer(fisher)
    panel.controls["block"].value = 2
    panel.controls["module"].value = "mlp.up_proj"
    assert "model.layers.2.mlp.up_proj" in panel.figures["heatmap"].layout.title.text


def test_sweep_panel_computes_then_reuses_points(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SQLAB_DATA_DIR", str(tmp_path / "data"))
    sweeper = experiments.Sweeper(
        str(tiny_model_dir), experiments.EvalSettings((f"text:{text_file}",), 32, 2), progress=False
    )
    common = dict(calib=f"text:{text_file}", nsamples=2, seqlen=16)
    panel = widgets.SweepPanel(sweeper, common=common)
    assert "SqueezeLLM 3-bit dense" in panel.message.value and panel.progress.value == 1.0
    traces = len(panel.figures["ppl_vs_size"].data)
    panel.controls["outlier_pct"].value = 1.0
    assert "SqueezeLLM 3-bit 1%+0%" in panel.message.value
    assert len(panel.rows) == 3 and len(panel.figures["ppl_vs_size"].data) >= traces
    panel.controls["method"].value = "rtn"
    assert panel.controls["outlier_pct"].disabled and not panel.controls["groupsize"].disabled
    assert "RTN 3-bit per-channel" in panel.message.value

    calls = []
    monkeypatch.setattr(sweeper, "_evaluate", lambda *a: calls.append(1) or {})
    again = widgets.SweepPanel(
        sweeper, common=common, initial=[QuantConfig(wbits=3, outlier_pct=1.0, **common)]
    )
    again.controls["method"].value = "rtn"
    assert calls == [] and "from the cache" in again.message.value


def test_a_new_point_refines_in_place_and_windows_are_never_scored_twice(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    from sqlab import evaluate

    monkeypatch.setenv("SQLAB_DATA_DIR", str(tmp_path / "data"))
    sweeper = experiments.Sweeper(
        str(tiny_model_dir), experiments.EvalSettings((f"text:{text_file}",), 16, 6), progress=False
    )
    common = dict(calib=f"text:{text_file}", nsamples=2, seqlen=16)
    panel = widgets.SweepPanel(sweeper, common=common)
    seen = []
    original = panel._estimating
    monkeypatch.setattr(panel, "_estimating", lambda *a: (seen.append(a[2]), original(*a))[1])
    panel.controls["outlier_pct"].value = 1.0
    windows = [e.windows for e in seen]  # on the CPU one window after the other comes in
    assert windows == [1, 2, 3, 4, 5, 6] and all(e.total == 6 for e in seen)
    assert seen[0].high == float("inf")  # one window: no interval yet
    assert all(e.low < e.ppl < e.high < float("inf") for e in seen[1:-1])
    assert seen[-1].final and seen[-1].low == pytest.approx(seen[-1].ppl) == pytest.approx(
        seen[-1].high
    )
    row = panel.rows[-1]
    assert row["ppl_" + f"text:{text_file}"] == pytest.approx(seen[-1].ppl)
    # the same point again, evaluation cut short after its first two windows: the windows
    # scored before are read back, and the next run scores only the rest
    config = QuantConfig(wbits=3, sensitive_pct=1.0, **common)
    scored = []
    real = evaluate.perplexity_estimates

    def cut_short(*args, **kwargs):
        for estimate in real(*args, **kwargs):
            scored.append(estimate.windows)
            yield estimate
            if scored[-1] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "perplexity_estimates", cut_short)
    with pytest.raises(KeyboardInterrupt):
        sweeper.run_point(config)
    counted = []
    monkeypatch.setattr(
        evaluate,
        "perplexity_estimates",
        lambda *a, **k: (counted.append(len(k["scored"])), real(*a, **k))[1],
    )
    final = sweeper.run_point(config)
    assert counted == [2] and final["label"] == config.label()


def test_progressive_estimates_end_at_the_perplexity(tiny_llama):
    from sqlab import evaluate

    tokens = torch.randint(0, 320, (9 * 16,), generator=torch.Generator().manual_seed(2))
    estimates = list(
        evaluate.perplexity_estimates(tiny_llama, tokens, 16, batch_size=1, progress=False)
    )
    assert [e.windows for e in estimates] == list(range(1, 10))
    assert estimates[0].high == float("inf")  # one window: no interval yet
    assert all(e.low <= e.ppl <= e.high for e in estimates)
    pairs = list(
        evaluate.perplexity_estimates(tiny_llama, tokens, 16, batch_size=2, progress=False)
    )
    assert [e.windows for e in pairs] == [2, 4, 6, 8, 9]
    assert pairs[-1].ppl == pytest.approx(estimates[-1].ppl, rel=1e-5)
    assert estimates[-1].ppl == pytest.approx(
        evaluate.perplexity(tiny_llama, tokens, 16, progress=False).ppl
    )
    assert evaluate.spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7] and sorted(
        evaluate.spread_order(11)
    ) == list(range(11))
