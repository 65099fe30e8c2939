import math
import threading

import pytest
import torch

from sqlab import SqlabError, evaluate


def test_window_starts_non_overlapping_and_evenly_spread():
    assert evaluate.window_starts(100, 10).tolist() == list(range(0, 100, 10))
    assert evaluate.window_starts(105, 10, max_windows=3).tolist() == [
        0,
        40,
        90,
    ]  # linspace(0, 9, 3), rounded
    assert evaluate.window_starts(30, 10, max_windows=8).tolist() == [0, 10, 20]


def test_perplexity_matches_a_direct_computation(tiny_llama):
    torch.manual_seed(0)
    tokens = torch.randint(0, tiny_llama.config.vocab_size, (3 * 32 + 5,))
    result = evaluate.perplexity(tiny_llama, tokens, seqlen=32, batch_size=2, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tokens[: 3 * 32].reshape(3, 32):
            logits = tiny_llama(w[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
            count += 31
    assert result.windows == 3 and result.tokens == count
    assert math.isclose(result.ppl, math.exp(nll / count), rel_tol=1e-5)
    # about uniform over the vocabulary for an untrained model
    assert 0.5 * 320 < result.ppl < 2 * 320


def _direct_nll(model, batch):
    logits = model(batch).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    )
    return nll.reshape(len(batch), -1).sum(1)


@pytest.mark.parametrize("chunk", [48, 100, 320, 1024])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_window_nll_through_slices_of_the_output_layer(family, chunk, request):
    model = request.getfixturevalue(f"tiny_{family}")
    if family == "opt":  # a bias on the output layer is sliced with its weight
        model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.vocab_size))
    assert evaluate._plain_head(model) is model.lm_head
    batch = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(2))
    # the vocabulary's first and last ids among the targets: the edges of the slices
    batch[0, 1], batch[1, 5], batch[2, 7] = 0, 319, chunk % 320
    with torch.no_grad():
        expected = _direct_nll(model, batch)
    got = evaluate.window_nll(model, batch, chunk=chunk)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_window_nll_of_a_model_whose_forward_changes_the_logits(tiny_llama):
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # logits scaled as Cohere and Granite scale them
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30.0 * out.logits
            return out

    model = Scaled(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    assert evaluate._plain_head(model) is None
    batch = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _direct_nll(model, batch)
        plain = _direct_nll(tiny_llama, batch)
    got = evaluate.window_nll(model, batch, chunk=48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, plain, rtol=1e-2)


def test_batch_size_does_not_change_the_result(tiny_llama):
    tokens = torch.randint(0, 320, (4 * 16,), generator=torch.Generator().manual_seed(1))
    one = evaluate.perplexity(tiny_llama, tokens, 16, batch_size=1, progress=False)
    four = evaluate.perplexity(tiny_llama, tokens, 16, batch_size=4, progress=False)
    assert math.isclose(one.ppl, four.ppl, rel_tol=1e-5)


def test_windows_side_by_side_give_the_same_estimates(tiny_llama):
    tokens = torch.randint(0, 320, (9 * 16,), generator=torch.Generator().manual_seed(4))
    seen = []

    def on_window(start, nll_sum, count):
        seen.append((start, threading.get_ident()))

    runs = {
        workers: list(
            evaluate.perplexity_estimates(
                tiny_llama, tokens, 16, workers=workers, on_window=on_window, progress=False
            )
        )
        for workers in (1, 3)
    }
    one, three = runs[1], runs[3]
    assert [e.windows for e in one] == [e.windows for e in three] == list(range(1, 10))
    for a, b in zip(one, three):
        assert math.isclose(a.nll, b.nll, rel_tol=1e-6)
        assert math.isclose(a.high, b.high, rel_tol=1e-6)
    # every window reached the caller once per run, in its own thread (a cache is written there)
    assert len(seen) == 18 and {ident for _, ident in seen} == {threading.get_ident()}
    assert [s for s, _ in seen[:9]] == [s for s, _ in seen[9:]]


@pytest.mark.parametrize("name", ["batch_size", "workers"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_batch_size_and_workers_are_positive_integers(tiny_llama, name, value):
    tokens = torch.zeros(64, dtype=torch.long)
    with pytest.raises(SqlabError, match=f"{name} must be a positive integer .or None., got"):
        evaluate.perplexity(tiny_llama, tokens, 16, progress=False, **{name: value})


def test_seqlen_errors(tiny_llama):
    tokens = torch.zeros(100, dtype=torch.long)
    with pytest.raises(
        SqlabError, match="seqlen 512 is longer than the model's context .256 tokens."
    ):
        evaluate.perplexity(tiny_llama, tokens, 512, progress=False)
    with pytest.raises(
        SqlabError, match="seqlen 200 is longer than the evaluation text .100 tokens."
    ):
        evaluate.perplexity(tiny_llama, tokens, 200, progress=False)
    with pytest.raises(SqlabError, match="seqlen must be an integer >= 2"):
        evaluate.perplexity(tiny_llama, tokens, 1, progress=False)


def test_generation_benchmark_on_cpu(tiny_llama, tiny_tokenizer):
    bench = evaluate.generation_benchmark(tiny_llama, tiny_tokenizer, new_tokens=8, repeats=3)
    assert bench.device == "cpu" and bench.new_tokens == 8 and bench.repeats == 3
    assert bench.tokens_per_s > 0 and bench.decode_ms_per_token > 0
    low, high = bench.decode_ms_spread
    assert low <= bench.decode_ms_per_token <= high
    assert bench.graph_decode_ms_per_token is None and "need a GPU" in bench.graph_note
    stored = [*tiny_llama.parameters(), *tiny_llama.buffers()]
    assert bench.weights_mb == pytest.approx(
        sum(t.numel() * t.element_size() for t in stored) / 2**20
    )
    assert bench.peak_memory_mb > bench.weights_mb
    with pytest.raises(SqlabError, match="--tokens must be an integer >= 2"):
        evaluate.generation_benchmark(tiny_llama, tiny_tokenizer, new_tokens=1)


def test_gemv_timings_cover_every_format_and_count_the_bytes_read():
    rows = evaluate.gemv_timings([(64, 32), (96, 128)], repeats=2, cache_bytes=64 * 1024)
    assert [(tuple(r["shape"]), r["format"]) for r in rows] == [
        ((o, i), f) for o, i in ((64, 32), (96, 128)) for f in evaluate.GEMV_FORMATS
    ]
    for r in rows:
        out_features, in_features = r["shape"]
        dense = {"fp32": 4, "bf16": 2}.get(r["format"])
        if dense:
            assert r["bytes"] == out_features * in_features * dense
        else:
            # packed: the indices, and the kernel's 16-entry fp32 table per row, and the sparse part
            wbits = int(r["format"][1])
            packed = -(-in_features // 32) * wbits * out_features * 4 + out_features * (
                2**wbits * 2 + 16 * 4
            )
            assert r["bytes"] >= packed and (r["format"] != "w3s" or r["bytes"] > packed)
        # enough copies that together they exceed twice the given cache
        assert r["copies"] * r["bytes"] >= 2 * 64 * 1024 > (r["copies"] - 1) * r["bytes"]
        assert r["us_min"] <= r["us_median"] <= r["us_max"] and r["gbs"] == pytest.approx(
            r["bytes"] / r["us_median"] / 1e3
        )


def test_linear_weights_count_what_decoding_holds(tiny_llama):
    from sqlab import QuantConfig, quantize_model

    fp32 = evaluate.linear_weights_bytes(tiny_llama)
    assert fp32 == sum(m.weight.numel() * 4 for m in sqlab_linears(tiny_llama))
    quantize_model(tiny_llama, QuantConfig(wbits=3, weighted=False), progress=False)
    before = evaluate.linear_weights_bytes(tiny_llama)
    tiny_llama(
        torch.zeros(1, 3, dtype=torch.long)
    )  # prepares the CPU kernels, which keep fp32 tables
    after = evaluate.linear_weights_bytes(tiny_llama)
    assert fp32 * 3 / 32 < before < after < fp32


def sqlab_linears(model):
    from sqlab import quantizable_linears

    return quantizable_linears(model).values()


def test_memory_bandwidth_is_a_plausible_rate():
    gbs = evaluate.memory_bandwidth("cpu", megabytes=16, repeats=3)
    assert 0.1 < gbs < 10_000  # GB/s: a copy cannot be slower than a disk or faster than any RAM


def test_static_decoder_gives_the_tokens_of_generate(tiny_llama):
    """The step a CUDA graph captures
    (static cache, in-place position and output) decodes like generate().
    """
    ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    decoder = evaluate.StaticDecoder(tiny_llama, ids, 12)
    for _ in range(11):
        decoder.step()
    assert torch.equal(decoder.tokens, evaluate.greedy(tiny_llama, ids, 12)[0, ids.shape[1] :])
    with pytest.raises(SqlabError, match="CUDA graphs need the model on a CUDA GPU"):
        decoder.capture()


@pytest.mark.gpu
def test_cuda_graph_decoding_gives_the_tokens_of_generate(tiny_llama):
    model = tiny_llama.cuda()
    ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(0)).cuda()
    decoder = evaluate.StaticDecoder(model, ids, 14)
    decoder.capture(warmup=2)
    for _ in range(11):
        decoder.step()
    torch.cuda.synchronize()
    assert torch.equal(decoder.tokens, evaluate.greedy(model, ids, 14)[0, ids.shape[1] :].cpu())
