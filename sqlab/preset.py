"""How big a run is: the full preset, and the fast one that shrinks everything to seconds.

The demo, the report, the notebooks and the benchmarks size their work from one
``Preset``; ``SQLAB_FAST=1`` (set by the test suite) picks the fast one everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    fast: bool
    nsamples: int  # calibration windows for the Fisher information
    calib_seqlen: int  # calibration window length, tokens
    windows: int  # evaluation windows (of 512 tokens on the CPU)
    blocks: list[int] | None  # decoder blocks to quantize (None: all)
    tokens: int  # tokens generated when timing decoding
    repeats: int  # timed runs, after a warm-up (their median is reported)

    @property
    def calib(self) -> dict:
        """The calibration settings of a config: corpus, windows, window length."""
        return dict(calib="shakespeare", nsamples=self.nsamples, seqlen=self.calib_seqlen)


FULL = Preset(
    fast=False, nsamples=16, calib_seqlen=512, windows=32, blocks=None, tokens=32, repeats=5
)
FAST = Preset(
    fast=True, nsamples=2, calib_seqlen=128, windows=2, blocks=[0, 1], tokens=8, repeats=2
)


def fast_mode() -> bool:
    """``SQLAB_FAST=1``: the fast preset everywhere."""
    return os.environ.get("SQLAB_FAST", "") not in ("", "0")


def preset(fast: bool | None = None) -> Preset:
    """The fast preset if asked for (or, when ``fast`` is None, if ``SQLAB_FAST`` is set),
    else the full one.
    """
    return FAST if (fast_mode() if fast is None else fast) else FULL
