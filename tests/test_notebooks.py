"""Every notebook runs top to bottom in fast mode, and is committed without outputs."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"

# what each notebook must show: (plotly figures, widget panels) at least
EXPECTED = {
    "01_sensitivity.ipynb": (3, 1),
    "02_outliers.ipynb": (5, 1),
    "03_quantization.ipynb": (4, 0),
    "04_evaluation.ipynb": (2, 1),
    "05_paper_figures.ipynb": (9, 0),
}


def test_every_notebook_is_covered():
    assert [p.name for p in NOTEBOOKS][: len(EXPECTED)] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} is committed with outputs"
            )
    assert "widgets" not in nb.metadata
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
        "JupyterLab would ask for a kernel"
    )


def _run(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SQLAB_FAST", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return nb


def _outputs(nb, kind):
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    nb = _run(path, monkeypatch)
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    figures, panels = EXPECTED.get(path.name, (1, 0))
    plots = _outputs(nb, PLOTLY)
    assert len(plots) >= figures
    for plot in plots:
        layout = plot["data"][PLOTLY]["layout"]
        assert layout.get("title", {}).get("text"), "every figure has a title"
    assert len(_outputs(nb, WIDGET)) >= panels
    if path.name == "04_evaluation.ipynb":
        table = next(
            o for o in _outputs(nb, "text/html") if "bits_per_weight" in o["data"]["text/html"]
        )
        html = table["data"]["text/html"]
        for label in (
            "unquantized",
            "RTN 3-bit per-channel",
            "GPTQ 4-bit per-channel",
            "SqueezeLLM 3-bit dense",
            "SqueezeLLM 4-bit 0.45%+0.05%",
        ):
            assert label in html
