import math

import pytest
import torch

from sqlab import GPTQConfig, RTNConfig, SqlabError
from sqlab.baselines import (
    bits_per_weight,
    gptq_quantize,
    gptq_quantize_model,
    rtn_quantize,
    rtn_quantize_model,
)
from tests.conftest import make_llama


def _layer_and_inputs(seed=0, out=48, inp=96, tokens=1500):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    # correlated inputs with a few loud channels, as activations are
    mix = torch.randn(inp, inp, generator=gen) / math.sqrt(inp)
    x = mix @ torch.randn(inp, tokens, generator=gen)
    x[:4] *= 6
    return w, x


def test_rtn_levels_and_groups():
    w, _ = _layer_and_inputs()
    q = rtn_quantize(w, 3)
    assert all(len(torch.unique(row)) <= 8 for row in q)
    step = (w.amax(1).clamp_min(0) - w.amin(1).clamp_max(0)) / 7
    assert (
        (w - q).abs().amax(1) <= step * 1.01
    ).all()  # within a grid step (the zero point is rounded)
    grouped = rtn_quantize(w, 3, groupsize=40)  # 96 = 40 + 40 + 16: a shorter last group
    assert all(len(torch.unique(row[80:])) <= 8 for row in grouped)
    assert (w - grouped).pow(2).sum() < (w - q).pow(2).sum()
    assert (w - rtn_quantize(w, 4)).pow(2).sum() < (w - q).pow(2).sum()
    with pytest.raises(SqlabError, match="RTN wbits must be"):
        rtn_quantize(w, 5)


def test_effective_bits():
    assert bits_per_weight(3, 4096, 4096) == pytest.approx(3 + 19 / 4096)
    assert bits_per_weight(4, 576, 576, groupsize=128) == pytest.approx(
        4 + 5 * 20 / 576
    )  # 5 groups, last of 64
    assert bits_per_weight(4, 576, 576, 128, act_order=True) == pytest.approx(
        4 + 5 * 20 / 576 + 32 / 576
    )


@pytest.mark.parametrize(
    "groupsize, act_order", [(None, False), (32, False), (None, True), (32, True)]
)
def test_gptq_reconstructs_the_layer_output_better_than_rtn(groupsize, act_order):
    w, x = _layer_and_inputs()
    hessian = 2 * x @ x.T / x.shape[1]
    q = gptq_quantize(w, hessian, 3, groupsize, act_order)
    r = rtn_quantize(w, 3, groupsize)
    gptq_error = ((w - q) @ x).pow(2).sum()
    rtn_error = ((w - r) @ x).pow(2).sum()
    assert gptq_error < 0.9 * rtn_error
    if groupsize is None:
        assert all(len(torch.unique(row)) <= 8 for row in q)  # still a 3-bit grid per channel


def _windows(n=3, seqlen=20, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_gptq_model_is_sequential_and_its_hessians_are_cached(tmp_path, monkeypatch):
    import sqlab.baselines as b

    config = GPTQConfig(wbits=3, groupsize=32)
    original = make_llama()
    model = make_llama()
    report = gptq_quantize_model(
        model, _windows(), config, cache_dir=tmp_path, cache_key="k", progress=False
    )
    assert len(report.layers) == 14 and report.bits_per_weight > 3
    for name, p in model.named_parameters():
        if "proj" in name:
            assert not torch.equal(p, original.get_parameter(name)), name

    # block 1 saw the outputs of the quantized block 0
    from safetensors.torch import load_file

    cached = load_file(str(tmp_path / "k" / "block_0001.safetensors"))["self_attn.q_proj"]

    def q_proj_inputs(m):
        seen = []
        hook = m.model.layers[1].self_attn.q_proj.register_forward_hook(
            lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        with torch.no_grad():
            for w in _windows():
                m(w[None])
        hook.remove()
        x = torch.cat(seen)
        return 2 * x.T @ x / x.shape[0]

    assert torch.allclose(
        cached, q_proj_inputs(model), rtol=1e-4, atol=1e-6
    )  # inputs behind quantized block 0
    assert not torch.allclose(cached, q_proj_inputs(original), rtol=1e-3, atol=1e-6)

    # a second run with the same key runs no forward pass and gives the same weights
    monkeypatch.setattr(
        b, "_block_inputs", lambda *a: (_ for _ in ()).throw(AssertionError("ran the model"))
    )
    again = make_llama()
    gptq_quantize_model(
        again, _windows(), config, cache_dir=tmp_path, cache_key="k", progress=False
    )
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        if "layers.0" in name:
            assert torch.equal(p, q), name


def test_rtn_model_report():
    model = make_llama()
    report = rtn_quantize_model(model, RTNConfig(wbits=4, groupsize=32))
    assert report.bits_per_weight == pytest.approx(bits_per_weight(4, 64, 64, 32), rel=0.05)
    assert all(s.mse > 0 for s in report.layers)
