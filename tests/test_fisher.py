"""The Fisher pass in every memory strategy: same numbers, less memory."""

import pytest
import torch

from sqlab import SqlabError, fisher_information
from sqlab.sensitivity import FisherStrategy
from tests.conftest import make_llama, make_opt


def _windows(vocab=320, n=3, seqlen=32):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _reference(model, windows):
    """The definition, spelled out: the sum over windows of every weight's squared gradient."""
    from sqlab.models import quantizable_linears

    linears = quantizable_linears(model)
    total = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    for window in windows:
        model.zero_grad()
        model(window[None], labels=window[None]).loss.backward()
        for n, m in linears.items():
            total[n] += m.weight.grad.square()
    model.zero_grad()
    return total


@pytest.mark.parametrize("make", [make_llama, make_opt])
@pytest.mark.parametrize(
    "strategy",
    [
        FisherStrategy(),
        FisherStrategy(checkpointing=True),
        FisherStrategy(offload="cpu"),
        FisherStrategy(checkpointing=True, offload="disk"),
    ],
)
def test_every_strategy_gives_the_fisher(make, strategy, tmp_path):
    model, windows = make(), _windows()
    expected = _reference(model, windows)
    fisher = fisher_information(
        model, windows, strategy=strategy, offload_dir=tmp_path, progress=False
    )
    assert set(fisher) == set(expected) and fisher.strategy == strategy
    for name, f in fisher.items():
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        torch.testing.assert_close(f, expected[name], rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    assert not list(tmp_path.iterdir())  # disk accumulators leave no files behind


def test_checkpointing_keeps_eval_mode_and_less_memory():
    """OPT's blocks drop out in training mode: checkpointing must not switch it on; and it lowers
    the measured peak (activations of one block at a time instead of all of them)."""
    model = make_opt(layers=4, hidden=64)
    model.config.dropout = 0.5
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.5
    windows = _windows(seqlen=128, n=1)
    plain = fisher_information(model, windows, progress=False, measure=True)
    again = fisher_information(
        model, windows, progress=False, measure=True, strategy=FisherStrategy(checkpointing=True)
    )
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-12)
    assert not model.training
    assert again.peak_bytes < plain.peak_bytes
    assert "CPU" in plain.peak_kind


def test_a_model_placed_by_a_device_map(tiny_model_dir):
    """A model that accelerate dispatched (here every block on the CPU, named one by one) runs the
    same pass."""
    from sqlab.models import load_model

    names = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    placed = load_model(str(tiny_model_dir), device_map=names)
    plain = load_model(str(tiny_model_dir), device="cpu")
    windows = _windows()
    a = fisher_information(placed, windows, progress=False)
    b = fisher_information(plain, windows, progress=False)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=0)


def test_bad_strategy_names_the_value():
    with pytest.raises(SqlabError, match="offload must be one of none, cpu, disk, got 'gpu'"):
        FisherStrategy(offload="gpu")


def test_checkpointing_gives_back_a_forward_that_accelerate_installed():
    """accelerate's device hooks replace a block's forward on the instance; the pass must leave
    them in place."""
    model = make_llama()
    block = model.model.layers[0]
    hooked = block.forward  # a bound method stored on the instance, as accelerate does
    block.forward = hooked
    fisher_information(
        model, _windows(), strategy=FisherStrategy(checkpointing=True), progress=False
    )
    assert block.__dict__["forward"] is hooked
    assert "forward" not in model.model.layers[1].__dict__
