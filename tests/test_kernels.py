"""The CUDA kernels: compiled by nvcc everywhere, checked against the CPU reference on a GPU.

Three layers of tests:

- compilation (needs only ``nvcc``): every ``kernels/*.cu`` for sm_80 and sm_90, 3 and 4
  bits, with the compile-time kinds that ``sqlab.kernels`` passes; the inlined source
  that CuPy hands to NVRTC; and ptxas' static shared memory against ``gemv_plan``'s
  budget. Where an NVRTC library is installed, the inlined source also goes through NVRTC
  itself (it is stricter than nvcc about host code).
- the pure-Python parts (CPU): launch plans, argument checks, the CPU fallback.
- ``gpu``: every kernel against the CPU reference, and a quantized tiny LLaMA on the GPU.
"""

from __future__ import annotations

import concurrent.futures
import copy
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sqlab import QuantConfig, SqlabError, SqueezeLinear, fisher_information, kernels, quantize_model
from sqlab.packing import CSR, balanced_startrows, csr_row_indices, pack, to_csr
from tests.conftest import make_llama

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
ARCHS = ("sm_80", "sm_90")
KERNEL_FILES = sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu"))

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
# (x, LUT, sparse values, bias) dtypes as SqueezeLinear meets them: the quantizer's layers
# (fp16 LUT, fp32 sparse values and bias) run in fp16; an fp32 run with an fp32 LUT and
# fp16 values; an all-bf16 model. Between them every kind (numeric.cuh) appears for x,
# the LUT and the sparse values, and both TUPLE settings (3-bit pairs with 16-bit LUTs,
# singles otherwise).
DTYPE_SETS = {
    "fp16-x_fp16-lut_fp32-vals": (F16, F16, F32, F32),
    "fp32-x_fp32-lut_fp16-vals": (F32, F32, F16, None),
    "bf16-all": (BF16, BF16, BF16, BF16),
}
SPMV_KINDS = {"fp16-x_fp32-vals": (F16, F32), "fp32-all": (F32, F32), "bf16-x_fp16-vals": (BF16, F16)}


def _defines(wbits: int, dtypes: tuple) -> tuple:
    """The -D constants sqlab.kernels compiles lut_gemv.cu with for these dtypes."""
    x, lut, vals, bias = dtypes
    csr = CSR(torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=vals))
    return kernels._gemv_defines(wbits, x, torch.zeros(1, 1 << wbits, dtype=lut), csr,
                                 None if bias is None else torch.zeros(1, dtype=bias))


def _spmv_defines(x: torch.dtype, vals: torch.dtype) -> tuple:
    return (("X_KIND", kernels._KIND[x]), ("VAL_KIND", kernels._KIND[vals]))


# --- compilation with nvcc -------------------------------------------------------------------

def _jobs() -> dict[str, tuple]:
    """Every compile of the matrix: id -> (file or inlined source, arch, defines, -I kernels?)."""
    jobs = {}
    for arch in ARCHS:
        for wbits in (3, 4):
            for name, dtypes in DTYPE_SETS.items():
                jobs[f"lut_gemv.cu-{arch}-w{wbits}-{name}"] = ("lut_gemv.cu", arch, _defines(wbits, dtypes), True)
        for name, (x, vals) in SPMV_KINDS.items():
            jobs[f"spmv.cu-{arch}-{name}"] = ("spmv.cu", arch, _spmv_defines(x, vals), True)
        for file in KERNEL_FILES:
            if file not in ("lut_gemv.cu", "spmv.cu"):  # a new source: compile it with its defaults
                jobs[f"{file}-{arch}-defaults"] = (file, arch, (), True)
    # what NVRTC sees: the source with numeric.cuh inlined, no include path, the same options
    for wbits in (3, 4):
        jobs[f"inlined-lut_gemv.cu-sm_90-w{wbits}"] = ("lut_gemv.cu", "sm_90", _defines(wbits, DTYPE_SETS[
            "fp16-x_fp16-lut_fp32-vals"]), False)
    jobs["inlined-spmv.cu-sm_90"] = ("spmv.cu", "sm_90", _spmv_defines(F16, F32), False)
    return jobs


JOBS = _jobs()


def _compile(job: tuple, workdir: Path) -> subprocess.CompletedProcess:
    file, arch, defines, from_disk = job
    tag = re.sub(r"\W", "_", f"{file}-{arch}-{defines}-{from_disk}")
    if from_disk:
        source, include = kernels.KERNEL_DIR / file, ["-I", str(kernels.KERNEL_DIR)]
    else:
        source, include = workdir / f"{tag}.cu", []
        source.write_text(kernels._source(file))
    cmd = [NVCC, f"-arch={arch}", "-cubin", "--resource-usage", *include, *kernels._options(defines),
           "-o", str(workdir / f"{tag}.cubin"), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    """All compiles of the matrix, run in parallel once (about 20 s on 2 cores)."""
    workdir = tmp_path_factory.mktemp("nvcc")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {key: pool.submit(_compile, job, workdir) for key, job in JOBS.items()}
        return {key: f.result() for key, f in futures.items()}


def _static_smem(log: str) -> dict[str, int]:
    """Static shared memory of each kernel, from ptxas' --resource-usage report."""
    usage, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used \d+ registers.*?(?:(\d+) bytes smem|$)", line)
        if m and current:
            usage[current] = int(m.group(1) or 0)
            current = None
    return usage


@needs_nvcc
@pytest.mark.parametrize("key", list(JOBS))
def test_kernel_compiles(nvcc_builds, key):
    result = nvcc_builds[key]
    assert result.returncode == 0, f"{key} failed to compile:\n{result.stderr[-4000:]}"
    file = JOBS[key][0]
    smem = _static_smem(result.stdout + result.stderr)
    if file == "lut_gemv.cu":
        assert {f"lut_gemv_{b}" for b in range(1, 9)} | {"dequantize_dense", "dequantize_sparse"} <= set(smem)
    if file == "spmv.cu":
        assert {"spmv_rows", "spmv_balanced"} <= set(smem)


@needs_nvcc
@pytest.mark.parametrize("key", [k for k in JOBS if JOBS[k][0] == "lut_gemv.cu"])
def test_static_shared_memory_is_what_the_plan_budgets(nvcc_builds, key):
    """gemv_plan keeps static + dynamic shared memory within 48 KiB only if it knows the static part."""
    result = nvcc_builds[key]
    assert result.returncode == 0, result.stderr[-2000:]
    defines = dict(JOBS[key][2])
    wbits = defines["WBITS"]
    lut_dtype = {v: k for k, v in kernels._KIND.items()}[defines["LUT_KIND"]]
    smem = _static_smem(result.stdout + result.stderr)
    for tokens in range(1, 9):
        # the largest slices: LLaMA-7B's down_proj on few SMs, sparse part on
        plan = kernels.gemv_plan(11008, 4096, wbits, tokens, lut_dtype, True, sm_count=1)
        assert smem[f"lut_gemv_{tokens}"] <= plan.static_shared
        assert plan.static_shared + plan.shared <= kernels.SHARED_LIMIT


@needs_nvcc
@pytest.mark.parametrize("wbits", [5, 2])
def test_unsupported_bit_width_does_not_compile(tmp_path, wbits):
    result = _compile(("lut_gemv.cu", "sm_80", (("WBITS", wbits),), True), tmp_path)
    assert result.returncode != 0 and "WBITS must be 3 or 4" in result.stderr


def test_inlined_source_has_no_includes_left():
    for file in KERNEL_FILES:
        source = kernels._source(file)
        assert "#include" not in source
        assert "struct Num" in source  # numeric.cuh is in it
        assert source.count("#define SQLAB_NUMERIC_CUH") == 1


def test_missing_kernel_directory_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "KERNEL_DIR", tmp_path)
    kernels._source.cache_clear()
    try:
        with pytest.raises(SqlabError, match="SQLAB_KERNEL_DIR"):
            kernels._source("lut_gemv.cu")
    finally:
        kernels._source.cache_clear()


def _nvrtc_library():
    """An NVRTC shared library if one is installed (system CUDA or the pip wheel), else None."""
    candidates = []
    for entry in sys.path:
        candidates += sorted(Path(entry).glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*")) if entry else []
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in str(path) or ".alt." in str(path):
            continue
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


@pytest.mark.parametrize("file, defines", [
    *[("lut_gemv.cu", _defines(w, d)) for w in (3, 4) for d in DTYPE_SETS.values()],
    *[("spmv.cu", _spmv_defines(x, v)) for x, v in SPMV_KINDS.values()],
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{n}" for k, n in v))
def test_nvrtc_compiles_the_inlined_source(file, defines):
    """What CuPy does at run time, done here where an NVRTC library exists (no GPU needed)."""
    lib = _nvrtc_library()
    if lib is None:
        pytest.skip("no NVRTC library installed")
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), kernels._source(file).encode(), file.encode(), 0, None,
                                  None) == 0
    options = [*kernels._options(defines), "-arch=compute_80"]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(
        *[o.encode() for o in options]))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode(errors="replace")


# --- pure Python: launch plans ---------------------------------------------------------------

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824), (13824, 5120)]
ODD_SHAPES = [(100, 37), (48, 96), (33, 1), (1, 1), (32, 64), (65, 4097), (70000, 3)]


@pytest.mark.parametrize("in_features, out_features", LLAMA_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("lut_dtype", [F16, F32, BF16])
def test_gemv_plan_fits_shared_memory_and_covers_all_groups(in_features, out_features, wbits, lut_dtype):
    groups = -(-in_features // 32)
    for tokens in range(1, 9):
        for sparse in (False, True):
            for sm_count in (1, 108, 132):
                plan = kernels.gemv_plan(in_features, out_features, wbits, tokens, lut_dtype, sparse, sm_count)
                entries = 1 << (wbits * kernels._tuple(wbits, lut_dtype))
                assert plan.static_shared == entries * kernels.BN * 4 + kernels.STATIC_EXTRA
                assert plan.static_shared + plan.shared <= 48 * 1024
                assert plan.block == (kernels.BN, kernels.KY + sparse)
                assert plan.shared == (plan.groups_per_block * 32 * tokens * 4
                                       + plan.block[1] * tokens * kernels.BN * 4)
                cols, splits = plan.grid
                assert (cols - 1) * kernels.BN < out_features <= cols * kernels.BN
                # the slices cover every group and none is empty
                assert (splits - 1) * plan.groups_per_block < groups <= splits * plan.groups_per_block
                assert plan.splits == splits >= 1


def test_gemv_plan_fills_a_large_gpu_for_llama_shapes():
    for in_features, out_features in LLAMA_SHAPES:
        plan = kernels.gemv_plan(in_features, out_features, 3, 1, F16, False, sm_count=132)
        assert plan.grid[0] * plan.grid[1] >= 132  # every SM has a block
        assert plan.groups_per_block >= kernels.MIN_GROUPS_PER_BLOCK or plan.splits == 1


def test_gemv_plan_splits_override_and_errors():
    assert kernels.gemv_plan(4096, 4096, 3, 1, F16, False, 132, splits=1).splits == 1
    assert kernels.gemv_plan(4096, 4096, 3, 1, F16, False, 132, splits=4).splits == 4
    assert kernels.gemv_plan(100, 37, 4, 1, F16, False, 132, splits=1000).splits == 4  # one group per slice
    # 8 tokens of 11008 inputs cannot stay in one slice: shared memory splits it anyway
    assert kernels.gemv_plan(11008, 4096, 3, 8, F16, True, 132, splits=1).splits > 1
    for tokens in (0, 9):
        with pytest.raises(SqlabError, match=f"1 to 8 tokens, got {tokens}"):
            kernels.gemv_plan(64, 64, 3, tokens, F16, False, 1)
    with pytest.raises(SqlabError, match="splits must be a positive integer, got 0"):
        kernels.gemv_plan(64, 64, 3, 1, F16, False, 1, splits=0)


def test_gemv_defines_follow_the_dtypes():
    d = dict(_defines(3, (F16, F16, F32, F32)))
    assert d == {"WBITS": 3, "X_KIND": 1, "LUT_KIND": 1, "VAL_KIND": 0, "BIAS_KIND": 0, "BN": kernels.BN,
                 "KY": kernels.KY, "TUPLE": 2}
    assert dict(_defines(3, (F32, F32, F16, None)))["TUPLE"] == 1  # fp32 LUT: no pairs
    assert dict(_defines(4, (F16, F16, F32, F32)))["TUPLE"] == 1  # 4-bit pairs would not fit
    absent = dict(kernels._gemv_defines(4, BF16, torch.zeros(1, 16, dtype=F16), None, None))
    assert absent["VAL_KIND"] == absent["BIAS_KIND"] == absent["X_KIND"] == 2  # absent parts take x's kind


def test_use_gemv_boundary():
    assert [kernels.use_gemv(t) for t in (0, 1, 8, 9)] == [False, True, True, False]


# --- pure Python: argument checks (run before anything needs CUDA) -----------------------------

def _cpu_parts(in_features=100, out_features=37, wbits=3, nnz=5):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 1 << wbits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    lut = torch.randn(out_features, 1 << wbits, generator=gen).half()
    r = torch.randint(0, out_features, (nnz,), generator=gen)
    c = torch.randint(0, in_features, (nnz,), generator=gen)
    csr = to_csr(r, c, torch.randn(nnz, generator=gen), out_features)
    x = torch.randn(2, in_features, generator=gen).half()
    return pack(idx, wbits), lut, csr, x


@pytest.mark.parametrize("change, message", [
    (dict(wbits=5), "wbits must be 3 or 4, got 5"),
    (dict(qweight=lambda q: q.long()), "qweight has dtype int64; accepted: int32"),
    (dict(qweight=lambda q: q[:-1]), r"qweight has shape \(11, 37\); 3-bit packing of 100 inputs needs \(12, out"),
    (dict(lut=lambda t: t[:, :4]), r"lut has shape \(37, 4\), expected \(37, 8\)"),
    (dict(lut=lambda t: t.double()), "lut has dtype float64"),
    (dict(x=lambda t: t[:, :99]), r"x has shape \(2, 99\); expected \(100,\) or \(tokens, 100\)"),
    (dict(x=lambda t: t.double()), "x has dtype float64; accepted: float32, float16, bfloat16"),
    (dict(x=lambda t: t.repeat(5, 1)), "lut_gemv takes 1 to 8 tokens, got 10"),
    (dict(x=lambda t: torch.zeros(0, 100, dtype=F16)), "1 to 8 tokens, got 0"),
    (dict(bias=torch.zeros(36)), r"bias has shape \(36,\), expected \(37,\)"),
    (dict(out=torch.zeros(2, 37)), "out has dtype float32; accepted: float16"),
    (dict(csr=lambda c: CSR(c.rows[:-1], c.cols, c.vals)), r"rows has shape \(37,\), expected \(38,\)"),
    (dict(csr=lambda c: CSR(c.rows, c.cols.long(), c.vals)), "cols has dtype int64"),
    (dict(csr=lambda c: CSR(c.rows, c.cols, c.vals[:-1])), r"vals has shape \(4,\), expected \(5,\)"),
    (dict(), "qweight is on cpu; the kernels need CUDA tensors"),
])
def test_lut_gemv_rejects_bad_input_before_needing_cuda(change, message):
    qweight, lut, csr, x = _cpu_parts()
    args = dict(qweight=qweight, lut=lut, x=x, csr=csr, wbits=3, bias=None, out=None)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.lut_gemv(args["qweight"], args["lut"], args["x"], args["wbits"], 100, args["out"], csr=args["csr"],
                         bias=args["bias"])


def test_lut_gemv_rejects_non_contiguous_x():
    qweight, lut, _, _ = _cpu_parts()
    x = torch.zeros(100, 2, dtype=F16).T
    with pytest.raises(SqlabError, match="x must be contiguous"):
        kernels.lut_gemv(qweight, lut, x, 3, 100)


@pytest.mark.parametrize("change, message", [
    (dict(rows=lambda t: t.long()), "rows has dtype int64; accepted: int32"),
    (dict(rows=lambda t: t[None]), r"rows must be the \(out_features \+ 1,\) row pointers"),
    (dict(vals=lambda t: t.double()), "vals has dtype float64"),
    (dict(x=lambda t: t[None]), r"x must be \(in_features,\) or \(tokens, in_features\)"),
    (dict(out=lambda t: t.half()), "out has dtype float16; accepted: float32"),
    (dict(out=lambda t: t[:, :-1]), r"out has shape \(2, 36\), expected \(2, 37\)"),
    (dict(startrows=torch.zeros(5, dtype=torch.int32)), "needs the nnz_per_thread its startrows were made with"),
    (dict(startrows=torch.zeros(4, dtype=torch.int32), nnz_per_thread=1),
     r"startrows has shape \(4,\), expected \(5,\)"),
    (dict(), "rows is on cpu; the kernels need CUDA tensors"),
])
def test_spmv_rejects_bad_input_before_needing_cuda(change, message):
    _, _, csr, x = _cpu_parts()
    args = dict(rows=csr.rows, cols=csr.cols, vals=csr.vals, x=x, out=torch.zeros(2, 37), startrows=None,
                nnz_per_thread=None)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.spmv(**args)


@pytest.mark.parametrize("change, message", [
    (dict(wbits=5), "wbits must be 3 or 4, got 5"),
    (dict(dtype=torch.float64), "dtype must be float32, float16 or bfloat16, got torch.float64"),
    (dict(in_features=64), r"3-bit packing of 64 inputs needs \(6, out_features\)"),
    (dict(lut=lambda t: t[:-1]), r"lut has shape \(36, 8\), expected \(37, 8\)"),
    (dict(), "qweight is on cpu; the kernels need CUDA tensors"),
])
def test_dequantize_packed_rejects_bad_input_before_needing_cuda(change, message):
    qweight, lut, csr, _ = _cpu_parts()
    args = dict(qweight=qweight, lut=lut, wbits=3, in_features=100, csr=csr, dtype=F16)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.dequantize_packed(**args)


def test_squeeze_linear_forward_rejects_wrong_width():
    qweight, lut, csr, _ = _cpu_parts()
    layer = SqueezeLinear.from_parts(qweight, lut, 100, csr)
    with pytest.raises(SqlabError, match=r"the layer takes \(\.\.\., 100\)"):
        kernels.squeeze_linear_forward(layer, torch.zeros(3, 99))


# --- pure Python: without a GPU ----------------------------------------------------------------

def test_kernels_are_unavailable_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert kernels.available() is False
    assert "CUDA GPU" in kernels.unavailable_reason()


def test_benchmarks_say_why_nothing_was_measured_without_the_kernels():
    if kernels.available():
        pytest.skip("the kernels can run here")
    for script in ("kernels.py", "generate.py"):
        done = subprocess.run([sys.executable, str(kernels.KERNEL_DIR.parent / "benchmarks" / script)], capture_output=True, text=True)
        assert done.returncode == 2 and kernels.unavailable_reason() in done.stderr
        assert "Nothing was measured" in done.stderr


def test_importing_sqlab_does_not_import_cupy():
    code = ("import sys, torch, sqlab\n"
            "from sqlab import SqueezeLinear\n"
            "layer = SqueezeLinear(64, 8, 3)\n"
            "layer(torch.zeros(2, 64))\n"
            "assert 'cupy' not in sys.modules, 'cupy imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cpu_forward_uses_the_reference_even_if_kernels_claim_to_be_available(monkeypatch):
    qweight, lut, csr, x = _cpu_parts()
    bias = torch.randn(37)
    layer = SqueezeLinear.from_parts(qweight, lut, 100, csr, bias)

    def no_kernels(*args, **kwargs):
        raise AssertionError("the CPU path launched a kernel")

    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "squeeze_linear_forward", no_kernels)
    x = x.float()
    expected = x.double() @ layer.dequantize(torch.float64).T + bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# --- GPU: every kernel against the reference -------------------------------------------------------

def gpu_test(fn):
    """Marked ``gpu`` (conftest skips it without CUDA) and skipped where CuPy is missing."""
    needs_cupy = pytest.mark.skipif(torch.cuda.is_available() and not kernels.available(),
                                    reason="the kernels need CuPy (pip install 'sqlab[gpu]')")
    return pytest.mark.gpu(needs_cupy(fn))


CUDA = torch.device("cuda")


def _random_layer(in_features, out_features, wbits, density, lut_dtype=F16, vals_dtype=F32, bias_dtype=None,
                  device=CUDA, seed=0, skewed=False):
    """A SqueezeLinear of random indices, LUTs and sparse part, built on ``device``.

    The sparse part holds repeated positions (adjacent in CSR, as the packer stores exact
    corrections) and, with ``skewed``, a row holding a large share of all values.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randint(0, 1 << wbits, (out_features, in_features), generator=gen, device=device,
                        dtype=torch.uint8)
    lut = torch.randn(out_features, 1 << wbits, generator=gen, device=device).to(lut_dtype)
    csr = None
    nnz = round(density * in_features * out_features)
    if nnz:
        r = torch.randint(0, out_features, (nnz,), generator=gen, device=device)
        c = torch.randint(0, in_features, (nnz,), generator=gen, device=device)
        if skewed:
            r[: nnz // 3] = out_features // 2
        dup = max(1, nnz // 10)  # every tenth position twice, like a two-term correction
        r, c = torch.cat([r, r[:dup]]), torch.cat([c, c[:dup]])
        vals = torch.randn(r.numel(), generator=gen, device=device).to(vals_dtype)
        csr = to_csr(r, c, vals, out_features)
    bias = None if bias_dtype is None else torch.randn(out_features, generator=gen, device=device).to(bias_dtype)
    return SqueezeLinear.from_parts(pack(idx, wbits), lut, in_features, csr, bias)


def _dense_parts(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The LUT part and the sparse part of W_hat, float64, as the fused kernel sums them (separately)."""
    w = layer.lookup_table.double().gather(1, layer.indices().long())
    s = torch.zeros_like(w)
    if layer.nnz:
        s.index_put_((csr_row_indices(layer.rows).long(), layer.cols.long()), layer.vals.double(), accumulate=True)
    return w, s


EPS = {F16: 2**-10, BF16: 2**-7, F32: 2**-22}


def _assert_gemv_close(y, x, w, bias, what=""):
    """``y`` against ``x @ w.T + bias`` in float64: fp32 accumulation plus one rounding to y's dtype."""
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    bound = EPS[y.dtype] * ref.abs() + 3e-5 * scale + 1e-30
    ratio = ((y.double() - ref).abs() / bound).max().item()
    assert ratio <= 1, f"{what}: error {ratio:.2f}x the tolerance"


SMALL_SHAPES = [(100, 37), (48, 96), (33, 1), (64, 64), (1000, 130)]


@pytest.mark.parametrize("in_features, out_features", SMALL_SHAPES)
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=list(DTYPE_SETS))
@gpu_test
def test_lut_gemv_matches_reference_small(in_features, out_features, wbits, density, dtypes):
    x_dtype, lut_dtype, vals_dtype, bias_dtype = DTYPE_SETS[dtypes]
    layer = _random_layer(in_features, out_features, wbits, density, lut_dtype, vals_dtype, bias_dtype)
    w, s = _dense_parts(layer)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    for tokens in range(1, 9):
        x = torch.randn(tokens, in_features, generator=gen, device=CUDA).to(x_dtype)
        y = kernels.lut_gemv(layer.qweight, layer.lookup_table, x, wbits, in_features, csr=layer.csr(),
                             bias=layer.bias)
        assert y.shape == (tokens, out_features) and y.dtype == x_dtype
        _assert_gemv_close(y, x, w + s, layer.bias, f"{tokens} tokens")



@gpu_test
@pytest.mark.parametrize("in_features, out_features", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.0045])
def test_lut_gemv_matches_reference_llama_7b(in_features, out_features, wbits, density):
    layer = _random_layer(in_features, out_features, wbits, density, F16, F32, F32)
    w, s = _dense_parts(layer)
    gen = torch.Generator(device=CUDA).manual_seed(2)
    for tokens in range(1, 9):
        x = torch.randn(tokens, in_features, generator=gen, device=CUDA).half()
        y = kernels.lut_gemv(layer.qweight, layer.lookup_table, x, wbits, in_features, csr=layer.csr(),
                             bias=layer.bias)
        _assert_gemv_close(y, x, w + s, layer.bias, f"{tokens} tokens")


@gpu_test
@pytest.mark.parametrize("wbits", [3, 4])
def test_lut_gemv_splits_out_and_vector_input(wbits):
    layer = _random_layer(1000, 130, wbits, 0.02, F16, F32, F16)
    w, s = _dense_parts(layer)
    x = torch.randn(3, 1000, device=CUDA).half()
    results = []
    for splits in (1, 2, 5, 1000):
        y = kernels.lut_gemv(layer.qweight, layer.lookup_table, x, wbits, 1000, csr=layer.csr(), bias=layer.bias,
                             splits=splits)
        _assert_gemv_close(y, x, w + s, layer.bias, f"{splits} splits")
        results.append(y)
    # the split-K counters reset themselves after every launch
    assert int(kernels._block_counters(x.device, 1).abs().sum()) == 0  # x.device: cuda:0, the key it used
    # deterministic: the same call gives the same bits
    again = kernels.lut_gemv(layer.qweight, layer.lookup_table, x, wbits, 1000, csr=layer.csr(), bias=layer.bias,
                             splits=5)
    assert torch.equal(again, results[2])
    # one token as a vector, written into a given buffer
    out = torch.empty(130, dtype=F16, device=CUDA)
    y = kernels.lut_gemv(layer.qweight, layer.lookup_table, x[1], wbits, 1000, out, csr=layer.csr(), bias=layer.bias)
    assert y.data_ptr() == out.data_ptr() and y.shape == (130,)
    _assert_gemv_close(y[None], x[1:2], w + s, layer.bias, "vector")


@gpu_test
def test_kernels_reject_tensors_on_different_devices():
    layer = _random_layer(64, 32, 3, 0.0)
    with pytest.raises(SqlabError, match="lut is on cpu"):
        kernels.lut_gemv(layer.qweight, layer.lookup_table.cpu(), torch.zeros(1, 64, device=CUDA).half(), 3, 64)


@gpu_test
@pytest.mark.parametrize("in_features, out_features, density", [(100, 37, 0.05), (4096, 4096, 0.0045),
                                                                 (11008, 4096, 0.0045), (64, 300, 0.0)])
@pytest.mark.parametrize("x_dtype, vals_dtype", [(F16, F32), (F32, F32), (BF16, F16)])
@pytest.mark.parametrize("skewed", [False, True])
def test_spmv_rows_and_balanced_match_reference(in_features, out_features, density, x_dtype, vals_dtype, skewed):
    layer = _random_layer(in_features, out_features, 3, density, F16, vals_dtype, None, skewed=skewed)
    csr = layer.csr() or CSR(torch.zeros(out_features + 1, dtype=torch.int32, device=CUDA),
                             torch.zeros(0, dtype=torch.int32, device=CUDA), torch.zeros(0, device=CUDA))
    _, s = _dense_parts(layer)
    for tokens in (1, 3, 8, 17):
        x = torch.randn(tokens, in_features, device=CUDA).to(x_dtype)
        start = torch.randn(tokens, out_features, device=CUDA)
        expected = start.double() + x.double() @ s.T
        bound = 1e-5 * (start.double().abs() + x.double().abs() @ s.abs().T) + 1e-30
        out = kernels.spmv(csr.rows, csr.cols, csr.vals, x, start.clone())
        assert ((out.double() - expected).abs() <= bound).all(), "row-parallel"
        for per_thread in (1, 5, 32, 100000):
            startrows = balanced_startrows(csr.rows, per_thread)
            out = kernels.spmv(csr.rows, csr.cols, csr.vals, x, start.clone(), startrows, per_thread)
            assert ((out.double() - expected).abs() <= bound).all(), f"balanced, {per_thread} per thread"
    # a single token as a vector
    x = torch.randn(in_features, device=CUDA).to(x_dtype)
    out = kernels.spmv(csr.rows, csr.cols, csr.vals, x, torch.zeros(out_features, device=CUDA))
    torch.testing.assert_close(out.double(), s @ x.double(), rtol=1e-5, atol=1e-5)


@gpu_test
@pytest.mark.parametrize("in_features, out_features", [(100, 37), (48, 96), (1000, 130)])
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.05])
@pytest.mark.parametrize("lut_dtype, vals_dtype", [(F16, F32), (F32, F16), (BF16, BF16), (F16, F16)])
@pytest.mark.parametrize("dtype", [F16, F32, BF16])
def test_dequantize_packed_equals_the_cpu_reference_exactly(in_features, out_features, wbits, density, lut_dtype,
                                                            vals_dtype, dtype):
    layer = _random_layer(in_features, out_features, wbits, density, lut_dtype, vals_dtype, device=CUDA)
    w = kernels.dequantize(layer, dtype)
    cpu = copy.deepcopy(layer).cpu()
    assert w.dtype == dtype and w.shape == (out_features, in_features)
    assert torch.equal(w.cpu(), cpu.dequantize(dtype))


@gpu_test
@pytest.mark.parametrize("in_features, out_features", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("wbits", [3, 4])
def test_dequantize_packed_llama_7b_equals_the_torch_reference(in_features, out_features, wbits):
    layer = _random_layer(in_features, out_features, wbits, 0.0045, F16, F32)
    # SqueezeLinear.dequantize is the reference's torch code; on CUDA tensors it runs on the GPU
    assert torch.equal(kernels.dequantize(layer, F16), layer.dequantize(F16))


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of GEMV and dequantize launches, updated as ``SqueezeLinear`` calls them."""
    calls = {"lut_gemv": 0, "dequantize": 0}
    for name in calls:
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


@gpu_test
@pytest.mark.parametrize("shape", [(1, 100), (2, 3, 100), (9, 100), (4, 7, 100)])
def test_squeeze_linear_forward_dispatches_by_token_count(monkeypatch, shape):
    layer = _random_layer(100, 37, 3, 0.05, F16, F32, F32)
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(*shape, device=CUDA).half()
    y = layer(x)
    assert y.shape == (*shape[:-1], 37) and y.dtype == F16
    tokens = x.numel() // 100
    assert calls == ({"lut_gemv": 1, "dequantize": 0} if tokens <= 8 else {"lut_gemv": 0, "dequantize": 1})
    w, s = _dense_parts(layer)
    x2, y2 = x.reshape(-1, 100), y.reshape(-1, 37)
    if tokens <= 8:
        _assert_gemv_close(y2, x2, w + s, layer.bias)
    else:  # W_hat rounded to fp16 once, then cuBLAS
        ref = x2.double() @ (w + s).T + layer.bias.double()
        scale = x2.double().abs() @ (w + s).abs().T + layer.bias.double().abs()
        assert ((y2.double() - ref).abs() <= 2**-10 * (ref.abs() + scale)).all()


# --- GPU: a quantized tiny model ------------------------------------------------------------------

def _quantized_llama(wbits: int, hidden: int = 48):
    model = make_llama(hidden=hidden)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(model, ids, progress=False)
    quantize_model(model, QuantConfig(wbits=wbits, outlier_pct=0.45, sensitive_pct=0.05), fisher, progress=False)
    assert any(m.nnz for m in model.modules() if isinstance(m, SqueezeLinear))
    return model


def _steps(model, prompt: torch.Tensor, feed: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prompt (one forward) and of each token of ``feed`` (one token a step, cached)."""
    out = model(prompt, use_cache=True)
    logits, cache = [out.logits.float().cpu()], out.past_key_values
    for t in range(feed.shape[1]):
        out = model(feed[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits.float().cpu())
        cache = out.past_key_values
    return logits


@gpu_test
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("batch, prompt_len", [(1, 16), (1, 5), (3, 12)])
@torch.no_grad()
def test_quantized_model_fp16_on_gpu_matches_cpu(monkeypatch, wbits, batch, prompt_len):
    model = _quantized_llama(wbits)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 320, (batch, prompt_len), generator=gen)
    feed = torch.randint(0, 320, (batch, 4), generator=gen)
    cpu = _steps(model, prompt, feed)

    calls = _count_kernel_calls(monkeypatch)
    gpu_model = copy.deepcopy(model).to("cuda", torch.float16)
    gpu = _steps(gpu_model, prompt.cuda(), feed.cuda())
    layers = sum(isinstance(m, SqueezeLinear) for m in model.modules())
    prefill_tokens = batch * prompt_len
    # the prompt dequantizes (or, at <= 8 tokens, runs the GEMV); every decoding step runs the GEMV
    assert calls["lut_gemv"] == layers * (feed.shape[1] + (prefill_tokens <= 8))
    assert calls["dequantize"] == layers * (prefill_tokens > 8)
    for step, (a, b) in enumerate(zip(gpu, cpu)):
        tol = 1e-2 * b.abs().max().item() + 1e-3
        torch.testing.assert_close(a, b, rtol=1e-2, atol=tol, msg=lambda m, s=step: f"step {s}: {m}")


def _simulated_twin(model):
    """The same model with every SqueezeLinear replaced by an nn.Linear holding its W_hat."""
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, SqueezeLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=layer.qweight.device)
            linear.weight.data = layer.dequantize(torch.float32)
            if layer.bias is not None:
                linear.bias.data = layer.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


@gpu_test
@pytest.mark.parametrize("wbits", [3, 4])
@torch.no_grad()
def test_generate_on_gpu_equals_the_simulated_twin(monkeypatch, wbits):
    model = _quantized_llama(wbits, hidden=64)
    twin = _simulated_twin(model).to("cuda")
    assert model.to("cuda") is model and model.lm_head.weight.is_cuda
    calls = []
    original = kernels.lut_gemv
    monkeypatch.setattr(kernels, "lut_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3)).cuda()
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                  pad_token_id=2)
    packed_tokens = model.generate(prompt, **kwargs)
    assert calls, "decoding did not run the LUT-GEMV"
    twin_tokens = twin.generate(prompt, **kwargs)
    assert packed_tokens.shape == (1, 36)
    assert torch.equal(packed_tokens, twin_tokens)
