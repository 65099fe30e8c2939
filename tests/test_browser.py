"""JupyterLab in a real browser: open the evaluation notebook, run it, move a sweep widget.

Uses Debian's Chromium (``make test`` installs it) driven by Playwright with
``executable_path``; no browser is downloaded.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sqlab-browser-test"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
POINTS = ".jupyter-widgets .js-plotly-plot .scatterlayer .trace .point"
# every code cell shows an execution count and none is queued or running ("[*]")
ALL_CELLS_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]\
.map(p => p.textContent.trim());
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p));
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on localhost over a copy of the notebooks
    (so nothing committed is touched).
    """
    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work)
    port = _free_port()
    env = {
        **os.environ,
        "SQLAB_FAST": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
    }
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={TOKEN}",
            "--allow-root",
            f"--ServerApp.root_dir={work}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not start; see {tmp_path / 'jupyterlab.log'}")
    yield url
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.mark.browser
def test_sweep_panel_in_jupyterlab(jupyterlab, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(f"{jupyterlab}/lab/tree/04_evaluation.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000
            )
            # the kernel is connected (before that, running asks which kernel to start)
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            dialog = page.locator(".jp-Dialog")
            try:
                dialog.wait_for(timeout=3_000)
                dialog.get_by_role("button", name="Select").click()
            except PlaywrightTimeout:
                pass  # no kernel question: the cells are running

            # the panel renders with its ppl-vs-size plot; wait for the whole notebook to
            # finish (running cells take the keyboard focus)
            page.wait_for_selector(".widget-toggle-buttons", timeout=900_000)
            page.wait_for_function(ALL_CELLS_RAN, timeout=400_000)
            page.wait_for_function(
                f"document.querySelectorAll('{POINTS}').length > 0", timeout=300_000
            )
            before = page.locator(POINTS).count()
            status = page.locator(".widget-html-content", has_text="bits/weight").last
            before_text = status.inner_text()

            # the outlier slider renders as a track, and dragging its handle with the mouse one
            # step to the right picks the next value: a new point is quantized,
            # evaluated and plotted
            widget = page.locator(".widget-slider", has_text="outliers %")
            widget.scroll_into_view_if_needed()
            track = widget.locator(".noUi-base")
            handle = widget.locator(".noUi-handle")
            track_box, handle_box = track.bounding_box(), handle.bounding_box()
            assert track_box["width"] > 150, f"the slider renders {track_box['width']:.0f} px wide"
            steps = 6  # the slider's 7 values (OUTLIER_STEPS) are 6 steps apart
            x, y = (
                handle_box["x"] + handle_box["width"] / 2,
                handle_box["y"] + handle_box["height"] / 2,
            )
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + track_box["width"] / steps, y, steps=8)
            page.mouse.up()
            expect(handle).not_to_have_attribute("aria-valuenow", "0.0")  # the slider moved
            page.wait_for_function(
                f"document.querySelectorAll('{POINTS}').length > {before}", timeout=600_000
            )
            page.wait_for_function(
                "t => !document.body.innerText.includes(t)", arg=before_text, timeout=60_000
            )
            after_text = status.inner_text()
            assert "0.05%+0%" in after_text and "perplexity" in after_text
            panel = page.locator(".widget-vbox", has=page.locator(".widget-toggle-buttons")).last
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(tmp_path / "sweep-panel.png"))
            page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (tmp_path / "sweep-panel.png").stat().st_size > 10_000
