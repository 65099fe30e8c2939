"""The paper report: every section in one offline HTML file,
GPU figures when the benchmarks wrote them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sqlab import report

SECTIONS = ["memory_wall", "distributions", "nonuniform", "main_table", "ablations", "latency"]


def _kernel_rows():
    """Rows in the schema benchmarks/kernels.py writes:
    a 2x smaller read makes a kernel about 2x faster.
    """
    rows = []
    for tokens, slower in (
        (1, 1.1),
        (8, 2.0),
    ):  # 8 tokens: the table shows them, the figure does not
        for shape, fp16_bytes in (("4096x4096", 33.6e6), ("11008x4096", 90.2e6)):
            fp16_us = fp16_bytes / 2.4e9 * 1e3
            for kernel, wbits, share in (
                ("torch fp16 matmul", 16, 1.0),
                ("LUT-GEMV 4-bit", 4, 0.26),
                ("LUT-GEMV 3-bit", 3, 0.2),
                ("LUT-GEMV 3-bit + 0.45% sparse", 3, 0.23),
            ):
                us = fp16_us * share * (slower if wbits < 16 else 1.0)
                rows.append(
                    dict(
                        shape=shape,
                        tokens=tokens,
                        kernel=kernel,
                        wbits=wbits,
                        sparse_pct=0.45 if "sparse" in kernel else 0.0,
                        us=us,
                        eager_us=us + 8,
                        bytes=fp16_bytes * share,
                        timing="graph",
                        gbs=fp16_bytes * share / us / 1e3,
                        pct_peak=100 * fp16_bytes * share / us / 1e3 / 3350,
                        speedup_vs_fp16=fp16_us / us,
                        bytes_vs_fp16=share,
                    )
                )
    return {"device": "NVIDIA H100 80GB HBM3", "peak_gbps": 3350.0, "rows": rows}


def _generate_rows():
    rows = [
        dict(
            label=label,
            device="NVIDIA H100 80GB HBM3",
            decode_ms_per_token=ms,
            tokens_per_s=1e3 / ms,
            graph_decode_ms_per_token=ms / 2,
            graph_tokens_per_s=2e3 / ms,
            graph_speedup_vs_fp16=9.0 / ms,
            linears_ms_per_token=ms * 0.7,
            weights_mb=mb + 500,
            linear_weights_mb=mb,
            linear_weights_vs_fp16=mb / 12_288,
            peak_memory_mb=mb + 900,
            speedup_vs_fp16=0.0,
        )
        for label, ms, mb in (
            ("fp16", 9.0, 12_288),
            ("4-bit", 4.2, 3_500),
            ("3-bit", 3.5, 2_700),
            ("3-bit + 0.45% sparse", 3.9, 2_900),
        )
    ]
    return {"device": "NVIDIA H100 80GB HBM3", "rows": rows}


def test_gpu_results_are_read_from_the_benchmarks_output(tmp_path, monkeypatch):
    monkeypatch.setattr(report.assets, "REPO_DATA", tmp_path / "data")
    assert report.gpu_results("kernels") is None
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "NVIDIA-H200-kernels.json").write_text(
        json.dumps({**_kernel_rows(), "device": "NVIDIA H200"})
    )
    assert report.gpu_results("kernels")["device"] == "NVIDIA H200"  # the committed results
    assert report.gpu_results("generate") is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kernels.json").write_text(json.dumps(_kernel_rows()))
    assert report.gpu_results("kernels")["device"] == "NVIDIA H100 80GB HBM3"  # your own run first


def test_the_committed_gpu_results_render():
    kernels, generate = report.gpu_results("kernels"), report.gpu_results("generate")
    assert kernels is not None and generate is not None, (
        "benchmarks/results/ should hold a GPU's results"
    )
    figures, notes = report.gpu_memory_wall(kernels)
    assert figures and notes
    assert report.gpu_latency(generate).figures


def test_gpu_sections_plot_and_state_the_measurements():
    figures, notes = report.gpu_memory_wall(_kernel_rows())
    scatter, table = figures
    names = [t.name for t in scatter.data]
    assert names[:4] == [
        "torch fp16 matmul",
        "LUT-GEMV 4-bit",
        "LUT-GEMV 3-bit",
        "LUT-GEMV 3-bit + 0.45% sparse",
    ]
    assert names[-1] == "peak 3350 GB/s" and all(
        len(t.x) == 2 for t in scatter.data
    )  # the 1-token rows
    assert scatter.layout.xaxis.title.text and scatter.layout.yaxis.title.text
    assert list(table.data[0].header.values) == report.KERNEL_COLUMNS
    assert len(table.data[0].cells.values[0]) == 16  # every row, 8 tokens included
    three = next(
        n for n in notes if n.startswith("NVIDIA H100 80GB HBM3: LUT-GEMV 3-bit at 1 token is")
    )
    assert "4.55-4.55x" in three  # fp16 time / 3-bit time = 1 / (0.2 * 1.1)

    section = report.gpu_latency(_generate_rows())
    assert section.key == "latency" and "H100" in section.setting
    assert list(section.table.columns) == report.GENERATE_COLUMNS
    assert any("captured CUDA graph per token, 3-bit decodes 2.57x" in n for n in section.notes)
    assert any("2.57x" in n for n in section.notes)  # 9.0 ms / 3.5 ms
    page = report.render_html([section])
    assert (
        "plotly.js v" in page and "Plotly.newPlot" in page and "id='latency'" in page
    )  # the library, inlined


@pytest.mark.slow
def test_report_command_writes_every_section(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sqlab"), "report", "--out", str(out), "--fast"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = (out / "report.html").read_text()
    for key in SECTIONS:
        assert f"id='{key}'" in page
    assert (
        page.count("plotly.js v") == 1 and "<script src=" not in page
    )  # plotly inlined once: opens offline
    assert page.count("Differs from the paper:") == len(SECTIONS)
    sections = {s["key"]: s for s in json.loads((out / "report.json").read_text())}
    assert list(sections) == SECTIONS
    labels = {row["label"] for row in sections["main_table"]["table"]}
    assert {
        "RTN 3-bit per-channel",
        "GPTQ 3-bit per-channel",
        "SqueezeLLM 3-bit dense",
        "SqueezeLLM 3-bit 0.45%+0.05%",
        "SqueezeLLM 4-bit dense",
    } <= labels
    assert any("agree" in n for n in sections["main_table"]["notes"])
