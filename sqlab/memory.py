"""Measuring memory honestly: what each number counts is part of its name.

- ``TensorPeak`` — the peak of live tensor bytes while a block of code runs: on a GPU
  ``torch.cuda.max_memory_allocated`` (every device the model uses); on the CPU an
  accounting of every tensor storage that torch's operators create (a
  ``TorchDispatchMode``: each new storage is counted until it is freed), on top of the
  bytes already live (``baseline``: the model's parameters, say). It is not the
  process's resident memory: the allocator's caches and Python objects are not in it.
- ``peak_rss_bytes`` — the process's peak resident set (``VmHWM``), everything included;
  ``reset_peak_rss`` starts it again from the current resident set (Linux).
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of every CPU storage an operator creates, until it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:
                continue  # a view, or an in-place result: no new memory
            self.live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)
        return out


class TensorPeak:
    """``with TensorPeak(devices, baseline) as peak: ...`` then ``peak.bytes`` and ``peak.kind``.

    ``devices``: the devices the work runs on (CUDA ones are read from torch's
    allocator, the CPU by the accounting above); ``baseline``: bytes already live on
    the CPU that the CPU figure should include.
    """

    def __init__(self, devices, baseline: int = 0):
        self.devices = sorted({torch.device(d) for d in devices}, key=str)
        self.cuda = [d for d in self.devices if d.type == "cuda"]
        self.baseline = baseline
        self.bytes = 0
        self._mode = None

    @property
    def kind(self) -> str:
        if self.cuda:
            return "peak GPU memory allocated by torch (sum over devices)"
        return "peak live tensor bytes on the CPU (operator accounting, parameters included)"

    def __enter__(self):
        if self.cuda:
            for d in self.cuda:
                torch.cuda.reset_peak_memory_stats(d)
        else:
            self._mode = _LiveStorages().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.bytes = sum(torch.cuda.max_memory_allocated(d) for d in self.cuda)
        else:
            self._mode.__exit__(*exc)
            self.bytes = self.baseline + self._mode.peak
        return False


def _status(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def rss_bytes() -> int | None:
    """The process's resident set now (``VmRSS``; ``None`` where /proc is missing)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int | None:
    """The process's peak resident set (``VmHWM``; ``None`` where /proc is missing)."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Start ``VmHWM`` again from the current resident set (Linux: ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# what a command imports before it reads a model: measured as the baseline, not the command
_PRELUDE = """
import json, sys
import torch, transformers, accelerate, safetensors, tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama
import sqlab, sqlab.cli, sqlab.streaming, sqlab.checkpoint, sqlab.experiments, sqlab.kmeans
from sqlab import memory
baseline = memory.rss_bytes()
memory.reset_peak_rss()
status = sqlab.cli.main(sys.argv[1:])
print(json.dumps({"status": status, "baseline": baseline, "peak": memory.peak_rss_bytes()}))
"""


def command_peak_rss(argv: list[str], env: dict | None = None) -> dict:
    """Run ``sqlab ARGV`` in a fresh process and measure its resident memory.

    ``baseline``: the resident set after importing torch, transformers and sqlab (before
    the command starts); ``peak``: ``VmHWM`` during the command, counted from the
    baseline; ``above_baseline = peak - baseline``: what the command itself needed.
    Bytes; ``status`` the command's exit status; ``stderr`` its messages.
    """
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"status": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout}
    found.update(
        above_baseline=found["peak"] - found["baseline"], stderr=proc.stderr, stdout=proc.stdout
    )
    return found


def _malloc_policy(threshold: int, keep: int) -> bool:
    """Set glibc's mmap threshold and trim threshold (``mallopt``); ``False`` where the C
    library is not glibc. A fixed threshold also stops glibc from moving it by itself."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(set_option(m_mmap_threshold, threshold)) and bool(
        set_option(m_trim_threshold, keep)
    )


def release_freed_tensors(threshold: int = 4 << 20, keep: int = 64 << 20) -> bool:
    """Make freed tensors of ``threshold`` bytes or more go back to the operating system.

    glibc serves blocks below its mmap threshold from its heap, and raises that threshold
    (up to 32 MB) each time a mapped block is freed; so a process that reads tensor after
    tensor keeps the freed ones resident. A fixed threshold maps each large tensor on its
    own and unmaps it when freed; ``keep`` bytes of free heap stay for reuse (a smaller
    threshold or ``keep`` costs time: every new block is fresh pages to fault in; 4 MB
    and 64 MB were faster than glibc's defaults on the default model's quantization).
    Process-wide; ``False`` where the C library is not glibc. The opposite of
    ``reuse_freed_tensors``.
    """
    return _malloc_policy(threshold, keep)


def reuse_freed_tensors(threshold: int = 1 << 30, keep: int = 2 << 30) -> bool:
    """Keep freed tensors below ``threshold`` bytes in the process for the next ones to reuse.

    By default glibc maps a block above its (moving, at most 32 MB) mmap threshold on its
    own and unmaps it when freed, so every forward pass on the CPU faults its activations
    and logits in again, page by page: tens of thousands of page faults per 512-token
    window of the default model, 6-24% of its time on 2 cores. Here blocks up to
    ``threshold`` come from the heap, and up to ``keep`` bytes of free heap stay resident.
    The price: the resident memory stays near its peak after large tensors are freed
    (``release_freed_tensors`` turns it back). Process-wide; ``False`` where the C library
    is not glibc. The sweep engine (``experiments.Sweeper``) sets it on the CPU.
    """
    return _malloc_policy(threshold, keep)
