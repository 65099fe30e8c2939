"""The CPU LUT-GEMV: the packed weights decoded on the fly, checked against float64 references.

With the values of ``tests.kernel_cases.exact_layer`` every sum is exact in fp32, so the
kernel must match the reference bit for bit; random values are checked within fp32
rounding. Both the vectorised build (AVX-512 VBMI where the CPU has it) and the portable
one (compiled without -march=native) are checked.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlab import SqlabError, SqueezeLinear, cpu_kernels, kmeans
from sqlab.packing import pack
from tests.kernel_cases import (
    DTYPE_SETS,
    exact_layer,
    exact_x,
    gemv_tolerance,
    random_layer,
    reference_y,
)

CPU = torch.device("cpu")
FP32 = DTYPE_SETS[
    "fp32-model"
]  # a quantized model as it runs on the CPU: fp16 LUT, fp32 values and bias
PORTABLE = tuple(
    f for f in cpu_kernels.FLAGS if f != "-march=native"
)  # no AVX-512: the loop in plain C++

needs_compiler = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C++ compiler")
pytestmark = needs_compiler


def _kernel(
    layer: SqueezeLinear, dtype=torch.float32, flags=cpu_kernels.FLAGS
) -> cpu_kernels.CpuGemv:
    return cpu_kernels.CpuGemv(
        layer.qweight,
        layer.lookup_table,
        layer.wbits,
        layer.in_features,
        dtype,
        layer.csr(),
        layer.bias,
        flags=flags,
    )


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 300),
    out_features=st.integers(1, 70),
    wbits=st.sampled_from([3, 4]),
    density=st.sampled_from([0.0, 0.01, 0.2]),
    tokens=st.integers(1, 8),
    skewed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_equals_the_reference_exactly(
    in_features, out_features, wbits, density, tokens, skewed, seed
):
    """Random shapes (odd widths, rows that are not a multiple of 16), empty and crowded CSR rows,
    repeated positions, 1-8 tokens."""
    layer = exact_layer(
        in_features, out_features, wbits, density, FP32, CPU, seed=seed, skewed=skewed
    )
    x = exact_x(tokens, in_features, torch.float32, CPU, seed=seed + 1)
    y = _kernel(layer)(x)
    assert y.shape == (tokens, out_features) and y.dtype == torch.float32
    assert torch.equal(y.double(), reference_y(layer, x))


@pytest.mark.parametrize(
    "in_features, out_features", [(100, 37), (576, 1536), (1000, 130), (64, 48)]
)
@pytest.mark.parametrize("wbits", [3, 4])
def test_the_portable_build_agrees(in_features, out_features, wbits):
    assert cpu_kernels.library(PORTABLE).sq_vectorized() == 0
    layer = exact_layer(in_features, out_features, wbits, 0.03, FP32, CPU, skewed=True)
    kernel = _kernel(layer, flags=PORTABLE)
    for tokens in (1, 3, 8, 12):
        x = exact_x(tokens, in_features, torch.float32, CPU, seed=tokens)
        assert torch.equal(kernel(x).double(), reference_y(layer, x)), f"{tokens} tokens"


@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("tokens", [1, 8])
def test_random_values_within_fp32_rounding(wbits, tokens):
    layer = random_layer(1000, 130, wbits, 0.01, FP32, CPU)
    x = torch.randn(tokens, 1000, generator=torch.Generator().manual_seed(tokens))
    ref, bound = gemv_tolerance(layer, x)
    assert ((_kernel(layer)(x).double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [9, 40])
@pytest.mark.parametrize("wbits", [3, 4])
def test_prompts_dequantize_block_by_block(monkeypatch, tokens, wbits):
    monkeypatch.setattr(
        cpu_kernels, "PREFILL_BLOCK", 64 * 300
    )  # several blocks of rows, the last one short
    layer = exact_layer(300, 150, wbits, 0.03, FP32, CPU)
    kernel = _kernel(layer)
    x = exact_x(tokens, 300, torch.float32, CPU).reshape(1, tokens, 300)
    y = kernel(x)
    assert y.shape == (1, tokens, 150)
    assert torch.equal(y[0].double(), reference_y(layer, x[0]))
    assert torch.equal(kernel.dequantize(), layer.dequantize(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations(dtype):
    layer = exact_layer(200, 40, 3, 0.03, (dtype, torch.float16, torch.float32, torch.float32), CPU)
    x = exact_x(2, 200, dtype, CPU)
    y = _kernel(layer, dtype)(x)
    assert y.dtype == dtype and torch.equal(y, reference_y(layer, x).to(dtype))


def test_squeeze_linear_uses_it_and_keeps_no_dense_copy():
    layer = exact_layer(576, 1536, 3, 0.005, FP32, CPU)
    x = exact_x(1, 576, torch.float32, CPU)
    y = layer(x[None])
    assert isinstance(layer.__dict__["_kernel"], cpu_kernels.CpuGemv)
    assert layer.__dict__.get("_dense_cache") is None
    assert torch.equal(y[0].double(), reference_y(layer, x))
    kernel = layer.__dict__["_kernel"]
    extra = sum(t.numel() * t.element_size() for t in (kernel.table, kernel.vals) if t is not None)
    assert (
        extra < 0.05 * 576 * 1536 * 4
    )  # the fp32 tables and values: a few percent of the fp32 weight
    assert copy.deepcopy(layer).__dict__.get("_kernel") is None  # copies carry buffers, not kernels


def test_bad_sparse_part_is_refused_with_the_layer_name():
    layer = exact_layer(100, 37, 4, 0.05, FP32, CPU)
    layer.name = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        layer.rows[5] = 10**6
    with pytest.raises(SqlabError, match="model.layers.1.self_attn.v_proj: rows must rise"):
        layer(exact_x(1, 100, torch.float32, CPU))


def test_without_a_compiler_it_says_so_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: None)
    cpu_kernels.library.cache_clear()
    cpu_kernels.warn_unavailable.cache_clear()
    try:
        assert "no C++ compiler found" in cpu_kernels.unavailable_reason()
        layer = exact_layer(100, 37, 3, 0.05, FP32, CPU)
        x = exact_x(2, 100, torch.float32, CPU)
        with caplog.at_level(logging.WARNING, logger="sqlab.cpu_kernels"):
            y = layer(x)
            layer(x)
        assert torch.equal(y.double(), reference_y(layer, x))
        warnings = [r for r in caplog.records if "CPU LUT-GEMV is not available" in r.getMessage()]
        assert len(warnings) == 1 and "apt-get install g++" in warnings[0].getMessage()
    finally:
        cpu_kernels.library.cache_clear()
        cpu_kernels.warn_unavailable.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SQLAB_CPU_KERNEL", "0")
    layer = exact_layer(100, 37, 3, 0.0, FP32, CPU)
    layer(exact_x(1, 100, torch.float32, CPU))
    assert layer.__dict__.get("_kernel") is None and layer.__dict__.get("_dense_cache") is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_its_threads_are_torchs():
    """One OpenMP runtime in a process that loads torch and both compiled programs: their
    parallel loops use torch's thread pool. In a process of its own, as a user's would be:
    this one may hold other packages' runtimes (scikit-learn ships its own)."""
    script = """
from sqlab import cpu_kernels
cpu_kernels.library()
cpu_kernels.library(source_name=cpu_kernels.KMEANS_SOURCE)
with open("/proc/self/maps") as maps:
    paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
print(len(paths), sorted(paths))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "1", done.stdout


def test_zero_sized_layers():
    empty = SqueezeLinear(64, 0, 3)
    assert empty(torch.zeros(2, 64)).shape == (2, 0)
    layer = SqueezeLinear.from_parts(
        pack(torch.zeros(5, 0, dtype=torch.uint8), 4),
        torch.zeros(5, 16).half(),
        0,
        None,
        torch.arange(5.0),
    )
    assert torch.equal(layer(torch.zeros(3, 0)), torch.arange(5.0).expand(3, 5))


def test_a_quantized_tiny_model_decodes_as_its_simulated_twin():
    from tests.test_kernels_run import _quantized_llama, _simulated_twin

    model = _quantized_llama(3, hidden=64)
    twin = _simulated_twin(model)
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=2,
    )
    assert torch.equal(model.generate(prompt, **kwargs), twin.generate(prompt, **kwargs))
    assert all(
        isinstance(m.__dict__.get("_kernel"), cpu_kernels.CpuGemv)
        for m in model.modules()
        if isinstance(m, SqueezeLinear)
    )


def test_cpu_decode_benchmark_writes_its_json(tmp_path):
    """The GEMV half of benchmarks/cpu_decode.py on a small shape
    (the decoding half needs minutes).
    """
    import json
    import subprocess
    from pathlib import Path

    out = tmp_path / "cpu_decode.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_decode.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--shapes",
            "256x320",
            "--repeat",
            "2",
            "--skip-decode",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {r["format"] for r in result["gemv"]} == {"fp32", "bf16", "w4", "w3", "w3s"}
    for row in result["gemv"]:
        assert row["shape"] == [256, 320] and row["us_median"] > 0 and row["gbs"] > 0
    assert result["copy_gbs"] > 0 and "vs bf16" in done.stdout


def test_a_failed_build_is_tried_once_by_paths_that_ask_on_every_call(monkeypatch):
    attempts = []

    def broken(flags=cpu_kernels.FLAGS, source_name=cpu_kernels.SOURCE):
        attempts.append(source_name)
        raise SqlabError("g++ could not compile it")

    cpu_kernels._built.cache_clear()
    monkeypatch.setattr(cpu_kernels, "library", broken)
    try:
        assert not cpu_kernels.ready(cpu_kernels.KMEANS_SOURCE)
        assert not cpu_kernels.ready(cpu_kernels.KMEANS_SOURCE)
        assert attempts == [cpu_kernels.KMEANS_SOURCE]
        x, centroids = torch.randn(3, 10), torch.sort(torch.randn(3, 4), 1).values
        assert kmeans.assign(x, centroids).shape == (3, 10)  # the torch passes instead
    finally:
        cpu_kernels._built.cache_clear()
