"""The repository's promises to a new user: dependencies in step, two commands, CI = make test."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _env_requirements() -> tuple[dict[str, str], dict[str, str]]:
    """environment.yml's pip requirements, and the commented-out (GPU-only) ones."""
    active, commented = {}, {}
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
            continue
        if not in_pip:
            continue
        m = re.match(r"\s+(#\s*)?-\s+(\S.*)$", line)
        if not m or m.group(2).startswith("-e"):
            continue
        (commented if m.group(1) else active)[_name(m.group(2))] = m.group(2).strip()
    return active, commented


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {
        _name(r): r
        for r in project["dependencies"]
        + extras["dev"]
        + extras["notebooks"]
        + extras["eval"]
        + extras["ray"]
    }
    gpu = {_name(r): r for r in extras["gpu"]}
    active, commented = _env_requirements()
    assert active == wanted, (
        "environment.yml and pyproject.toml list different packages or versions"
    )
    assert commented == gpu, "environment.yml should list the gpu extra (commented out)"


def test_required_dependencies_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for needed in (
        "torch",
        "transformers",
        "datasets",
        "accelerate",
        "gguf",
        "safetensors",
        "numpy",
        "scikit-learn",
        "tqdm",
        "plotly",
        "ipywidgets",
        "jupyterlab",
    ):
        assert needed in names
    extras = project["optional-dependencies"]
    assert {"pytest", "hypothesis"} <= {_name(r) for r in extras["dev"]}
    assert {"jupyterlab", "ipywidgets", "plotly", "nbclient"} <= {
        _name(r) for r in extras["notebooks"]
    }
    assert any(_name(r).startswith("cupy") for r in extras["gpu"])
    assert "lm-eval" in {_name(r) for r in extras["eval"]}
    assert "ray" in {_name(r) for r in extras["ray"]}
    assert project["scripts"]["sqlab"] == "sqlab.cli:main"


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
    commands = [
        line
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "git clone", "cd "))
    ]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_make_targets_install_and_fetch():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup:", "demo:", "test:", "lab:"):
        assert target in makefile
    assert "torch==2.13.0" in makefile and "nvidia-smi" in makefile
    assert "sqlab fetch" in makefile
    # CI (make test) installs what the lm-eval and Ray tests need
    assert re.search(r'pip install .*-e "\.\[dev,notebooks,eval,ray\]"', makefile)
    # make test lints first, then runs the suite
    assert re.search(r"^test: setup.*\n\t.*ruff check \.\n\t.*pytest", makefile, flags=re.M)
    assert re.search(r"^browser:\n.*apt-get install -y -qq chromium", makefile, flags=re.M)
    assert re.search(r"^demo: setup\n\t.*sqlab demo", makefile, flags=re.M)


def test_layout():
    for path in (
        "notebooks",
        "sqlab",
        "kernels",
        "data",
        "tests",
        "benchmarks",
        "environment.yml",
        "pyproject.toml",
        "Makefile",
        "README.md",
        ".ci/run",
        "data/manifest.json",
        "data/README.md",
    ):
        assert (ROOT / path).exists(), path


def test_importing_sqlab_does_not_need_cupy_or_notebook_packages():
    import subprocess
    import sys

    code = (
        "import sys; import sqlab; "
        "bad = [m for m in ('cupy', 'plotly', 'ipywidgets', 'jupyterlab', 'ray') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
