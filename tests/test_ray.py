"""Sweeps on a local Ray cluster with two workers: the serial sweep's table, the shared result
cache, resuming, and a clear error without Ray."""

import sys
import time

import pytest
import torch

from sqlab import SqlabError, experiments
from sqlab.cluster import require_ray, run_on_ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _table(frame):
    table = experiments.tidy(frame).drop(columns=["seconds", "cached"])
    # a text:PATH dataset's column has a ':' and is listed twice by tidy; once is enough here
    return table.loc[:, ~table.columns.duplicated()].reset_index(drop=True)


def test_four_points_on_two_workers_give_the_serial_table(
    local_ray, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    configs = experiments.sweep_configs(
        ("squeezellm",),
        (3, 4),
        (0.0, 0.45),
        (0.0,),
        calib=f"text:{text_file}",
        nsamples=2,
        seqlen=16,
    )
    assert len(configs) == 4
    evaluation = experiments.EvalSettings((f"text:{text_file}",), 32, 2)
    monkeypatch.setenv("SQLAB_DATA_DIR", str(tmp_path / "serial"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker computes
    try:
        serial = experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False).run(
            configs, include_reference=False
        )
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("SQLAB_DATA_DIR", str(tmp_path / "ray"))
    start = time.perf_counter()
    on_ray = run_on_ray(
        str(tiny_model_dir), configs, evaluation, workers=2, include_reference=False, progress=False
    )
    seconds = time.perf_counter() - start
    assert not on_ray["cached"].any()
    a, b = _table(serial), _table(on_ray)
    assert list(a["label"]) == list(b["label"]) == [c.label() for c in configs]
    for column in a.columns:
        if column.startswith("ppl_") or a[column].dtype.kind == "f":
            assert b[column].tolist() == pytest.approx(a[column].tolist(), rel=1e-6), column
        else:
            assert b[column].tolist() == a[column].tolist(), column
    results = list((tmp_path / "ray" / "cache" / "results").glob("*.json"))
    assert len(results) == 4  # the workers wrote the shared result cache
    print(f"4 points on 2 Ray workers: {seconds:.1f} s")

    # interrupted: one point lost; the same sweep from the command line computes only that one
    results[0].unlink()
    from sqlab.cli import main

    out = tmp_path / "out"
    status = main(
        [
            "sweep",
            "--model",
            str(tiny_model_dir),
            "--wbits",
            "3,4",
            "--outlier-pct",
            "0,0.45",
            "--calib",
            f"text:{text_file}",
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--datasets",
            f"text:{text_file}",
            "--eval-seqlen",
            "32",
            "--max-windows",
            "2",
            "--ray",
            "--workers",
            "2",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    import pandas as pd

    again = pd.read_csv(out / "results.csv")
    quantized = again[again["method"] == "squeezellm"]
    assert quantized["cached"].tolist().count(False) == 1 and len(quantized) == 4
    assert quantized["ppl_text:" + str(text_file)].tolist() == pytest.approx(
        a["ppl_text:" + str(text_file)].tolist(), rel=1e-6
    )


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SqlabError, match=r"pip install 'sqlab\[ray\]'"):
        require_ray()
