import pytest
import torch

from sqlab import QuantConfig, SqlabError, SqueezeLinear, fisher_information, quantize_model
from sqlab.models import quantizable_linears
from sqlab.quantize import _WorkDir
from tests.conftest import make_llama, make_opt


def _fisher(model, seed=0):
    ids = torch.randint(
        0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(seed)
    )
    return fisher_information(model, ids, progress=False)


def test_fisher_is_the_sum_of_squared_gradients():
    model = make_llama(layers=1)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(model, ids, progress=False)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind
    name = "model.layers.0.mlp.down_proj"
    expected = torch.zeros_like(fisher[name])
    for window in ids:
        model.zero_grad()
        model(window[None], labels=window[None]).loss.backward()
        expected += model.get_submodule(name).weight.grad ** 2
    assert torch.allclose(fisher[name], expected, rtol=1e-5, atol=1e-12)
    assert set(fisher) == set(quantizable_linears(model))


@pytest.mark.parametrize("make, hidden", [(make_llama, 64), (make_llama, 48), (make_opt, 64)])
@pytest.mark.parametrize(
    "wbits, outlier_pct, sensitive_pct", [(3, 0.0, 0.0), (4, 0.45, 0.05), (3, 1.0, 0.5)]
)
def test_packed_model_equals_simulated_model(make, hidden, wbits, outlier_pct, sensitive_pct):
    packed, simulated = make(hidden=hidden), make(hidden=hidden)
    fisher = _fisher(packed)
    config = QuantConfig(wbits=wbits, outlier_pct=outlier_pct, sensitive_pct=sensitive_pct)
    original = {n: m.weight.detach().clone() for n, m in quantizable_linears(packed).items()}
    report = quantize_model(packed, config, fisher, progress=False)
    quantize_model(simulated, config, fisher, simulate=True, progress=False)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, SqueezeLinear)}
    assert set(layers) == set(original)
    x = torch.randint(0, 320, (2, 12))
    assert torch.equal(packed(x).logits, simulated(x).logits)
    for name, layer in layers.items():
        w_hat = layer.dequantize(torch.float32)
        assert layer.wbits == wbits and layer.lookup_table.shape[1] == 2**wbits
        # every weight decodes to a LUT entry of its row, except the sparse ones which are exact
        if layer.nnz:
            r = torch.repeat_interleave(
                torch.arange(layer.out_features), (layer.rows[1:] - layer.rows[:-1]).long()
            )
            assert torch.equal(w_hat[r, layer.cols.long()], original[name][r, layer.cols.long()])
    if outlier_pct:
        assert abs(report.outlier_pct - outlier_pct) <= 0.25  # tiny matrices: coarse steps
        assert report.sparse_pct > report.outlier_pct
    assert wbits < report.bits_per_weight < 16


def test_sqeezellm_beats_rtn_on_weighted_error():
    from sqlab.baselines import rtn_quantize

    model = make_llama()
    fisher = _fisher(model)
    weights = {n: m.weight.detach().clone() for n, m in quantizable_linears(model).items()}
    report = quantize_model(model, QuantConfig(wbits=3), fisher, progress=False)
    for stats in report.layers:
        rtn = rtn_quantize(weights[stats.name], 3)
        rtn_error = float((fisher[stats.name] * (weights[stats.name] - rtn) ** 2).sum())
        assert stats.weighted_error < rtn_error


def test_weighting_switch_changes_the_objective():
    fisher = _fisher(make_llama())
    weighted, plain = make_llama(), make_llama()
    rw = quantize_model(weighted, QuantConfig(wbits=3), fisher, simulate=True, progress=False)
    rp = quantize_model(
        plain, QuantConfig(wbits=3, weighted=False), fisher, simulate=True, progress=False
    )
    assert sum(s.weighted_error for s in rw.layers) < sum(s.weighted_error for s in rp.layers)
    assert sum(s.mse for s in rp.layers) < sum(s.mse for s in rw.layers)


def test_bad_weights_or_fisher_name_the_layer():
    model = make_llama()
    fisher = _fisher(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(
        SqlabError, match="weights of model.layers.1.mlp.up_proj contain NaN or Inf"
    ):
        quantize_model(model, QuantConfig(), fisher, progress=False)
    model = make_llama()
    fisher["model.layers.0.self_attn.k_proj"][0, 0] = float("nan")
    with pytest.raises(
        SqlabError, match="Fisher values of model.layers.0.self_attn.k_proj contain NaN"
    ):
        quantize_model(model, QuantConfig(), fisher, progress=False)
    del fisher["model.layers.0.self_attn.q_proj"]
    with pytest.raises(SqlabError, match="has no entry for model.layers.0.self_attn.q_proj"):
        quantize_model(model, QuantConfig(), fisher, progress=False)
    with pytest.raises(SqlabError, match="needs the Fisher information"):
        quantize_model(model, QuantConfig(), None, progress=False)


def test_blocks_limit_the_work():
    model = make_llama(layers=3)
    quantize_model(model, QuantConfig(), _fisher(model), blocks=[1], progress=False)
    kinds = {n.split(".")[2] for n, m in model.named_modules() if isinstance(m, SqueezeLinear)}
    assert kinds == {"1"}
    fresh = make_llama(layers=3)
    with pytest.raises(SqlabError, match=r"block indices \[7\] out of range; the model has 3"):
        quantize_model(fresh, QuantConfig(), _fisher(fresh), blocks=[7], progress=False)
    with pytest.raises(SqlabError, match="found SqueezeLinear; is the model already quantized"):
        quantize_model(model, QuantConfig(), _fisher(fresh), progress=False)


def test_interrupted_run_resumes_and_ends_with_the_same_result(tmp_path, monkeypatch):
    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    model = make_llama(layers=3)
    fisher = _fisher(model)
    reference = make_llama(layers=3)
    quantize_model(reference, config, fisher, progress=False)

    saves = []
    real_save = _WorkDir.save

    def save_then_crash(self, index, block):
        real_save(self, index, block)
        saves.append(index)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the run dies after two finished blocks

    monkeypatch.setattr(_WorkDir, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(
            make_llama(layers=3), config, fisher, work_dir=tmp_path / "work", progress=False
        )
    monkeypatch.setattr(_WorkDir, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "work").glob("block_*.safetensors")) == [
        "block_0000.safetensors",
        "block_0001.safetensors",
    ]
    assert not list((tmp_path / "work").glob("*tmp*"))

    import sqlab.quantize as q

    quantized = []
    real_split = q.split_group
    monkeypatch.setattr(
        q,
        "split_group",
        lambda weights, *a: quantized.extend(weights) or real_split(weights, *a),
    )
    resumed = make_llama(layers=3)
    quantize_model(resumed, config, fisher, work_dir=tmp_path / "work", progress=False)
    assert {name.split(".")[2] for name in quantized} == {
        "2"
    }  # only the unfinished block ran again
    x = torch.randint(0, 320, (1, 10))
    assert torch.equal(resumed(x).logits, reference(x).logits)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_work_dir_of_another_run_is_refused(tmp_path):
    model = make_llama(layers=1)
    fisher = _fisher(model)
    quantize_model(model, QuantConfig(wbits=3), fisher, work_dir=tmp_path, progress=False)
    with pytest.raises(SqlabError, match="holds blocks of a different run"):
        quantize_model(
            make_llama(layers=1), QuantConfig(wbits=4), fisher, work_dir=tmp_path, progress=False
        )


def test_kmeans_weights_drop_sparse_entries_and_fall_back_to_uniform_per_row():
    from sqlab.quantize import kmeans_weights

    weight = torch.randn(3, 4)
    fisher = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    sparse = torch.tensor([[False, False, True, False], [False, False, True, False], [True] * 4])
    got = kmeans_weights(weight, fisher, sparse, weighted=True)
    assert got.tolist() == [
        [1.0, 0.0, 0.0, 4.0],  # negative Fisher counts as zero; the sparse entry drops out
        [1.0, 1.0, 0.0, 1.0],  # nothing left but zeros: uniform over the dense entries
        [0.0, 0.0, 0.0, 0.0],  # every entry sparse: nothing to cluster
    ]
    assert fisher[0, 1] == -2.0  # the caller's Fisher is not changed
    plain = kmeans_weights(weight, None, sparse, weighted=False)
    assert plain.tolist() == (~sparse).float().tolist()


def test_finite_check_tells_an_overflowing_sum_from_an_entry_that_is_not_finite():
    from sqlab.quantize import check_finite

    huge = torch.full((4, 8), 3e38)  # every entry finite, their float32 sum is not
    check_finite("m", huge, "weights")
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = torch.zeros(4, 8)
        broken[2, 5] = bad
        with pytest.raises(SqlabError, match="weights of m contain NaN or Inf"):
            check_finite("m", broken, "weights")


def test_pipelined_blocks_equal_one_block_at_a_time_in_order():
    import sqlab.quantize as q
    from sqlab.models import block_linears, decoder_blocks

    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    model = make_llama(layers=4)
    fisher = _fisher(model)
    _, thresholds = q.outlier_thresholds(model, config)
    blocks = [
        (index, {f"{prefix}.{n}": m.weight.detach() for n, m in block_linears(model, b).items()})
        for index, (prefix, b) in enumerate(decoder_blocks(model))
    ]
    stored = {2: "block 2 as stored"}  # handed through in its place, not quantized again
    got = list(q.quantize_blocks(iter(blocks), fisher, config, thresholds, stored=stored.get))
    assert [(key, fresh) for key, _, fresh in got] == [(0, True), (1, True), (2, False), (3, True)]
    assert got[2][1] == "block 2 as stored"
    for (key, weights), (_, done, fresh) in zip(blocks, got):
        if not fresh:
            continue
        alone = q.quantize_block(weights, fisher, config, thresholds)
        assert list(done) == list(alone)
        for name, one in alone.items():
            assert torch.equal(done[name].indices, one.indices), name
            assert torch.equal(done[name].lut, one.lut), name
            assert torch.equal(done[name].dequantize(), one.dequantize()), name


def test_the_outlier_share_is_checked_on_the_split_counts(monkeypatch):
    import sqlab.outliers as o

    checked = []
    monkeypatch.setattr(o, "check_share", lambda *args: checked.append(args))
    model = make_llama(layers=2)
    config = QuantConfig(wbits=3, outlier_pct=0.45, sensitive_pct=0.05)
    threads = torch.get_num_threads()
    report = quantize_model(model, config, _fisher(model), progress=False)
    assert torch.get_num_threads() == threads  # lent to the k-means while it ran, given back
    assert checked == [(report.outlier_pct, 0.45, report.outlier_range)]
    assert report.outlier_pct > 0


def test_a_kmeans_error_in_the_worker_reaches_the_caller_and_stops_the_rest(monkeypatch):
    import sqlab.quantize as q

    calls = []

    def failing(points, importances, config, threads=None):
        calls.append(len(points))
        if len(calls) == 3:
            raise SqlabError("k-means failed here")
        return real(points, importances, config, threads)

    real = q.cluster
    monkeypatch.setattr(q, "cluster", failing)
    model = make_llama(layers=6)
    with pytest.raises(SqlabError, match="k-means failed here"):
        quantize_model(model, QuantConfig(wbits=3), _fisher(model), progress=False)
    # two groups a block: the third call is block 1's; at most block 2's were queued behind it
    assert 3 <= len(calls) <= 6
