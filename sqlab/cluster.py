"""Sweeps on a Ray cluster: the points of one sweep spread over workers, one model each.

Each worker is a Ray actor holding a ``Sweeper``: it loads the model once and runs
points as the driver hands them out (``ray.util.ActorPool``). Results go into the
same result cache as a serial sweep (``data/cache/results``, the same content keys),
which must be a folder every worker sees (one machine, or a shared file system);
a worker answers a point that is already there from the cache, so an interrupted
sweep resumes. Ray is an optional extra (``pip install 'sqlab[ray]'``); sqlab
schedules nothing itself.
"""

from __future__ import annotations

import logging
import os

import torch
from tqdm.auto import tqdm

from .config import QuantConfig
from .errors import SqlabError

log = logging.getLogger(__name__)


def require_ray():
    """The ``ray`` module, or a ``SqlabError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SqlabError("sweeps on Ray need the ray extra: pip install 'sqlab[ray]'") from None
    return ray


class PointWorker:
    """A Ray actor: one ``Sweeper`` (its model loaded once) running the points it is given."""

    def __init__(self, spec: str, evaluation, blocks, data_dir: str, threads: int):
        from .experiments import Sweeper

        os.environ["SQLAB_DATA_DIR"] = data_dir  # the shared result cache
        torch.set_num_threads(threads)
        self.sweeper = Sweeper(spec, evaluation, progress=False, blocks=blocks)

    def run_point(self, index: int, config: QuantConfig | None) -> tuple[int, dict]:
        """The row of point ``index`` of the sweep (``None``: the unquantized reference)."""
        return index, self.sweeper.run_point(config)


def run_on_ray(
    spec: str,
    configs: list[QuantConfig],
    evaluation=None,
    *,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: int = 1,
    include_reference: bool = True,
    blocks: list[int] | None = None,
    progress: bool = True,
):
    """A sweep's rows (as ``Sweeper.run``) computed by ``workers`` Ray actors.

    ``address``: a running cluster (``ray://host:10001``, ``auto``); ``None`` starts a
    local one for this sweep and stops it at the end. Every row as the serial sweep
    computes it; the order of ``configs`` is kept whatever order points finish in.
    """
    import pandas as pd

    from . import assets
    from .experiments import EvalSettings

    ray = require_ray()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SqlabError(f"workers must be an integer >= 1, got {workers!r}")
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=workers * cpus_per_worker, include_dashboard=False, log_to_driver=False
                )
        except Exception as exc:  # ConnectionError, timeouts, a wrong address
            raise SqlabError(
                f"cannot start or reach the Ray cluster {address or '(local)'}: {exc}"
            ) from exc
    try:
        actor = ray.remote(num_cpus=cpus_per_worker)(PointWorker)
        data_dir = str(assets.data_dir().resolve())
        pool = ray.util.ActorPool(
            [
                actor.remote(spec, evaluation or EvalSettings(), blocks, data_dir, cpus_per_worker)
                for _ in range(workers)
            ]
        )
        points = ([None] if include_reference else []) + list(configs)
        rows: list[dict | None] = [None] * len(points)
        # ActorPool hands a point to each idle worker; results come back as they finish
        found = pool.map_unordered(lambda w, job: w.run_point.remote(*job), list(enumerate(points)))
        for index, row in tqdm(
            found,
            total=len(points),
            desc="sweep (ray)",
            unit="point",
            disable=not progress,
            leave=False,
        ):
            rows[index] = row
        return pd.DataFrame(rows)
    except ray.exceptions.RayError as exc:
        raise SqlabError(f"the sweep failed on a Ray worker: {str(exc).splitlines()[0]}") from exc
    finally:
        if started:
            ray.shutdown()
