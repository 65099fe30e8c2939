"""The CUDA kernels executed and checked against float64 references.

Every test runs on the ``target`` fixture: ``cuda-on-cpu`` (the unchanged kernels/*.cu
compiled by g++ and run on host threads by tests/cuda_on_cpu, on every machine) and
``cuda`` (a real GPU through CuPy, marked ``gpu``). Launches go through sqlab's own
host path (plans, parameter blocks, ``GemvKernels``), with the geometry planned for an
H100 (132 SMs) on the CPU.
"""

from __future__ import annotations

import concurrent.futures
import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sqlab import (
    QuantConfig,
    SqlabError,
    SqueezeLinear,
    fisher_information,
    kernels,
    packing,
    quantize_model,
)
from sqlab.packing import CSR, balanced_startrows
from tests.conftest import make_llama
from tests.cuda_on_cpu import CudaOnCpu, build
from tests.kernel_cases import (
    BF16,
    DTYPE_SETS,
    F16,
    F32,
    SPMV_KINDS,
    exact_layer,
    exact_x,
    gemv_tolerance,
    random_layer,
    reference_parts,
    reference_y,
)


@dataclass
class Target:
    device: torch.device
    harness: CudaOnCpu | None

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


needs_cupy = pytest.mark.skipif(
    torch.cuda.is_available() and not kernels.available(),
    reason="the kernels need CuPy (pip install 'sqlab[gpu]')",
)


@pytest.fixture(params=["cuda-on-cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cupy])])
def target(request, prebuilt):
    if request.param == "cuda":
        yield Target(torch.device("cuda"), None)
        return
    harness = CudaOnCpu()
    with kernels.use_backend(harness):
        yield Target(torch.device("cpu"), harness)


def _all_variants() -> set[tuple[str, tuple]]:
    """The (file, -D options) this module compiles: those sqlab's dtype combinations need."""
    variants = set()
    for wbits in (3, 4):
        for x, lut, vals, bias in DTYPE_SETS.values():
            lut_t = torch.zeros(1, 1 << wbits, dtype=lut)
            csr = CSR(
                torch.zeros(2, dtype=torch.int32),
                torch.zeros(1, dtype=torch.int32),
                torch.zeros(1, dtype=vals),
            )
            b = None if bias is None else torch.zeros(1, dtype=bias)
            for parts in ((csr, b), (None, b), (csr, None), (None, None)):
                variants.add(
                    (
                        "lut_gemv.cu",
                        kernels._options(kernels._gemv_defines(wbits, x, lut_t, *parts)),
                    )
                )
    for x, vals in SPMV_KINDS.values():
        variants.add(
            (
                "spmv.cu",
                kernels._options((("X_KIND", kernels._KIND[x]), ("VAL_KIND", kernels._KIND[vals]))),
            )
        )
    return variants


@pytest.fixture(scope="session")
def prebuilt():
    """Compile the harness variants in parallel once (g++, cached on disk across runs)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda v: build(kernels._source(v[0]), v[1]), sorted(_all_variants())))


def _gemv(layer: SqueezeLinear, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return kernels.lut_gemv(
        layer.qweight,
        layer.lookup_table,
        x,
        layer.wbits,
        layer.in_features,
        csr=layer.csr(),
        bias=layer.bias,
        **kwargs,
    )


def _assert_exact(y: torch.Tensor, layer: SqueezeLinear, x: torch.Tensor, what: str = "") -> None:
    expected = reference_y(layer, x).to(y.dtype)
    bad = (y.cpu() != expected).nonzero()
    assert not len(bad), (
        f"{what}: {len(bad)} outputs differ, first at {bad[0].tolist()}: "
        f"{y.cpu()[tuple(bad[0])].item()} vs {expected[tuple(bad[0])].item()}"
    )


# --- LUT-GEMV -------------------------------------------------------------------------------------

SMALL_SHAPES = [(100, 37), (48, 96), (33, 1), (64, 64), (1000, 130)]


@pytest.mark.parametrize("in_features, out_features", SMALL_SHAPES)
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_lut_gemv_equals_the_reference_exactly(
    target, in_features, out_features, wbits, density, dtypes
):
    layer = exact_layer(
        in_features, out_features, wbits, density, DTYPE_SETS[dtypes], target.device
    )
    for tokens in (1, 3, 8):
        x = exact_x(tokens, in_features, DTYPE_SETS[dtypes][0], target.device, seed=tokens)
        y = _gemv(layer, x)
        assert (
            y.shape == (tokens, out_features)
            and y.dtype == x.dtype
            and y.device.type == target.device.type
        )
        _assert_exact(y, layer, x, f"{tokens} tokens")


@pytest.mark.parametrize("in_features, out_features", [(4096, 256), (11008, 128), (576, 1536)])
@pytest.mark.parametrize("wbits", [3, 4])
def test_lut_gemv_llama_widths_sparse_and_skewed(target, in_features, out_features, wbits):
    """Long rows (many K slices on 132 SMs, or one slice: many steps per thread) with the
    paper's 0.45% sparse part, a third of it in one row.
    """
    dtypes = DTYPE_SETS["fp16-model"]
    layer = exact_layer(
        in_features, out_features, wbits, 0.0045, dtypes, target.device, skewed=True
    )
    for tokens in (1, 8):
        x = exact_x(tokens, in_features, F16, target.device)
        for splits in (None, 1):
            _assert_exact(_gemv(layer, x, splits=splits), layer, x, f"{tokens} tokens, {splits}")


@pytest.mark.parametrize("dtypes", ["fp16-model", "fp32-model", "bf16-model"])
@pytest.mark.parametrize("wbits", [3, 4])
def test_lut_gemv_with_random_values_is_within_rounding(target, dtypes, wbits):
    layer = random_layer(1000, 130, wbits, 0.01, DTYPE_SETS[dtypes], target.device)
    for tokens in (1, 5):
        x = torch.randn(tokens, 1000, generator=target.generator(tokens), device=target.device).to(
            DTYPE_SETS[dtypes][0]
        )
        ref, bound = gemv_tolerance(layer, x)
        ratio = ((_gemv(layer, x).cpu().double() - ref).abs() / bound).max().item()
        assert ratio <= 1, f"{tokens} tokens: error {ratio:.2f}x the bound"


@pytest.mark.parametrize("wbits", [3, 4])
def test_lut_gemv_splits_out_buffer_vector_and_determinism(target, wbits):
    layer = exact_layer(1000, 130, wbits, 0.02, DTYPE_SETS["fp16-x_fp32-vals"], target.device)
    x = exact_x(3, 1000, F16, target.device)
    results = {}
    for splits in (1, 2, 5, 1000):
        y = _gemv(layer, x, splits=splits)
        _assert_exact(y, layer, x, f"{splits} splits")
        results[splits] = y
    again = _gemv(layer, x, splits=5)
    assert torch.equal(again, results[5])
    out = torch.empty(130, dtype=F16, device=target.device)
    y = _gemv(layer, x[1], out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (130,)
    _assert_exact(y[None], layer, x[1:2], "vector")


def test_split_counters_return_to_zero_and_graph_arenas_keep_their_own(target):
    layer = exact_layer(1000, 130, 3, 0.02, DTYPE_SETS["fp16-model"], target.device)
    kernel = kernels.GemvKernels(
        layer.qweight, layer.lookup_table, 3, 1000, F16, layer.csr(), layer.bias
    )
    x = exact_x(2, 1000, F16, target.device)
    launch = kernel._launches[2]
    assert launch.plan.splits > 1 and launch.counters is not None
    _assert_exact(kernel(x), layer, x, "eager")
    assert int(launch.counters.abs().sum()) == 0
    # a graph being captured takes counters and partial sums of its own
    arena = kernels.CounterArena(target.device, size=64)
    launch.counters.fill_(7)  # the layer's own counters must not be touched
    with kernels.capture_scope(arena):
        _assert_exact(kernel(x), layer, x, "in a capture scope")
    assert arena.used == launch.plan.grid[0] and int(arena.counters.abs().sum()) == 0
    assert int(launch.counters.sum()) == 7 * launch.counters.numel()
    with pytest.raises(SqlabError, match="more than 1 split-K counters"):
        with kernels.capture_scope(kernels.CounterArena(target.device, size=1)):
            kernel(x)
    kernel.reset_counters()
    _assert_exact(kernel(x), layer, x, "after reset_counters")


def test_decoding_uses_the_weights_prefill_and_the_cpu_use(target):
    """An fp32 LUT with fp16 activations:
    decoding rounds each centroid to fp16 as the dequantization does.
    """
    gen = torch.Generator().manual_seed(0)
    lut = torch.randn(16, 8, generator=gen) / 3  # not representable in fp16
    idx = torch.randint(0, 8, (16, 64), generator=gen, dtype=torch.uint8)
    layer = SqueezeLinear.from_parts(packing.pack(idx, 3), lut, 64).to(target.device)
    eye = torch.eye(8, 64, dtype=F16, device=target.device)  # one-hot inputs read single weights
    y = _gemv(layer, eye)
    w_hat = kernels.dequantize_packed(layer.qweight, layer.lookup_table, 3, 64, dtype=F16)
    assert torch.equal(y.T.cpu(), w_hat[:, :8].cpu())
    assert torch.equal(w_hat.cpu(), layer.cpu().dequantize(F16))


def test_zero_size_layers(target):
    empty_out = SqueezeLinear(64, 0, 3).to(target.device)
    assert empty_out(torch.zeros(2, 64, dtype=F16, device=target.device)).shape == (2, 0)
    empty_in = SqueezeLinear(0, 5, 4, bias=True).to(target.device)
    with torch.no_grad():
        empty_in.bias.copy_(torch.arange(5.0))
    y = empty_in(torch.zeros(3, 0, dtype=F16, device=target.device))
    assert torch.equal(y.cpu(), torch.arange(5.0).half().expand(3, 5))


def test_out_aliasing_x_is_refused(target):
    layer = exact_layer(64, 64, 3, 0.0, DTYPE_SETS["fp16-model"], target.device)
    x = exact_x(1, 64, F16, target.device)
    with pytest.raises(SqlabError, match="out overlaps x"):
        _gemv(layer, x, out=x)


def test_bad_csr_is_refused_with_the_layer_name(target):
    layer = exact_layer(100, 37, 3, 0.05, DTYPE_SETS["fp16-model"], target.device)
    layer.name = "model.layers.3.mlp.up_proj"
    with torch.no_grad():
        layer.cols[0] = 100
    with pytest.raises(
        SqlabError, match=r"model.layers.3.mlp.up_proj: column index 100 out of range"
    ):
        layer(exact_x(1, 100, F16, target.device))


# --- the harness can fail -------------------------------------------------------------------------

STAGING_BARRIER = "padding inputs count as x = 0\n  }\n  __syncthreads();"
SPANNING_FIELD = "__funnelshift_r(q[w], q[w + 1], s - SH)"


@pytest.mark.parametrize("order", ["concurrent", "forward", "reverse"])
@pytest.mark.parametrize(
    "defect", ["no barrier after staging", "3-bit fields lose their high bits"]
)
def test_the_harness_catches_a_broken_kernel(order, defect, prebuilt):
    source = kernels._source("lut_gemv.cu")
    assert STAGING_BARRIER in source and SPANNING_FIELD in source  # the defects below still apply
    broken = (
        source.replace(STAGING_BARRIER, STAGING_BARRIER.replace("__syncthreads();", ""))
        if defect.startswith("no barrier")
        else source.replace(SPANNING_FIELD, "(q[w] >> (s - SH))")
    )
    cpu = torch.device("cpu")
    layer = exact_layer(1000, 130, 3, 0.0, DTYPE_SETS["fp16-model"], cpu)
    x = exact_x(1, 1000, F16, cpu)
    with kernels.use_backend(CudaOnCpu(order)):
        _assert_exact(_gemv(layer, x), layer, x, "the kernel as it is")
    with kernels.use_backend(CudaOnCpu(order, source_override={"lut_gemv.cu": broken})):
        y = _gemv(layer, x)
    assert not torch.equal(y, reference_y(layer, x).to(F16)), f"the harness missed: {defect}"


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("wbits", [3, 4])
def test_lut_gemv_in_deterministic_thread_orders(order, wbits, prebuilt):
    cpu = torch.device("cpu")
    layer = exact_layer(1000, 130, wbits, 0.03, DTYPE_SETS["fp16-x_fp32-vals"], cpu, skewed=True)
    with kernels.use_backend(CudaOnCpu(order)):
        for tokens in (1, 8):
            x = exact_x(tokens, 1000, F16, cpu)
            _assert_exact(_gemv(layer, x), layer, x, f"{order}, {tokens} tokens")


# --- sparse part on its own -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_features, out_features, density", [(100, 37, 0.05), (1000, 130, 0.0045), (64, 300, 0.0)]
)
@pytest.mark.parametrize("kinds", list(SPMV_KINDS))
@pytest.mark.parametrize("skewed", [False, True])
def test_spmv_rows_and_balanced_match_reference(
    target, in_features, out_features, density, kinds, skewed
):
    x_dtype, vals_dtype = SPMV_KINDS[kinds]
    layer = exact_layer(
        in_features,
        out_features,
        3,
        density,
        (x_dtype, F16, vals_dtype, None),
        target.device,
        skewed=skewed,
    )
    csr = layer.csr() or CSR(
        torch.zeros(out_features + 1, dtype=torch.int32, device=target.device),
        torch.zeros(0, dtype=torch.int32, device=target.device),
        torch.zeros(0, device=target.device),
    )
    _, s = reference_parts(layer, x_dtype)
    for tokens in (1, 3, 17):
        x = exact_x(tokens, in_features, x_dtype, target.device)
        start = (torch.randint(-8, 9, (tokens, out_features)) / 8).to(target.device)
        expected = start.double().cpu() + x.double().cpu() @ s.T
        out = kernels.spmv(csr.rows, csr.cols, csr.vals, x, start.clone())
        assert torch.equal(out.double().cpu(), expected), "row-parallel"
        for per_thread in (1, 5, 100000):
            startrows = balanced_startrows(csr.rows, per_thread)
            out = kernels.spmv(
                csr.rows, csr.cols, csr.vals, x, start.clone(), startrows, per_thread
            )
            assert torch.equal(out.double().cpu(), expected), f"balanced, {per_thread} per thread"


def test_spmv_refuses_startrows_that_do_not_match(target):
    layer = exact_layer(100, 37, 3, 0.05, DTYPE_SETS["fp16-model"], target.device)
    x = exact_x(1, 100, F16, target.device)
    startrows = balanced_startrows(layer.rows, 4).flip(0).contiguous()
    with pytest.raises(SqlabError, match="startrows do not match rows"):
        kernels.spmv(
            layer.rows,
            layer.cols,
            layer.vals,
            x,
            torch.zeros(1, 37, device=target.device),
            startrows,
            4,
        )


# --- dequantization for prompts -------------------------------------------------------------------


@pytest.mark.parametrize("in_features, out_features", [(100, 37), (48, 96), (1000, 130), (300, 33)])
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.05])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_dequantize_equals_the_cpu_reference_bit_for_bit(
    target, in_features, out_features, wbits, density, dtypes
):
    layer = random_layer(
        in_features, out_features, wbits, density, DTYPE_SETS[dtypes], target.device
    )
    dtype = DTYPE_SETS[dtypes][0]
    w = kernels.dequantize(layer, dtype)
    assert w.dtype == dtype and w.shape == (out_features, in_features)
    assert torch.equal(w.cpu(), copy.deepcopy(layer).cpu().dequantize(dtype))


# --- SqueezeLinear: prepared once, dispatched by token count --------------------------------------


def _count_launches(monkeypatch) -> dict[str, int]:
    """Counts of prepared LUT-GEMV calls (1-8 tokens) and of dequantizations,
    as ``SqueezeLinear`` makes them.
    """
    calls = {"gemv": 0, "dequantize": 0}
    call, dequantize = kernels.GemvKernels.__call__, kernels.dequantize_packed

    def spy_call(self, x, out=None):
        calls["gemv"] += 1 <= x.numel() // self.in_features <= kernels.MAX_GEMV_TOKENS
        return call(self, x, out)

    def spy_dequantize(*args, **kwargs):
        calls["dequantize"] += 1
        return dequantize(*args, **kwargs)

    monkeypatch.setattr(kernels.GemvKernels, "__call__", spy_call)
    monkeypatch.setattr(kernels, "dequantize_packed", spy_dequantize)
    return calls


@pytest.mark.parametrize("shape", [(1, 100), (2, 3, 100), (9, 100), (4, 7, 100), (100,)])
def test_squeeze_linear_dispatches_by_token_count(target, monkeypatch, shape):
    layer = exact_layer(100, 37, 3, 0.05, DTYPE_SETS["fp16-x_fp32-vals"], target.device)
    calls = _count_launches(monkeypatch)
    x = (
        torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(0))
        .half()
        .to(target.device)
    )
    y = layer(x)
    assert y.shape == (*shape[:-1], 37) and y.dtype == F16
    tokens = x.numel() // 100
    assert calls == ({"gemv": 1, "dequantize": 0} if tokens <= 8 else {"gemv": 0, "dequantize": 1})
    _assert_exact(y.reshape(-1, 37), layer, x.reshape(-1, 100))


def test_the_host_path_checks_once_per_layer(target, monkeypatch):
    layer = exact_layer(100, 37, 3, 0.05, DTYPE_SETS["fp16-model"], target.device)
    checks = []
    real = packing.check_csr
    monkeypatch.setattr(kernels, "check_csr", lambda *a, **k: (checks.append(1), real(*a, **k))[1])
    x = exact_x(1, 100, F16, target.device)
    for _ in range(5):
        _assert_exact(layer(x), layer, x)
    assert len(checks) == 1, "the CSR part is validated when the layer is prepared, not per call"
    layer.to(target.device, F32)  # cast: prepared again for the new dtype
    layer(x.float())
    assert len(checks) == 2
    layer2 = copy.deepcopy(layer)  # copies carry the buffers, not the prepared launches
    assert layer2.__dict__.get("_kernel") is None


def test_squeeze_linear_rejects_a_wrong_width(target):
    layer = exact_layer(100, 37, 3, 0.0, DTYPE_SETS["fp16-model"], target.device)
    layer(exact_x(1, 100, F16, target.device))
    with pytest.raises(SqlabError, match=r"the layer takes \(\.\.\., 100\)"):
        layer(exact_x(1, 99, F16, target.device))


# --- a quantized tiny model -----------------------------------------------------------------------


def _quantized_llama(wbits: int, hidden: int = 48, layers: int = 2):
    model = make_llama(hidden=hidden, layers=layers)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(model, ids, progress=False)
    quantize_model(
        model,
        QuantConfig(wbits=wbits, outlier_pct=0.45, sensitive_pct=0.05),
        fisher,
        progress=False,
    )
    assert any(m.nnz for m in model.modules() if isinstance(m, SqueezeLinear))
    return model


def _simulated_twin(model):
    """The same model with every SqueezeLinear replaced by an nn.Linear holding its W_hat."""
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, SqueezeLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data = layer.dequantize(torch.float32)
            if layer.bias is not None:
                linear.bias.data = layer.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


@torch.no_grad()
def _steps(model, prompt: torch.Tensor, feed: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prompt (one forward) and of each token of ``feed``
    (one token a step, cached).
    """
    out = model(prompt, use_cache=True)
    logits, cache = [out.logits.float().cpu()], out.past_key_values
    for t in range(feed.shape[1]):
        out = model(feed[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits.float().cpu())
        cache = out.past_key_values
    return logits


@pytest.mark.parametrize("wbits", [3, 4])
def test_quantized_model_in_fp16_follows_the_fp32_reference(target, monkeypatch, wbits):
    model = _quantized_llama(wbits)
    gen = torch.Generator().manual_seed(1)
    prompt, feed = (
        torch.randint(0, 320, (1, 12), generator=gen),
        torch.randint(0, 320, (1, 4), generator=gen),
    )
    reference = _steps(_simulated_twin(model), prompt, feed)  # fp32 on the CPU
    calls = _count_launches(monkeypatch)
    fp16 = copy.deepcopy(model).to(target.device, F16)
    got = _steps(fp16, prompt.to(target.device), feed.to(target.device))
    layers = sum(isinstance(m, SqueezeLinear) for m in model.modules())
    # the prompt dequantizes every layer once; each decoding step launches one GEMV per layer
    assert calls == {"gemv": layers * feed.shape[1], "dequantize": layers}
    for step, (a, b) in enumerate(zip(got, reference)):
        torch.testing.assert_close(
            a,
            b,
            rtol=2e-2,
            atol=2e-2 * b.abs().max().item(),
            msg=lambda m, s=step: f"step {s}: {m}",
        )


@pytest.mark.parametrize("wbits", [3, 4])
def test_generate_equals_the_simulated_twin(target, wbits):
    model = _quantized_llama(wbits, hidden=64)
    twin = _simulated_twin(model).to(target.device)
    model.to(target.device)
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3)).to(
        target.device
    )
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=2,
    )
    packed_tokens = model.generate(prompt, **kwargs)
    assert any(
        m.__dict__.get("_kernel") is not None
        for m in model.modules()
        if isinstance(m, SqueezeLinear)
    )
    assert packed_tokens.shape == (1, 24)
    assert torch.equal(packed_tokens, twin.generate(prompt, **kwargs))


def test_the_harness_runs_bf16_and_fp32_models(target):
    """A smoke run of the other model dtypes through the layer path (every kind of x)."""
    for dtype in (BF16, F32):
        layer = exact_layer(100, 37, 3, 0.05, (dtype, F16, F32, F32), target.device)
        x = exact_x(2, 100, dtype, target.device)
        _assert_exact(layer(x), layer, x, str(dtype))


def test_static_decoding_of_a_quantized_model_with_graph_counters(target):
    """The decoding step a CUDA graph captures,
    with every split launch on the graph's own counters.
    """
    from sqlab.evaluate import StaticDecoder

    model = _quantized_llama(3, hidden=320, layers=1).to(target.device)  # wide enough to split K
    ids = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(4)).to(
        target.device
    )
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=2,
    )[0, 9:].cpu()
    decoder = StaticDecoder(model, ids, 8)
    if target.device.type == "cuda":
        decoder.capture(warmup=2)
        for _ in range(5):
            decoder.step()
        torch.cuda.synchronize()
    else:  # no capture on the CPU: every step runs as it would be captured
        arena = kernels.CounterArena(target.device)
        with kernels.capture_scope(arena):
            for _ in range(7):
                decoder.step()
        assert arena.used > 0 and int(arena.counters.abs().sum()) == 0
    assert torch.equal(decoder.tokens, expected)
