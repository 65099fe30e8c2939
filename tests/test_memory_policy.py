"""glibc's allocator policies: freed tensors reused (the sweep engine) or given back (streaming)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

FAULTS = """
import resource, sys, torch
from sqlab import memory
assert getattr(memory, sys.argv[1])() if sys.argv[1] != "none" else True
for _ in range(3):  # first 24 MiB tensors, freed (the heap settles around them)
    torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # the same size again and again, as a forward pass's activations
    torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(policy: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, policy], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


def test_reused_memory_is_not_faulted_in_again_and_released_memory_is():
    pages = (24 << 20) // 4096
    # given back after every use: each new tensor is fresh pages (one fault per page or so)
    assert _faults("release_freed_tensors") >= 5 * pages // 2
    # kept: the five tensors take the first one's pages
    assert _faults("reuse_freed_tensors") < pages // 4


def test_the_sweep_engine_reuses_freed_memory_on_the_cpu(monkeypatch, tiny_model_dir):
    from sqlab import experiments, memory

    calls = []
    monkeypatch.setattr(memory, "reuse_freed_tensors", lambda: calls.append(True) or True)
    evaluation = experiments.EvalSettings(("shakespeare",), 64, 2)
    experiments.Sweeper(str(tiny_model_dir), evaluation, progress=False)
    assert calls == [True]
