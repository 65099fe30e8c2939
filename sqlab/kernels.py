"""CUDA kernels for ``SqueezeLinear``, compiled at run time with CuPy.

``kernels/lut_gemv.cu`` holds the LUT-GEMV (1 to 8 tokens, the sparse part fused into
the same launch) and the dequantization for long prompts; ``kernels/spmv.cu`` the
sparse part on its own (row-parallel and balanced SpMV, and adding ``S`` into a dense
matrix). Bit width, dtypes and tile sizes are compile-time constants (``-DWBITS=3``
...); each (source, options) pair is compiled once per process.

CuPy is optional: nothing here imports it until a kernel is launched, and
``available()`` says whether one can be. Tensors cross zero-copy as raw device
pointers (``tensor.data_ptr()``, which CuPy passes as a 64-bit kernel argument):
wrapping every tensor with DLPack would cost more per call than a decoding step's
GEMV takes on the GPU. Launches go on torch's current stream of the tensors' device
and no call synchronises with the host, so the kernels order with torch's own work
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import Tensor

from .errors import SqlabError
from .packing import CSR, GROUP, packed_rows

KERNEL_DIR = Path(os.environ.get("SQLAB_KERNEL_DIR", Path(__file__).resolve().parents[1] / "kernels"))

MAX_GEMV_TOKENS = 8  # more tokens (a prompt) dequantize once and use cuBLAS
BN, KY = 64, 4  # output columns per block, thread rows sharing the dense work (see lut_gemv.cu)
SHARED_LIMIT = 48 * 1024  # per block, static + dynamic, without an opt-in attribute
STATIC_EXTRA = 16  # lut_gemv.cu's `last` flag beside the table, padded to the dynamic part's alignment
BLOCKS_PER_SM = 4  # split K until the grid gives about this many blocks per SM ...
MIN_GROUPS_PER_BLOCK = 2 * KY  # ... but leave every dense thread row two groups or more
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # numeric.cuh's kinds
_NAMES = "float32, float16 or bfloat16"


def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the GPU kernels cannot run here, in words; None when they can."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and torch sees none"
    if _cupy() is None:
        return "it needs CuPy for the kernels (pip install -e '.[gpu]')"
    return None


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except Exception:  # not installed, or built for another CUDA: the kernels are unavailable
        return None
    return cupy


def use_gemv(tokens: int) -> bool:
    """Whether ``tokens`` rows of activations go to the LUT-GEMV (else dequantize + matmul)."""
    return 1 <= tokens <= MAX_GEMV_TOKENS


# --- compiling and launching -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source(file: str) -> str:
    """A kernel source with its local ``#include "x.cuh"`` lines inlined.

    Inlining keeps the compile key (source + options) complete: CuPy's on-disk cache
    does not look into included files.
    """
    path = KERNEL_DIR / file
    if not path.is_file():
        raise SqlabError(f"kernel source {path} not found; set SQLAB_KERNEL_DIR to the repository's kernels/ folder")
    return re.sub(r'^#include "([\w.]+)"$', lambda m: _source(m.group(1)), path.read_text(), flags=re.M)


@functools.lru_cache(maxsize=None)
def _module(source: str, options: tuple[str, ...]):
    return _cupy().RawModule(code=source, options=options)


def _options(defines: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """The compiler options for a kernel module (tests pass the same ones to nvcc)."""
    return ("--std=c++17", *(f"-D{key}={value}" for key, value in defines))


@functools.lru_cache(maxsize=None)
def _function(file: str, name: str, defines: tuple[tuple[str, int], ...]):
    return _module(_source(file), _options(defines)).get_function(name)


@functools.lru_cache(maxsize=None)
def _external_stream(pointer: int, device: int):
    return _cupy().cuda.ExternalStream(pointer)


def _launch(file: str, name: str, defines: tuple, grid: tuple, block: tuple, args: tuple, shared: int,
            device: torch.device) -> None:
    """Launch kernel ``name`` of ``file`` on torch's current stream of ``device``.

    ``args`` holds tensors (passed as device pointers), ``None`` (a null pointer) and
    ints (passed as C ``int``).
    """
    cupy = _cupy()
    if cupy is None:
        raise SqlabError("the CUDA kernels need CuPy (pip install 'sqlab[gpu]', i.e. cupy-cuda12x)")
    kernel = _function(file, name, defines)
    c_args = tuple(0 if a is None else a.data_ptr() if isinstance(a, Tensor) else _int32(a) for a in args)
    with cupy.cuda.Device(device.index):
        with _external_stream(torch.cuda.current_stream(device).cuda_stream, device.index):
            kernel(grid, block, c_args, shared_mem=shared)


def _int32(value: int) -> numpy.int32:
    return numpy.int32(value)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: dict[tuple, Tensor] = {}


def _block_counters(device: torch.device, n: int) -> Tensor:
    """Zeroed int32 counters, one per column block, for the split-K combine.

    Every launch leaves them at zero again, so one buffer per device and stream is kept
    and only grown.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _counters.get(key)
    if counters is None or counters.numel() < n:
        counters = _counters[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return counters


# --- checks at the boundary --------------------------------------------------------------


def _check(t: Tensor | None, name: str, *, dtypes: tuple | None = None, shape: tuple | None = None) -> None:
    if not isinstance(t, Tensor):
        raise SqlabError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise SqlabError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; accepted: {accepted}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise SqlabError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise SqlabError(f"{name} must be contiguous (call .contiguous() first)")


def _cuda_device(**tensors: Tensor | None) -> torch.device:
    """The one CUDA device all given tensors are on."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device.type != "cuda":
            raise SqlabError(f"{name} is on {device}; the kernels need CUDA tensors")
        if device != first:
            raise SqlabError(f"{name} is on {device} but the other inputs are on {first}")
    return first


def _check_csr(csr: CSR, out_features: int, in_features: int) -> None:
    _check(csr.rows, "rows", dtypes=(torch.int32,), shape=(out_features + 1,))
    nnz = csr.cols.numel()
    _check(csr.cols, "cols", dtypes=(torch.int32,), shape=(nnz,))
    _check(csr.vals, "vals", dtypes=DTYPES, shape=(nnz,))


def _tokens_2d(x: Tensor, in_features: int, name: str = "x") -> Tensor:
    if x.ndim not in (1, 2) or x.shape[-1] != in_features:
        raise SqlabError(f"{name} has shape {tuple(x.shape)}; expected ({in_features},) or (tokens, {in_features})")
    return x.reshape(-1, in_features)


# --- LUT-GEMV ----------------------------------------------------------------------------


def _tuple(wbits: int, lut_dtype: torch.dtype) -> int:
    """Indices per table lookup: 3-bit 16-bit LUTs look up pairs (one 32-bit word per pair)."""
    return 2 if wbits == 3 and lut_dtype != torch.float32 else 1


def _gemv_defines(wbits: int, dtype: torch.dtype, lut: Tensor, csr: CSR | None, bias: Tensor | None) -> tuple:
    """lut_gemv.cu's compile-time constants; absent parts take x's kind (one module serves all)."""
    vals = csr.vals.dtype if csr is not None and csr.nnz else dtype
    return (("WBITS", wbits), ("X_KIND", _KIND[dtype]), ("LUT_KIND", _KIND[lut.dtype]), ("VAL_KIND", _KIND[vals]),
            ("BIAS_KIND", _KIND[dtype if bias is None else bias.dtype]), ("BN", BN), ("KY", KY),
            ("TUPLE", _tuple(wbits, lut.dtype)))


@dataclass(frozen=True)
class GemvPlan:
    """Launch geometry of one LUT-GEMV call."""

    grid: tuple[int, int]  # (column blocks, K slices)
    block: tuple[int, int]  # (BN, KY [+ 1 sparse row])
    groups_per_block: int  # groups of 32 inputs in each K slice
    shared: int  # dynamic shared memory, bytes
    static_shared: int  # the kernel's static shared memory (the table and a flag), bytes

    @property
    def splits(self) -> int:
        return self.grid[1]


def gemv_plan(in_features: int, out_features: int, wbits: int, tokens: int, lut_dtype: torch.dtype,
              sparse: bool, sm_count: int, splits: int | None = None) -> GemvPlan:
    """Grid, block and shared memory for ``lut_gemv`` (mirrors lut_gemv.cu's layout).

    K is split into slices until the grid has about ``BLOCKS_PER_SM`` blocks per SM
    (``splits`` overrides this), within the shared-memory budget for x's slice.
    """
    if not 1 <= tokens <= MAX_GEMV_TOKENS:
        raise SqlabError(f"the LUT-GEMV takes 1 to {MAX_GEMV_TOKENS} tokens, got {tokens}")
    tuple_ = _tuple(wbits, lut_dtype)
    # static shared: one 32-bit word per table entry and column, and the flag; both count
    # towards the limit, so a plan that filled it with x alone would fail to launch
    table = (1 << wbits * tuple_) * BN * 4 + STATIC_EXTRA
    rows = KY + int(sparse)
    sums = rows * tokens * BN * 4
    x_group = tokens * GROUP * 4
    max_groups = (SHARED_LIMIT - table - sums) // x_group
    groups = -(-in_features // GROUP)
    col_blocks = -(-out_features // BN)
    if splits is None:
        want = -(-BLOCKS_PER_SM * sm_count // col_blocks)
        per_block = max(-(-groups // want), MIN_GROUPS_PER_BLOCK)
    else:
        if not isinstance(splits, int) or splits < 1:
            raise SqlabError(f"splits must be a positive integer, got {splits!r}")
        per_block = -(-groups // splits)
    per_block = max(1, min(per_block, max_groups, groups))
    splits = -(-groups // per_block)
    per_block = -(-groups // splits)  # even out the slices
    return GemvPlan((col_blocks, splits), (BN, rows), per_block, per_block * x_group + sums, table)


def _check_packed(qweight: Tensor, lut: Tensor, wbits: int, in_features: int) -> int:
    """Check a packed layer's index matrix and LUT against each other; returns ``out_features``."""
    if wbits not in (3, 4):
        raise SqlabError(f"wbits must be 3 or 4, got {wbits!r}")
    _check(qweight, "qweight", dtypes=(torch.int32,))
    if qweight.ndim != 2 or qweight.shape[0] != packed_rows(in_features, wbits):
        raise SqlabError(f"qweight has shape {tuple(qweight.shape)}; {wbits}-bit packing of {in_features} inputs "
                         f"needs ({packed_rows(in_features, wbits)}, out_features)")
    out_features = qweight.shape[1]
    _check(lut, "lut", dtypes=DTYPES, shape=(out_features, 1 << wbits))
    return out_features


def lut_gemv(qweight: Tensor, lut: Tensor, x: Tensor, wbits: int, in_features: int, out: Tensor | None = None, *,
             csr: CSR | None = None, bias: Tensor | None = None, splits: int | None = None) -> Tensor:
    """``y = x @ W_hat.T (+ S x) (+ bias)`` straight from the packed weights, for 1-8 tokens.

    ``qweight`` int32 ``(ceil(in/32)·wbits, out)``, ``lut`` ``(out, 2**wbits)``, ``x``
    ``(tokens, in)`` or ``(in,)`` in float16/float32/bfloat16; ``csr`` the optional
    sparse part (added in the same launch), ``bias`` ``(out,)``. Returns ``y``
    ``(tokens, out)`` (or ``(out,)``) in x's dtype, written into ``out`` if given.
    The weights are read once for all tokens; sums are fp32.
    """
    out_features = _check_packed(qweight, lut, wbits, in_features)
    x2 = _tokens_2d(x, in_features)
    _check(x2, "x", dtypes=DTYPES)
    tokens = x2.shape[0]
    if not 1 <= tokens <= MAX_GEMV_TOKENS:
        raise SqlabError(f"lut_gemv takes 1 to {MAX_GEMV_TOKENS} tokens, got {tokens}; "
                         "for more, dequantize() and use a matmul")
    sparse = csr is not None and csr.nnz > 0
    if sparse:
        _check_csr(csr, out_features, in_features)
    if bias is not None:
        _check(bias, "bias", dtypes=DTYPES, shape=(out_features,))
    y_shape = (tokens, out_features) if x.ndim == 2 else (out_features,)
    if out is None:
        out = torch.empty(y_shape, dtype=x.dtype, device=x.device)
    else:
        _check(out, "out", dtypes=(x.dtype,), shape=y_shape)
    device = _cuda_device(qweight=qweight, lut=lut, x=x, out=out, bias=bias,
                          **({"rows": csr.rows, "cols": csr.cols, "vals": csr.vals} if sparse else {}))

    plan = gemv_plan(in_features, out_features, wbits, tokens, lut.dtype, sparse, _sm_count(device), splits)
    partial = counters = None
    if plan.splits > 1:
        partial = torch.empty((plan.splits, tokens, out_features), dtype=torch.float32, device=device)
        counters = _block_counters(device, plan.grid[0])
    rows, cols, vals = (csr.rows, csr.cols, csr.vals) if sparse else (None, None, None)
    _launch("lut_gemv.cu", f"lut_gemv_{tokens}", _gemv_defines(wbits, x.dtype, lut, csr, bias), plan.grid, plan.block,
            (qweight, lut, x2, rows, cols, vals, bias, partial, counters, out, in_features, out_features,
             plan.groups_per_block), plan.shared, device)
    return out


# --- sparse part -------------------------------------------------------------------------


def spmv(rows: Tensor, cols: Tensor, vals: Tensor, x: Tensor, out: Tensor, startrows: Tensor | None = None,
         nnz_per_thread: int | None = None) -> Tensor:
    """``out += S @ x`` for the CSR matrix ``S`` (``rows`` ``(out_features + 1,)``).

    ``x`` is ``(tokens, in_features)`` or ``(in_features,)``; ``out`` float32 of
    shape ``(tokens, out_features)`` (or ``(out_features,)``), accumulated in place
    and returned. Row-parallel by default; with ``startrows`` from
    ``sqlab.packing.balanced_startrows(rows, nnz_per_thread)`` each thread takes
    ``nnz_per_thread`` stored values instead, which balances skewed rows.
    """
    _check(rows, "rows", dtypes=(torch.int32,))
    if rows.ndim != 1 or rows.numel() < 1:
        raise SqlabError(f"rows must be the (out_features + 1,) row pointers, got shape {tuple(rows.shape)}")
    out_features, nnz = rows.numel() - 1, cols.numel()
    _check(cols, "cols", dtypes=(torch.int32,), shape=(nnz,))
    _check(vals, "vals", dtypes=DTYPES, shape=(nnz,))
    _check(x, "x", dtypes=DTYPES)
    if x.ndim not in (1, 2):
        raise SqlabError(f"x must be (in_features,) or (tokens, in_features), got shape {tuple(x.shape)}")
    in_features, tokens = x.shape[-1], (x.shape[0] if x.ndim == 2 else 1)
    _check(out, "out", dtypes=(torch.float32,), shape=(tokens, out_features) if x.ndim == 2 else (out_features,))
    threads = None
    if startrows is not None:
        if not isinstance(nnz_per_thread, int) or nnz_per_thread < 1:
            raise SqlabError(f"a balanced SpMV needs the nnz_per_thread its startrows were made with, "
                             f"got {nnz_per_thread!r}")
        threads = -(-nnz // nnz_per_thread)
        _check(startrows, "startrows", dtypes=(torch.int32,), shape=(threads,))
    device = _cuda_device(rows=rows, cols=cols, vals=vals, x=x, out=out, startrows=startrows)
    if nnz == 0 or tokens == 0:
        return out
    defines = (("X_KIND", _KIND[x.dtype]), ("VAL_KIND", _KIND[vals.dtype]))
    if startrows is None:
        _launch("spmv.cu", "spmv_rows", defines, (-(-out_features // 256),), (256,),
                (rows, cols, vals, x, out, out_features, in_features, tokens), 0, device)
    else:
        _launch("spmv.cu", "spmv_balanced", defines, (-(-threads // 256),), (256,),
                (rows, cols, vals, x, out, startrows, nnz, nnz_per_thread, threads, out_features, in_features,
                 tokens), 0, device)
    return out


# --- dequantization and the layer's forward ----------------------------------------------


def dequantize_packed(qweight: Tensor, lut: Tensor, wbits: int, in_features: int, csr: CSR | None = None,
                      dtype: torch.dtype = torch.float16) -> Tensor:
    """``W_hat = lut[row, index] + S`` as an ``(out_features, in_features)`` matrix on the GPU."""
    if dtype not in DTYPES:
        raise SqlabError(f"dtype must be {_NAMES}, got {dtype}")
    out_features = _check_packed(qweight, lut, wbits, in_features)
    sparse = csr is not None and csr.nnz > 0
    if sparse:
        _check_csr(csr, out_features, in_features)
    device = _cuda_device(qweight=qweight, lut=lut, **({"rows": csr.rows} if sparse else {}))
    weight = torch.empty((out_features, in_features), dtype=dtype, device=device)
    if not weight.numel():
        return weight
    defines = _gemv_defines(wbits, dtype, lut, csr, None)
    blocks = -(-out_features // 256)
    _launch("lut_gemv.cu", "dequantize_dense", defines, (blocks, -(-in_features // GROUP)), (256,),
            (qweight, lut, weight, in_features, out_features), 0, device)
    if sparse:  # stream-ordered after the dense part, which it overwrites at its positions
        _launch("lut_gemv.cu", "dequantize_sparse", defines, (blocks,), (256,),
                (qweight, lut, csr.rows, csr.cols, csr.vals, weight, in_features, out_features), 0, device)
    return weight


def dequantize(layer, dtype: torch.dtype = torch.float16) -> Tensor:
    """A ``SqueezeLinear``'s ``W_hat`` ``(out_features, in_features)`` in ``dtype``, on its GPU."""
    return dequantize_packed(layer.qweight, layer.lookup_table, layer.wbits, layer.in_features, layer.csr(), dtype)


def squeeze_linear_forward(layer, x: Tensor) -> Tensor:
    """``SqueezeLinear`` on the GPU: ``x (..., in_features)`` -> ``(..., out_features)`` in x's dtype.

    Up to ``MAX_GEMV_TOKENS`` tokens (decoding) run the LUT-GEMV with the sparse part
    fused; more (a prompt) dequantize to x's dtype once and use cuBLAS.
    """
    if x.shape[-1:] != (layer.in_features,):
        raise SqlabError(f"input has shape {tuple(x.shape)}; the layer takes (..., {layer.in_features})")
    if x.dtype not in DTYPES:
        raise SqlabError(f"the GPU kernels take {_NAMES} activations, got {x.dtype}")
    x2 = x.reshape(-1, layer.in_features).contiguous()
    if use_gemv(x2.shape[0]):
        y = lut_gemv(layer.qweight, layer.lookup_table, x2, layer.wbits, layer.in_features, csr=layer.csr(),
                     bias=layer.bias)
    else:
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = torch.nn.functional.linear(x2, dequantize(layer, x.dtype), bias)
    return y.reshape(*x.shape[:-1], layer.out_features)


__all__ = ["available", "use_gemv", "gemv_plan", "GemvPlan", "lut_gemv", "spmv", "dequantize", "dequantize_packed",
           "squeeze_linear_forward", "MAX_GEMV_TOKENS"]
