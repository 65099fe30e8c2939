import threading
import time

import pytest
import torch

from sqlab.threads import side_by_side, torch_threads


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_side_by_side_gives_every_result_in_order(workers):
    items = list(range(7))
    got = list(side_by_side(lambda i: (i * i, threading.get_ident()), items, workers))
    assert [value for value, _ in got] == [i * i for i in items]
    idents = {ident for _, ident in got}
    if workers == 1:  # in the caller's thread
        assert idents == {threading.get_ident()}
    else:
        assert threading.get_ident() not in idents and len(idents) <= workers


def test_side_by_side_runs_the_workers_at_once():
    # each item waits for the other worker's item: one after the other, the barrier breaks
    barrier = threading.Barrier(2, timeout=10)
    assert list(side_by_side(lambda i: barrier.wait() >= 0, range(4), 2)) == [True] * 4


def test_side_by_side_shares_out_torchs_threads_and_gives_them_back():
    with torch_threads(4):
        counts = list(side_by_side(lambda _: torch.get_num_threads(), range(6), 2))
        assert counts == [2] * 6
        assert list(side_by_side(lambda _: torch.get_num_threads(), range(6), 8)) == [1] * 6
        assert torch.get_num_threads() == 4


def test_side_by_side_workers_take_the_callers_grad_mode():
    x = torch.ones(3, requires_grad=True)
    with torch.inference_mode():
        (y,) = side_by_side(lambda _: x * 2, [0], 2)
    assert y.is_inference() and y.grad_fn is None
    (y,) = side_by_side(lambda _: x * 2, [0], 2)
    assert not y.is_inference() and y.grad_fn is not None


def test_side_by_side_passes_a_workers_error_on():
    def work(i):
        if i == 3:
            raise ValueError("item 3")
        return i

    results = side_by_side(work, range(6), 2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3"):
        next(results)


def test_closing_early_cancels_the_rest_and_waits_for_the_running():
    started, finished = [], []

    def work(i):
        started.append(i)
        time.sleep(0.05)
        finished.append(i)
        return i

    results = side_by_side(work, range(20), 2)
    assert next(results) == 0
    results.close()
    assert sorted(finished) == sorted(started)  # nothing still running
    assert len(started) < 20  # the rest never started
    assert started[:2] == [0, 1]
