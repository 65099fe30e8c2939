"""torch's CPU threads: how many a block of code gets, and work spread over threads of its own.

torch's thread count is process-wide, and a new thread starts with the count the process
has when it first runs an operator; each function here restores what it changed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


@contextmanager
def torch_threads(count: int):
    """torch's CPU thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def side_by_side(
    work: Callable[[Item], Result], items: Iterable[Item], workers: int
) -> Iterator[Result]:
    """``work(item)`` for each item, in order, ``workers`` items at a time in threads of their own
    that share torch's threads out between them (at least one each); this thread waits. One
    worker: every item in this thread, one after the other.

    Closing the iterator early cancels the items not started and waits for the running ones,
    so nothing runs on after it (the caller may change the model they read).
    """
    if workers == 1:
        yield from map(work, items)
        return
    each = max(1, torch.get_num_threads() // workers)
    # grad modes belong to a thread: the workers take the caller's
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(item: Item) -> Result:
        torch.set_num_threads(each)  # this thread's count (and the process's, as set around it)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return work(item)

    with torch_threads(each), ThreadPoolExecutor(workers, "sqlab-side-by-side") as pool:
        running = deque()
        try:
            for item in items:
                running.append(pool.submit(run, item))
                if len(running) == workers:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            for future in running:
                future.cancel()
