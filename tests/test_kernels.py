"""The CUDA kernels' build and host side: compiles, launch plans, argument checks.

- compilation (needs only ``nvcc``): every ``kernels/*.cu`` for sm_80 and sm_90, 3 and 4
  bits, with the compile-time kinds that ``sqlab.kernels`` passes; the inlined source
  that CuPy hands to NVRTC; and ptxas' static shared memory against ``gemv_plan``'s
  budget. Where an NVRTC library is installed, the inlined source also goes through NVRTC
  itself (it is stricter than nvcc about host code).
- the pure-Python parts: launch plans, argument checks, the CPU fallback.

The kernels themselves run in ``test_kernels_run.py``: on the CPU through the
CUDA-on-CPU harness everywhere, and on a GPU where there is one.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlab import SqlabError, SqueezeLinear, kernels
from sqlab.packing import CSR, pack, to_csr

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
ARCHS = ("sm_80", "sm_90")
KERNEL_FILES = sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu"))

from tests.kernel_cases import BF16, DTYPE_SETS, F16, F32, SPMV_KINDS


def _defines(wbits: int, dtypes: tuple) -> tuple:
    """The -D constants sqlab.kernels compiles lut_gemv.cu with for these dtypes."""
    x, lut, vals, bias = dtypes
    csr = CSR(
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, dtype=vals),
    )
    return kernels._gemv_defines(
        wbits,
        x,
        torch.zeros(1, 1 << wbits, dtype=lut),
        csr,
        None if bias is None else torch.zeros(1, dtype=bias),
    )


def _spmv_defines(x: torch.dtype, vals: torch.dtype) -> tuple:
    return (("X_KIND", kernels._KIND[x]), ("VAL_KIND", kernels._KIND[vals]))


# --- compilation with nvcc -------------------------------------------------------------------


def _jobs() -> dict[str, tuple]:
    """Every compile of the matrix: id -> (file or inlined source, arch, defines, -I kernels?)."""
    jobs = {}
    for arch in ARCHS:
        for wbits in (3, 4):
            for name, dtypes in DTYPE_SETS.items():
                jobs[f"lut_gemv.cu-{arch}-w{wbits}-{name}"] = (
                    "lut_gemv.cu",
                    arch,
                    _defines(wbits, dtypes),
                    True,
                )
        for name, (x, vals) in SPMV_KINDS.items():
            jobs[f"spmv.cu-{arch}-{name}"] = ("spmv.cu", arch, _spmv_defines(x, vals), True)
        for file in KERNEL_FILES:
            if file not in ("lut_gemv.cu", "spmv.cu"):  # a new source: compile it with its defaults
                jobs[f"{file}-{arch}-defaults"] = (file, arch, (), True)
    # what NVRTC sees: the source with numeric.cuh inlined, no include path, the same options
    for wbits in (3, 4):
        jobs[f"inlined-lut_gemv.cu-sm_90-w{wbits}"] = (
            "lut_gemv.cu",
            "sm_90",
            _defines(wbits, DTYPE_SETS["fp16-x_fp32-vals"]),
            False,
        )
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
    cmd = [
        NVCC,
        f"-arch={arch}",
        "-cubin",
        "--resource-usage",
        *include,
        *kernels._options(defines),
        "-o",
        str(workdir / f"{tag}.cubin"),
        str(source),
    ]
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
        assert {f"lut_gemv_{b}" for b in range(1, 9)} | {
            "dequantize_dense",
            "dequantize_sparse",
        } <= set(smem)
    if file == "spmv.cu":
        assert {"spmv_rows", "spmv_balanced"} <= set(smem)


@needs_nvcc
@pytest.mark.parametrize("key", [k for k in JOBS if JOBS[k][0] == "lut_gemv.cu"])
def test_static_shared_memory_is_what_the_plan_budgets(nvcc_builds, key):
    """gemv_plan keeps static + dynamic shared memory within 48 KiB only if it knows the static
    part.
    """
    result = nvcc_builds[key]
    assert result.returncode == 0, result.stderr[-2000:]
    defines = dict(JOBS[key][2])
    wbits = defines["WBITS"]
    x_dtype = {v: k for k, v in kernels._KIND.items()}[defines["X_KIND"]]
    smem = _static_smem(result.stdout + result.stderr)
    for tokens in range(1, 9):
        # the largest slices: LLaMA-7B's down_proj on few SMs, sparse part on
        plan = kernels.gemv_plan(11008, 4096, wbits, tokens, x_dtype, True, sm_count=1)
        assert smem[f"lut_gemv_{tokens}"] <= plan.static_shared
        assert plan.static_shared + plan.shared <= kernels.SHARED_LIMIT


@needs_nvcc
@pytest.mark.parametrize("wbits", [5, 2])
def test_unsupported_bit_width_does_not_compile(tmp_path, wbits):
    result = _compile(("lut_gemv.cu", "sm_80", (("WBITS", wbits),), True), tmp_path)
    assert result.returncode != 0 and "WBITS must be 3 or 4" in result.stderr


@needs_nvcc
def test_gemv_anatomy_variants_each_take_out_one_phase_and_compile(tmp_path, monkeypatch):
    """benchmarks/gemv_anatomy.py edits lut_gemv.cu by text: every edit still finds its
    place in the kernel, and every variant compiles.
    """
    # in a process of its own: the script imports benchmarks/kernels.py as "kernels"
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import gemv_anatomy; "
        "print(json.dumps(gemv_anatomy.variants(open(sys.argv[2]).read())))"
    )
    source_path = kernels.KERNEL_DIR / "lut_gemv.cu"
    done = subprocess.run(
        [sys.executable, "-c", code, str(kernels.KERNEL_DIR.parent / "benchmarks"), source_path],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    variants = json.loads(done.stdout)
    assert variants["full"] == source_path.read_text()
    assert len(set(variants.values())) == len(variants) == 5
    (tmp_path / "numeric.cuh").write_text((kernels.KERNEL_DIR / "numeric.cuh").read_text())
    for i, text in enumerate(variants.values()):
        (tmp_path / f"v{i}.cu").write_text(text)
    monkeypatch.setattr(kernels, "KERNEL_DIR", tmp_path)  # _compile reads the variants there
    for i in range(len(variants)):
        result = _compile((f"v{i}.cu", "sm_90", (("WBITS", 3),), True), tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]


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
        candidates += (
            sorted(Path(entry).glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*")) if entry else []
        )
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


@pytest.mark.parametrize(
    "file, defines",
    [
        *[("lut_gemv.cu", _defines(w, d)) for w in (3, 4) for d in DTYPE_SETS.values()],
        *[("spmv.cu", _spmv_defines(x, v)) for x, v in SPMV_KINDS.values()],
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{n}" for k, n in v),
)
def test_nvrtc_compiles_the_inlined_source(file, defines):
    """What CuPy does at run time, done here where an NVRTC library exists (no GPU needed)."""
    lib = _nvrtc_library()
    if lib is None:
        pytest.skip("no NVRTC library installed")
    program = ctypes.c_void_p()
    assert (
        lib.nvrtcCreateProgram(
            ctypes.byref(program), kernels._source(file).encode(), file.encode(), 0, None, None
        )
        == 0
    )
    options = [*kernels._options(defines), "-arch=compute_80"]
    status = lib.nvrtcCompileProgram(
        program, len(options), (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    )
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode(errors="replace")


# --- pure Python: launch plans ---------------------------------------------------------------

LLAMA_SHAPES = [
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (5120, 5120),
    (5120, 13824),
    (13824, 5120),
]
ODD_SHAPES = [(100, 37), (48, 96), (33, 1), (1, 1), (32, 64), (65, 4097), (70000, 3)]


@pytest.mark.parametrize("in_features, out_features", LLAMA_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("wbits", [3, 4])
@pytest.mark.parametrize("x_dtype", [F16, F32, BF16])
def test_gemv_plan_fits_shared_memory_and_covers_all_groups(
    in_features, out_features, wbits, x_dtype
):
    groups = -(-in_features // 32)
    config = kernels.gemv_config(wbits, x_dtype)
    # 16-bit activations look weights up in pairs; fp16 pairs (HALF2) stage x as fp16,
    # the rest as fp32
    assert config.tuple == (1 if x_dtype == F32 else 2)
    x_bytes = 2 if x_dtype == F16 else 4
    bn = config.bn
    for tokens in range(1, 9):
        for sparse in (False, True):
            for sm_count in (1, 108, 132):
                plan = kernels.gemv_plan(
                    in_features, out_features, wbits, tokens, x_dtype, sparse, sm_count
                )
                entries = 1 << (wbits * config.tuple)
                assert plan.static_shared == entries * bn * 4 + kernels.STATIC_EXTRA
                assert plan.static_shared + plan.shared <= 48 * 1024
                assert plan.block == (bn, config.ky + sparse)
                assert plan.shared == (
                    plan.groups_per_block * 32 * tokens * x_bytes + plan.block[1] * tokens * bn * 4
                )
                cols, splits = plan.grid
                assert (cols - 1) * bn < out_features <= cols * bn
                # the slices cover every group and none is empty
                assert (
                    (splits - 1) * plan.groups_per_block < groups <= splits * plan.groups_per_block
                )
                assert plan.splits == splits >= 1


def test_gemv_plan_fills_a_large_gpu_for_llama_shapes():
    for in_features, out_features in LLAMA_SHAPES:
        plan = kernels.gemv_plan(in_features, out_features, 3, 1, F16, False, sm_count=132)
        assert plan.grid[0] * plan.grid[1] >= 132  # every SM has a block
        assert plan.groups_per_block >= plan.config.min_groups or plan.splits == 1
        # a power of two of K slices (8, not 9, for 4096 columns on 132 SMs: faster on an H100)
        assert plan.splits & (plan.splits - 1) == 0, plan.splits
    assert kernels.gemv_plan(4096, 4096, 3, 1, F16, False, sm_count=132).splits == 8


def test_gemv_plan_splits_override_and_errors():
    assert kernels.gemv_plan(4096, 4096, 3, 1, F16, False, 132, splits=1).splits == 1
    assert kernels.gemv_plan(4096, 4096, 3, 1, F16, False, 132, splits=4).splits == 4
    assert (
        kernels.gemv_plan(100, 37, 4, 1, F16, False, 132, splits=1000).splits == 4
    )  # one group per slice
    # 8 tokens of 11008 inputs cannot stay in one slice: shared memory splits it anyway
    assert kernels.gemv_plan(11008, 4096, 3, 8, F16, True, 132, splits=1).splits > 1
    for tokens in (0, 9):
        with pytest.raises(SqlabError, match=f"1 to 8 tokens, got {tokens}"):
            kernels.gemv_plan(64, 64, 3, tokens, F16, False, 1)
    for shape in (
        (0, 64),
        (64, 0),
    ):  # a zero-size layer has nothing to launch (it used to divide by zero)
        with pytest.raises(SqlabError, match="at least one input and one output"):
            kernels.gemv_plan(*shape, 3, 1, F16, False, 132)
    with pytest.raises(SqlabError, match="splits must be a positive integer, got 0"):
        kernels.gemv_plan(64, 64, 3, 1, F16, False, 1, splits=0)
    too_wide = kernels.GemvConfig(bn=128, ky=4, tuple=2, depth=2, blocks_per_sm=4, min_groups=4)
    with pytest.raises(SqlabError, match="does not fit 49152 bytes of shared memory at 8 tokens"):
        kernels.gemv_plan(4096, 4096, 3, 8, F16, True, 132, config=too_wide)


def test_gemv_defines_follow_the_dtypes():
    d = dict(_defines(3, (F16, F16, F32, F32)))
    config = kernels.gemv_config(3, F16)
    assert d == {
        "WBITS": 3,
        "X_KIND": 1,
        "LUT_KIND": 1,
        "VAL_KIND": 0,
        "BIAS_KIND": 0,
        "BN": config.bn,
        "KY": config.ky,
        "TUPLE": 2,
        "DEPTH": config.depth,
    }
    assert (
        dict(_defines(3, (F32, F16, F16, None)))["TUPLE"] == 1
    )  # fp32 activations: no 16-bit pairs
    assert (
        dict(_defines(3, (BF16, F32, F32, None)))["TUPLE"] == 2
    )  # an fp32 LUT staged as bf16 pairs
    assert (
        dict(_defines(4, (F16, F16, F32, F32)))["TUPLE"] == 2
    )  # 4-bit pairs: a 256-entry table per column
    assert dict(_defines(4, (F32, F16, F32, F32)))["TUPLE"] == 1
    absent = dict(kernels._gemv_defines(4, BF16, torch.zeros(1, 16, dtype=F16), None, None))
    assert (
        absent["VAL_KIND"] == absent["BIAS_KIND"] == absent["X_KIND"] == 2
    )  # absent parts take x's kind


def test_use_gemv_boundary():
    assert [kernels.use_gemv(t) for t in (0, 1, 8, 9)] == [False, True, True, False]


# --- pure Python: argument checks (run before anything needs CUDA) -----------------------------


def _cpu_parts(in_features=100, out_features=37, wbits=3, nnz=5):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(
        0, 1 << wbits, (out_features, in_features), generator=gen, dtype=torch.uint8
    )
    lut = torch.randn(out_features, 1 << wbits, generator=gen).half()
    r = torch.randint(0, out_features, (nnz,), generator=gen)
    c = torch.randint(0, in_features, (nnz,), generator=gen)
    csr = to_csr(r, c, torch.randn(nnz, generator=gen), out_features)
    x = torch.randn(2, in_features, generator=gen).half()
    return pack(idx, wbits), lut, csr, x


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(wbits=5), r"wbits must be 3 or 4 \(an integer\), got 5"),
        (dict(qweight=lambda q: q.long()), "qweight has dtype int64; accepted: int32"),
        (
            dict(qweight=lambda q: q[:-1]),
            r"qweight has shape \(11, 37\); 3-bit packing of 100 inputs needs \(12, out",
        ),
        (dict(lut=lambda t: t[:, :4]), r"lut has shape \(37, 4\), expected \(37, 8\)"),
        (dict(lut=lambda t: t.double()), "lut has dtype float64"),
        (
            dict(x=lambda t: t[:, :99]),
            r"x has shape \(2, 99\); expected \(100,\) or \(tokens, 100\)",
        ),
        (dict(x=lambda t: t.double()), "x has dtype float64; accepted: float32, float16, bfloat16"),
        (dict(x=lambda t: t.repeat(5, 1)), "lut_gemv takes 1 to 8 tokens, got 10"),
        (dict(x=lambda t: torch.zeros(0, 100, dtype=F16)), "1 to 8 tokens, got 0"),
        (dict(bias=torch.zeros(36)), r"bias has shape \(36,\), expected \(37,\)"),
        (dict(out=torch.zeros(2, 37)), "out has dtype float32; accepted: float16"),
        (
            dict(csr=lambda c: CSR(c.rows[:-1], c.cols, c.vals)),
            r"rows has shape \(37,\), expected \(38,\)",
        ),
        (dict(csr=lambda c: CSR(c.rows, c.cols.long(), c.vals)), "cols has dtype int64"),
        (
            dict(csr=lambda c: CSR(c.rows, c.cols, c.vals[:-1])),
            r"vals has shape \(4,\), expected \(5,\)",
        ),
        (
            dict(csr=lambda c: CSR(c.rows, c.cols + 100, c.vals)),
            "column index 1.. out of range; the layer has 100",
        ),
        (
            dict(csr=lambda c: CSR(c.rows.flip(0).contiguous(), c.cols, c.vals)),
            "rows must rise from 0",
        ),
        (dict(), "qweight is on cpu; the kernels need CUDA tensors"),
    ],
)
def test_lut_gemv_rejects_bad_input_before_needing_cuda(change, message):
    qweight, lut, csr, x = _cpu_parts()
    args = dict(qweight=qweight, lut=lut, x=x, csr=csr, wbits=3, bias=None, out=None)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.lut_gemv(
            args["qweight"],
            args["lut"],
            args["x"],
            args["wbits"],
            100,
            args["out"],
            csr=args["csr"],
            bias=args["bias"],
        )


def test_lut_gemv_rejects_non_contiguous_x():
    qweight, lut, _, _ = _cpu_parts()
    x = torch.zeros(100, 2, dtype=F16).T
    with pytest.raises(SqlabError, match="x must be contiguous"):
        kernels.lut_gemv(qweight, lut, x, 3, 100)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rows=lambda t: t.long()), "rows has dtype int64; accepted: int32"),
        (dict(rows=lambda t: t[None]), r"rows must be the \(out_features \+ 1,\) row pointers"),
        (dict(vals=lambda t: t.double()), "vals has dtype float64"),
        (dict(x=lambda t: t[None]), r"x must be \(in_features,\) or \(tokens, in_features\)"),
        (dict(out=lambda t: t.half()), "out has dtype float16; accepted: float32"),
        (dict(out=lambda t: t[:, :-1]), r"out has shape \(2, 36\), expected \(2, 37\)"),
        (
            dict(startrows=torch.zeros(5, dtype=torch.int32)),
            "needs the nnz_per_thread its startrows were made with",
        ),
        (
            dict(startrows=torch.zeros(4, dtype=torch.int32), nnz_per_thread=1),
            r"startrows has shape \(4,\), expected \(5,\)",
        ),
        (dict(), "rows is on cpu; the kernels need CUDA tensors"),
    ],
)
def test_spmv_rejects_bad_input_before_needing_cuda(change, message):
    _, _, csr, x = _cpu_parts()
    args = dict(
        rows=csr.rows,
        cols=csr.cols,
        vals=csr.vals,
        x=x,
        out=torch.zeros(2, 37),
        startrows=None,
        nnz_per_thread=None,
    )
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.spmv(**args)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(wbits=5), r"wbits must be 3 or 4 \(an integer\), got 5"),
        (
            dict(dtype=torch.float64),
            "dtype must be float32, float16 or bfloat16, got torch.float64",
        ),
        (dict(in_features=64), r"3-bit packing of 64 inputs needs \(6, out_features\)"),
        (dict(lut=lambda t: t[:-1]), r"lut has shape \(36, 8\), expected \(37, 8\)"),
        (dict(), "qweight is on cpu; the kernels need CUDA tensors"),
    ],
)
def test_dequantize_packed_rejects_bad_input_before_needing_cuda(change, message):
    qweight, lut, csr, _ = _cpu_parts()
    args = dict(qweight=qweight, lut=lut, wbits=3, in_features=100, csr=csr, dtype=F16)
    for key, value in change.items():
        args[key] = value(args[key]) if callable(value) else value
    with pytest.raises(SqlabError, match=message):
        kernels.dequantize_packed(**args)


# --- pure Python: without a GPU ----------------------------------------------------------------


def test_kernels_are_unavailable_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert kernels.available() is False
    assert "CUDA GPU" in kernels.unavailable_reason()


def test_benchmarks_say_why_nothing_was_measured_without_the_kernels():
    if kernels.available():
        pytest.skip("the kernels can run here")
    for script in ("kernels.py", "generate.py", "tune_gemv.py", "gemv_anatomy.py"):
        done = subprocess.run(
            [sys.executable, str(kernels.KERNEL_DIR.parent / "benchmarks" / script)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and kernels.unavailable_reason() in done.stderr
        assert "Nothing was measured" in done.stderr


def test_importing_sqlab_does_not_import_cupy():
    code = (
        "import sys, torch, sqlab\n"
        "from sqlab import SqueezeLinear\n"
        "layer = SqueezeLinear(64, 8, 3)\n"
        "layer(torch.zeros(2, 64))\n"
        "assert 'cupy' not in sys.modules, 'cupy imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cpu_forward_never_prepares_gpu_launches_even_if_cupy_claims_to_work(monkeypatch):
    qweight, lut, csr, x = _cpu_parts()
    bias = torch.randn(37)
    layer = SqueezeLinear.from_parts(qweight, lut, 100, csr, bias)

    def no_kernels(*args, **kwargs):
        raise AssertionError("the CPU path prepared a GPU launch")

    monkeypatch.setattr(kernels.CupyBackend, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(kernels, "GemvKernels", no_kernels)
    x = x.float()
    expected = x.double() @ layer.dequantize(torch.float64).T + bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_host_overhead_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "host_overhead.json"
    done = subprocess.run(
        [
            sys.executable,
            str(kernels.KERNEL_DIR.parent / "benchmarks" / "host_overhead.py"),
            "--calls",
            "300",
            "--repeat",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    for key in ("dense_us_per_call", "sparse_us_per_call", "baseline_us_per_call"):
        assert result[key] > 0
    assert "previous path" in done.stdout and "prepared (dense-only)" in done.stdout
