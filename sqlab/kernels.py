"""CUDA kernels for ``SqueezeLinear``, compiled at run time, launched with almost no host work.

``kernels/lut_gemv.cu`` holds the LUT-GEMV (1 to 8 tokens, the sparse part fused into
the same launch) and the dequantization for long prompts; ``kernels/spmv.cu`` the
sparse part on its own (row-parallel and balanced SpMV). Bit width, dtypes and tile
sizes are compile-time constants (``-DWBITS=3`` ...); each (source, options) pair is
compiled once per process.

Host cost. Decoding one token of a 7B model calls ~224 linears; Python work per call
multiplies by that. So a layer's launches are *prepared* once (``GemvKernels``, built
the first time a ``SqueezeLinear`` meets activations of a dtype on a device): shapes,
dtypes and the CSR part validated, the plan of every token count, the compiled
functions and cuLaunchKernel's parameter blocks, in which only the pointers of x and y
change between calls. A call then allocates y, writes two pointers and launches. It
runs on torch's current stream and never synchronises, so a decoding step can be
captured in a CUDA graph (``capture_scope`` gives each graph its own split-K counters).

Backends. Kernels launch through a ``Backend``: ``CupyBackend`` (the default: CuPy's
NVRTC and the CUDA driver) or a stand-in such as the test suite's CUDA-on-CPU harness,
which runs the same sources on host threads, so every line here runs in the tests
without a GPU. CuPy is optional: nothing imports it until a kernel is launched.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import check_wbits
from .errors import SqlabError
from .packing import CSR, GROUP, check_csr, packed_rows

KERNEL_DIR = Path(
    os.environ.get("SQLAB_KERNEL_DIR", Path(__file__).resolve().parents[1] / "kernels")
)

MAX_GEMV_TOKENS = 8  # more tokens (a prompt) dequantize once and use cuBLAS
SHARED_LIMIT = 48 * 1024  # per block, static + dynamic, without an opt-in attribute
STATIC_EXTRA = (
    16  # lut_gemv.cu's `last` flag beside the table, padded to the dynamic part's alignment
)
DQ_ROWS, DQ_GROUPS = 32, 8  # lut_gemv.cu's dequantization tile: W_hat rows x groups of 32 inputs
SPMV_THREADS = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # numeric.cuh's kinds
_NAMES = "float32, float16 or bfloat16"


# --- backends ------------------------------------------------------------------------------------


class Backend:
    """Where kernels run. Subclasses compile a source and launch cuLaunchKernel-style."""

    def unavailable_reason(self) -> str | None:
        """Why kernels cannot run here, in words; None when they can."""
        raise NotImplementedError

    def accepts(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can be handed to this backend's kernels."""
        raise NotImplementedError

    def function(self, file: str, name: str, defines: tuple, device: torch.device):
        """A handle of kernel ``name`` in ``file`` compiled with ``defines``, for ``device``."""
        raise NotImplementedError

    def launch(
        self, function, grid: tuple, block: tuple, shared: int, stream: int, params: int
    ) -> None:
        """Launch ``function``; ``params`` is the address of an array of argument addresses."""
        raise NotImplementedError

    def stream(self, device: torch.device) -> int:
        """The handle of the stream launches on ``device`` go to (torch's current stream)."""
        raise NotImplementedError

    def sm_count(self, device: torch.device) -> int:
        """Multiprocessors of ``device``: the plans fill them."""
        raise NotImplementedError

    def device_error(self, name: str, device: torch.device) -> str:
        return f"{name} is on {device}; the kernels need CUDA tensors"


class CupyBackend(Backend):
    """CUDA through CuPy: NVRTC compiles the sources, the driver launches on torch's stream."""

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "it needs a CUDA GPU and torch sees none"
        if _cupy() is None:
            return "it needs CuPy for the kernels (pip install -e '.[gpu]')"
        return None

    def accepts(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def function(self, file: str, name: str, defines: tuple, device: torch.device):
        return _cuda_function(file, name, defines, device.index if device.index is not None else 0)

    def launch(self, function, grid, block, shared, stream, params) -> None:
        _cupy().cuda.driver.launchKernel(function, *grid, *block, shared, stream, params, 0)

    def stream(self, device: torch.device) -> int:
        return _raw_stream(
            device.index if device.index is not None else torch.cuda.current_device()
        )

    def sm_count(self, device: torch.device) -> int:
        return _sm_count(device)


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except Exception:  # not installed, or built for another CUDA: the kernels are unavailable
        return None
    return cupy


def _raw_stream(index: int) -> int:
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter(index)
    return torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=None)
def _cuda_function(file: str, name: str, defines: tuple, index: int) -> int:
    """The CUfunction of ``name`` on device ``index`` (compiled and loaded once)."""
    cupy = _cupy()
    if cupy is None:
        raise SqlabError("the CUDA kernels need CuPy (pip install 'sqlab[gpu]', i.e. cupy-cuda12x)")
    with cupy.cuda.Device(index):
        return _module(_source(file), _options(defines)).get_function(name).kernel.ptr


@functools.lru_cache(maxsize=None)
def _module(source: str, options: tuple[str, ...]):
    return _cupy().RawModule(code=source, options=options)


_BACKEND: list[Backend] = [CupyBackend()]


def backend() -> Backend:
    """The backend kernels launch through now."""
    return _BACKEND[-1]


@contextlib.contextmanager
def use_backend(chosen: Backend):
    """Launch through ``chosen`` inside the block (the tests run the kernels on the CPU so)."""
    _BACKEND.append(chosen)
    try:
        yield chosen
    finally:
        _BACKEND.remove(chosen)


def available() -> bool:
    """True when kernels can be launched (with CuPy: CuPy imports and torch sees a GPU)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, in words; None when they can."""
    return backend().unavailable_reason()


def use_gemv(tokens: int) -> bool:
    """Whether ``tokens`` rows of activations go to the LUT-GEMV (else dequantize + matmul)."""
    return 1 <= tokens <= MAX_GEMV_TOKENS


# --- sources and parameter blocks ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source(file: str) -> str:
    """A kernel source with its local ``#include "x.cuh"`` lines inlined.

    Inlining keeps the compile key (source + options) complete: CuPy's on-disk cache
    does not look into included files.
    """
    path = KERNEL_DIR / file
    if not path.is_file():
        raise SqlabError(
            f"kernel source {path} not found; "
            "set SQLAB_KERNEL_DIR to the repository's kernels/ folder"
        )
    return re.sub(
        r'^#include "([\w.]+)"$', lambda m: _source(m.group(1)), path.read_text(), flags=re.M
    )


def _options(defines: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """The compiler options for a kernel module (tests pass the same ones to nvcc)."""
    return ("--std=c++17", *(f"-D{key}={value}" for key, value in defines))


class Params:
    """cuLaunchKernel's ``kernelParams``: a slot per argument and the array of their addresses.

    Tensors (and ``None``) become 64-bit pointers, ints C ``int``s. ``set(i, pointer)``
    changes one pointer in place, so a prepared launch rewrites only what varies.
    """

    def __init__(self, args: tuple):
        self.slots = [
            ctypes.c_int(a)
            if isinstance(a, int)
            else ctypes.c_void_p(0 if a is None else a.data_ptr())
            for a in args
        ]
        self.array = (ctypes.c_void_p * len(args))(*(ctypes.addressof(s) for s in self.slots))
        self.address = ctypes.addressof(self.array)


# --- checks at the boundary ----------------------------------------------------------------------


def _check(
    t: Tensor | None, name: str, *, dtypes: tuple | None = None, shape: tuple | None = None
) -> None:
    if not isinstance(t, Tensor):
        raise SqlabError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise SqlabError(
            f"{name} has dtype {str(t.dtype).replace('torch.', '')}; accepted: {accepted}"
        )
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise SqlabError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise SqlabError(f"{name} must be contiguous (call .contiguous() first)")


def _kernel_device(chosen: Backend, **tensors: Tensor | None) -> torch.device:
    """The one device all given tensors are on, which ``chosen`` must accept."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if not chosen.accepts(device):
            raise SqlabError(chosen.device_error(name, device))
        if device != first:
            raise SqlabError(f"{name} is on {device} but the other inputs are on {first}")
    return first


def _check_csr(
    csr: CSR, out_features: int, in_features: int, name: str = "the sparse part"
) -> None:
    _check(csr.rows, "rows", dtypes=(torch.int32,), shape=(out_features + 1,))
    nnz = csr.cols.numel()
    _check(csr.cols, "cols", dtypes=(torch.int32,), shape=(nnz,))
    _check(csr.vals, "vals", dtypes=DTYPES, shape=(nnz,))
    check_csr(csr, out_features, in_features, name)


def _check_packed(qweight: Tensor, lut: Tensor, wbits: int, in_features: int) -> int:
    """Check a packed layer's index matrix and LUT against each other; returns ``out_features``."""
    check_wbits(wbits)
    _check(qweight, "qweight", dtypes=(torch.int32,))
    if qweight.ndim != 2 or qweight.shape[0] != packed_rows(in_features, wbits):
        raise SqlabError(
            f"qweight has shape {tuple(qweight.shape)}; {wbits}-bit packing of {in_features} "
            f"inputs needs ({packed_rows(in_features, wbits)}, out_features)"
        )
    out_features = qweight.shape[1]
    _check(lut, "lut", dtypes=DTYPES, shape=(out_features, 1 << wbits))
    return out_features


def check_parts(
    qweight: Tensor,
    lut: Tensor,
    wbits: int,
    in_features: int,
    csr: CSR | None,
    bias: Tensor | None,
    name: str = "the layer",
) -> int:
    """Check a packed layer's buffers once, before kernels index memory with them;
    returns ``out_features``.

    Shapes and dtypes of ``qweight``/``lut``/``bias``, and the sparse part's structure
    (``sqlab.packing.check_csr``). Shared by the GPU launches and the CPU kernel.
    """
    out_features = _check_packed(qweight, lut, wbits, in_features)
    if csr is not None and csr.nnz > 0:
        _check_csr(csr, out_features, in_features, name)
    if bias is not None:
        _check(bias, "bias", dtypes=DTYPES, shape=(out_features,))
    return out_features


def _tokens_2d(x: Tensor, in_features: int, name: str = "x") -> Tensor:
    if x.ndim not in (1, 2) or x.shape[-1] != in_features:
        raise SqlabError(
            f"{name} has shape {tuple(x.shape)}; expected ({in_features},) or (tokens, "
            f"{in_features})"
        )
    return x.reshape(-1, in_features)


# --- LUT-GEMV plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    """The LUT-GEMV's tile: compile-time constants of lut_gemv.cu and how far K is split.

    ``tuple``: indices resolved by one table lookup (2: pairs of 16-bit weights, a table
    of ``2**(2*wbits)`` entries per column; 1: single fp32 weights). ``depth``: groups per
    thread whose words are loaded before the first of them is decoded. The grid's K
    slices grow until it has about ``blocks_per_sm`` blocks per SM (rounded down to a power
    of two of slices), leaving every dense thread row at least ``min_groups`` groups.
    """

    bn: int  # output columns per block (a power of two, at least 32)
    ky: int  # thread rows per block sharing the dense work
    tuple: int
    depth: int
    blocks_per_sm: int
    min_groups: int

    def table_bytes(self, wbits: int) -> int:
        return (1 << wbits * self.tuple) * self.bn * 4


# Measured on an H100 (benchmarks/tune_gemv.py): 16-bit activations look weights up in
# pairs, 4-bit ones from a 256-entry table per column (32 KB at 32 columns per block).
_PAIRS = {
    3: GemvConfig(bn=64, ky=4, tuple=2, depth=2, blocks_per_sm=4, min_groups=8),
    4: GemvConfig(bn=32, ky=4, tuple=2, depth=2, blocks_per_sm=4, min_groups=8),
}
_SINGLES = GemvConfig(bn=64, ky=4, tuple=1, depth=2, blocks_per_sm=4, min_groups=8)
_OVERRIDE: contextvars.ContextVar[GemvConfig | None] = contextvars.ContextVar(
    "sqlab_gemv_config", default=None
)


def gemv_config(wbits: int, x_dtype: torch.dtype) -> GemvConfig:
    """The tile the LUT-GEMV uses for ``wbits`` weights and ``x_dtype`` activations."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    return _SINGLES if x_dtype == torch.float32 else _PAIRS[wbits]


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value):
    """``var`` holds ``value`` inside the ``with`` block, and what it held before after it."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def gemv_config_override(config: GemvConfig):
    """Layers prepared inside use ``config`` (benchmarks/tune_gemv.py sweeps tiles with it)."""
    return _scoped(_OVERRIDE, config)


def _x_bytes(config: GemvConfig, x_dtype: torch.dtype) -> int:
    """Bytes per staged input: fp16 pairs (HALF2) keep x as fp16, every other path as fp32."""
    return 2 if config.tuple == 2 and x_dtype == torch.float16 else 4


def _gemv_defines(
    wbits: int,
    dtype: torch.dtype,
    lut: Tensor,
    csr: CSR | None,
    bias: Tensor | None,
    config: GemvConfig | None = None,
) -> tuple:
    """lut_gemv.cu's compile-time constants; absent parts take x's kind (one module serves all)."""
    vals = csr.vals.dtype if csr is not None and csr.nnz else dtype
    config = config or gemv_config(wbits, dtype)
    return (
        ("WBITS", wbits),
        ("X_KIND", _KIND[dtype]),
        ("LUT_KIND", _KIND[lut.dtype]),
        ("VAL_KIND", _KIND[vals]),
        ("BIAS_KIND", _KIND[dtype if bias is None else bias.dtype]),
        ("BN", config.bn),
        ("KY", config.ky),
        ("TUPLE", config.tuple),
        ("DEPTH", config.depth),
    )


@dataclass(frozen=True)
class GemvPlan:
    """Launch geometry of one LUT-GEMV call."""

    config: GemvConfig
    grid: tuple[int, int]  # (column blocks, K slices)
    block: tuple[int, int]  # (bn, ky [+ 1 sparse row])
    groups_per_block: int  # groups of 32 inputs in each K slice
    shared: int  # dynamic shared memory, bytes
    static_shared: int  # the kernel's static shared memory (the table and a flag), bytes

    @property
    def splits(self) -> int:
        return self.grid[1]


def gemv_plan(
    in_features: int,
    out_features: int,
    wbits: int,
    tokens: int,
    x_dtype: torch.dtype,
    sparse: bool,
    sm_count: int,
    splits: int | None = None,
    config: GemvConfig | None = None,
) -> GemvPlan:
    """Grid, block and shared memory for ``lut_gemv`` (mirrors lut_gemv.cu's layout).

    K is split into slices until the grid has about ``config.blocks_per_sm`` blocks per SM,
    rounded down to a power of two of slices (``splits`` overrides this), within the
    shared-memory budget for x's slice.
    """
    if not 1 <= tokens <= MAX_GEMV_TOKENS:
        raise SqlabError(f"the LUT-GEMV takes 1 to {MAX_GEMV_TOKENS} tokens, got {tokens}")
    if in_features < 1 or out_features < 1:
        raise SqlabError(
            f"the LUT-GEMV needs at least one input and one output, got {in_features} -> "
            f"{out_features}"
        )
    # static shared: one 32-bit word per table entry and column, and the flag; both count
    # towards the limit, so a plan that filled it with x alone would fail to launch
    config = config or gemv_config(wbits, x_dtype)
    table = config.table_bytes(wbits) + STATIC_EXTRA
    rows = config.ky + int(sparse)
    sums = rows * tokens * config.bn * 4
    x_group = tokens * GROUP * _x_bytes(config, x_dtype)
    max_groups = (SHARED_LIMIT - table - sums) // x_group
    if max_groups < 1:
        raise SqlabError(
            f"the LUT-GEMV tile {config} does not fit {SHARED_LIMIT} bytes of shared memory "
            f"at {tokens} tokens (table {table}, sums {sums}, one group of x {x_group})"
        )
    groups = -(-in_features // GROUP)
    col_blocks = -(-out_features // config.bn)
    if splits is None:
        want = -(-config.blocks_per_sm * sm_count // col_blocks)
        want = 1 << (want.bit_length() - 1)  # a power of two: see benchmarks/results/README.md
        per_block = max(-(-groups // want), config.min_groups)
    else:
        if not isinstance(splits, int) or splits < 1:
            raise SqlabError(f"splits must be a positive integer, got {splits!r}")
        per_block = -(-groups // splits)
    per_block = max(1, min(per_block, max_groups, groups))
    splits = -(-groups // per_block)
    per_block = -(-groups // splits)  # even out the slices
    return GemvPlan(
        config,
        (col_blocks, splits),
        (config.bn, rows),
        per_block,
        per_block * x_group + sums,
        table,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# --- split-K counters for captured graphs --------------------------------------------------------


class CounterArena:
    """Zeroed split-K counters for the launches captured into one CUDA graph.

    Inside ``capture_scope(arena)`` every split launch takes its own slice, so graphs
    never share counters with each other or with eager calls (a complete launch leaves
    its counters at zero again, ready for the next replay).
    """

    def __init__(self, device: torch.device, size: int = 1 << 16):
        self.counters = torch.zeros(size, dtype=torch.int32, device=device)
        self.used = 0

    def take(self, n: int) -> int:
        if self.used + n > self.counters.numel():
            raise SqlabError(
                f"the graph needs more than {self.counters.numel()} split-K counters; "
                "make a CounterArena with a larger size"
            )
        pointer = self.counters[self.used :].data_ptr()
        self.used += n
        return pointer

    def reset(self) -> None:
        """Zero every counter again (after an interrupted replay)."""
        self.counters.zero_()


_ARENA: contextvars.ContextVar[CounterArena | None] = contextvars.ContextVar(
    "sqlab_counter_arena", default=None
)


def capture_scope(arena: CounterArena):
    """Launches inside take their split-K counters and workspaces for one captured graph."""
    return _scoped(_ARENA, arena)


# --- a layer's prepared launches -----------------------------------------------------------------

# positions of the arguments that vary between calls in lut_gemv's parameter list
_X, _PARTIAL, _COUNTERS, _Y = 2, 7, 8, 9


class _Launch:
    """One token count's prepared LUT-GEMV launch: geometry, parameter block, the varying slots."""

    __slots__ = (
        "tokens",
        "plan",
        "params",
        "grid",
        "block",
        "shared",
        "x",
        "y",
        "function",
        "counters",
        "workspace",
    )

    def __init__(self, tokens: int, plan: GemvPlan, params: Params):
        self.tokens, self.plan, self.params = tokens, plan, params
        self.grid, self.block, self.shared = (*plan.grid, 1), (*plan.block, 1), plan.shared
        self.x, self.y = params.slots[_X], params.slots[_Y]
        self.function = None  # compiled on first use
        self.counters: Tensor | None = (
            None  # split-K only: the layer's own counters and partial sums
        )
        self.workspace: Tensor | None = None


class GemvKernels:
    """Everything a packed layer's GPU calls need that does not change between calls.

    Built once per layer, device and activation dtype: validates the buffers (shapes,
    dtypes, devices, the CSR part's structure), plans every token count, and holds the
    parameter blocks. ``__call__`` runs ``y = x @ W_hat.T (+ S x) (+ bias)`` for 1 to 8
    tokens with one launch; more tokens dequantize and use a matmul.
    """

    def __init__(
        self,
        qweight: Tensor,
        lut: Tensor,
        wbits: int,
        in_features: int,
        dtype: torch.dtype,
        csr: CSR | None = None,
        bias: Tensor | None = None,
        name: str = "SqueezeLinear",
        splits: int | None = None,
        chosen: Backend | None = None,
    ):
        if dtype not in DTYPES:
            raise SqlabError(f"the kernels take {_NAMES} activations, got {dtype}")
        self.out_features = check_parts(qweight, lut, wbits, in_features, csr, bias, name)
        self.in_features, self.wbits, self.dtype = in_features, wbits, dtype
        self.sparse = csr is not None and csr.nnz > 0
        self.csr = csr if self.sparse else None
        self.backend = chosen or backend()
        parts = {"qweight": qweight, "lut": lut, "bias": bias}
        if self.sparse:
            parts.update(rows=csr.rows, cols=csr.cols, vals=csr.vals)
        self.device = _kernel_device(self.backend, **parts)
        reason = self.backend.unavailable_reason()
        if reason:
            raise SqlabError(f"the kernels cannot run: {reason}")
        self.device_index = self.device.index if self.device.index is not None else -1
        self.qweight, self.lut, self.bias = qweight, lut, bias
        self.config = gemv_config(wbits, dtype)
        self.defines = _gemv_defines(wbits, dtype, lut, self.csr, bias, self.config)
        self._launches: list[_Launch | None] = [None] * (MAX_GEMV_TOKENS + 1)
        self._out_shapes: dict = {}  # x's shape -> y's, built once per shape
        if self.out_features and in_features:  # else nothing to launch (see __call__)
            sms = self.backend.sm_count(self.device)
            for tokens in range(1, MAX_GEMV_TOKENS + 1):
                self._launches[tokens] = self._prepare(tokens, sms, splits)

    def _prepare(self, tokens: int, sms: int, splits: int | None) -> _Launch:
        plan = gemv_plan(
            self.in_features,
            self.out_features,
            self.wbits,
            tokens,
            self.dtype,
            self.sparse,
            sms,
            splits,
            self.config,
        )
        rows, cols, vals = (
            (self.csr.rows, self.csr.cols, self.csr.vals) if self.sparse else (None, None, None)
        )
        launch = _Launch(
            tokens,
            plan,
            Params(
                (
                    self.qweight,
                    self.lut,
                    None,
                    rows,
                    cols,
                    vals,
                    self.bias,
                    None,
                    None,
                    None,
                    self.in_features,
                    self.out_features,
                    plan.groups_per_block,
                )
            ),
        )
        if plan.splits > 1:
            launch.counters = torch.zeros(plan.grid[0], dtype=torch.int32, device=self.device)
            launch.params.slots[_COUNTERS].value = launch.counters.data_ptr()
        return launch

    def resident(self) -> tuple[Tensor, ...]:
        """The tensors this layer's launches keep (split-K counters and partial sums)."""
        return tuple(
            t
            for launch in self._launches[1:]
            if launch is not None
            for t in (launch.counters, launch.workspace)
            if t is not None
        )

    def reset_counters(self) -> None:
        """Zero this layer's split-K counters (a complete launch leaves them at zero)."""
        for launch in self._launches[1:]:
            if launch is not None and launch.counters is not None:
                launch.counters.zero_()

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise SqlabError(
                f"input has shape {tuple(shape)}; the layer takes (..., {self.in_features})"
            )
        if not x.is_contiguous():
            x = x.contiguous()
        tokens = x.numel() // self.in_features if self.in_features else 0
        launch = self._launches[tokens] if tokens <= MAX_GEMV_TOKENS else None
        if launch is None:
            return self._matmul(x)
        if out is None:
            out_shape = self._out_shapes.get(shape)
            if out_shape is None:
                out_shape = self._out_shapes[shape] = (*shape[:-1], self.out_features)
            out = x.new_empty(out_shape)
        if launch.function is None:
            launch.function = self.backend.function(
                "lut_gemv.cu", f"lut_gemv_{tokens}", self.defines, self.device
            )
        launch.x.value = x.data_ptr()
        launch.y.value = out.data_ptr()
        if launch.counters is not None:
            arena = _ARENA.get()
            if arena is not None:
                self._launch_captured(launch, arena)
                return out
            if launch.workspace is None:
                launch.workspace = self._workspace(launch)
                launch.params.slots[_PARTIAL].value = launch.workspace.data_ptr()
        self._launch(launch)
        return out

    def _launch(self, launch: _Launch) -> None:
        self.backend.launch(
            launch.function,
            launch.grid,
            launch.block,
            launch.shared,
            self.backend.stream(self.device),
            launch.params.address,
        )

    def _launch_captured(self, launch: _Launch, arena: CounterArena) -> None:
        """A launch for a graph: the graph's own counters and partial sums, not the layer's."""
        slots = launch.params.slots
        slots[_COUNTERS].value = arena.take(launch.plan.grid[0])
        # from the graph's memory pool; alive until the launch is recorded, after which the
        # pool may hand it to later launches of the same graph, which run after this one
        workspace = self._workspace(launch)
        slots[_PARTIAL].value = workspace.data_ptr()
        try:
            self._launch(launch)
        finally:
            slots[_COUNTERS].value = launch.counters.data_ptr()
            slots[_PARTIAL].value = 0 if launch.workspace is None else launch.workspace.data_ptr()

    def _workspace(self, launch: _Launch) -> Tensor:
        """fp32 partial sums, (splits, tokens, out_features)."""
        return torch.empty(
            (launch.plan.splits, launch.tokens, self.out_features),
            dtype=torch.float32,
            device=self.device,
        )

    def _matmul(self, x: Tensor) -> Tensor:
        """A prompt (more than 8 tokens), or a layer without inputs: ``W_hat`` once,
        then a matmul.
        """
        bias = None if self.bias is None else self.bias.to(self.dtype)
        return torch.nn.functional.linear(x, self.dequantize(), bias)

    def dequantize(self) -> Tensor:
        """``W_hat`` ``(out_features, in_features)`` in the activation dtype, by the kernels."""
        return dequantize_packed(
            self.qweight,
            self.lut,
            self.wbits,
            self.in_features,
            self.csr,
            self.dtype,
            chosen=self.backend,
            checked=True,
        )


def lut_gemv(
    qweight: Tensor,
    lut: Tensor,
    x: Tensor,
    wbits: int,
    in_features: int,
    out: Tensor | None = None,
    *,
    csr: CSR | None = None,
    bias: Tensor | None = None,
    splits: int | None = None,
) -> Tensor:
    """``y = x @ W_hat.T (+ S x) (+ bias)`` straight from the packed weights, for 1-8 tokens.

    ``qweight`` int32 ``(ceil(in/32)·wbits, out)``, ``lut`` ``(out, 2**wbits)``, ``x``
    ``(tokens, in)`` or ``(in,)`` in float16/float32/bfloat16; ``csr`` the optional
    sparse part (added in the same launch), ``bias`` ``(out,)``. Returns ``y``
    ``(tokens, out)`` (or ``(out,)``) in x's dtype, written into ``out`` if given.
    The weights are read once for all tokens; sums are fp32 (fp16 within a group of 32
    for 3-bit weights with fp16 activations).

    Every argument is checked on every call; a layer that is called repeatedly keeps a
    ``GemvKernels`` instead (``SqueezeLinear`` does), which checks once.
    """
    out_features = _check_packed(qweight, lut, wbits, in_features)
    x2 = _tokens_2d(x, in_features)
    _check(x2, "x", dtypes=DTYPES)
    tokens = x2.shape[0]
    if not 1 <= tokens <= MAX_GEMV_TOKENS:
        raise SqlabError(
            f"lut_gemv takes 1 to {MAX_GEMV_TOKENS} tokens, got {tokens}; "
            "for more, dequantize() and use a matmul"
        )
    y_shape = (tokens, out_features) if x.ndim == 2 else (out_features,)
    if out is not None:
        _check(out, "out", dtypes=(x.dtype,), shape=y_shape)
        if _overlaps(out, x):
            raise SqlabError(
                "out overlaps x; the kernel reads x while it writes out, so give a separate buffer"
            )
    kernel = GemvKernels(qweight, lut, wbits, in_features, x.dtype, csr, bias, splits=splits)
    _kernel_device(kernel.backend, qweight=qweight, x=x, out=out)
    return kernel(x, out)


def _overlaps(a: Tensor, b: Tensor) -> bool:
    start_a, start_b = a.data_ptr(), b.data_ptr()
    end_a, end_b = start_a + a.numel() * a.element_size(), start_b + b.numel() * b.element_size()
    return a.numel() > 0 and b.numel() > 0 and start_a < end_b and start_b < end_a


# --- sparse part ---------------------------------------------------------------------------------


def spmv(
    rows: Tensor,
    cols: Tensor,
    vals: Tensor,
    x: Tensor,
    out: Tensor,
    startrows: Tensor | None = None,
    nnz_per_thread: int | None = None,
) -> Tensor:
    """``out += S @ x`` for the CSR matrix ``S`` (``rows`` ``(out_features + 1,)``).

    ``x`` is ``(tokens, in_features)`` or ``(in_features,)``; ``out`` float32 of
    shape ``(tokens, out_features)`` (or ``(out_features,)``), accumulated in place
    and returned. Row-parallel by default; with ``startrows`` from
    ``sqlab.packing.balanced_startrows(rows, nnz_per_thread)`` each thread takes
    ``nnz_per_thread`` stored values instead, which balances skewed rows.
    """
    _check(rows, "rows", dtypes=(torch.int32,))
    if rows.ndim != 1 or rows.numel() < 1:
        raise SqlabError(
            f"rows must be the (out_features + 1,) row pointers, got shape {tuple(rows.shape)}"
        )
    out_features, nnz = rows.numel() - 1, cols.numel()
    _check(cols, "cols", dtypes=(torch.int32,), shape=(nnz,))
    _check(vals, "vals", dtypes=DTYPES, shape=(nnz,))
    _check(x, "x", dtypes=DTYPES)
    if x.ndim not in (1, 2):
        raise SqlabError(
            f"x must be (in_features,) or (tokens, in_features), got shape {tuple(x.shape)}"
        )
    in_features, tokens = x.shape[-1], (x.shape[0] if x.ndim == 2 else 1)
    _check(
        out,
        "out",
        dtypes=(torch.float32,),
        shape=(tokens, out_features) if x.ndim == 2 else (out_features,),
    )
    threads = None
    if startrows is not None:
        if not isinstance(nnz_per_thread, int) or nnz_per_thread < 1:
            raise SqlabError(
                f"a balanced SpMV needs the nnz_per_thread its startrows were made with, "
                f"got {nnz_per_thread!r}"
            )
        threads = -(-nnz // nnz_per_thread)
        _check(startrows, "startrows", dtypes=(torch.int32,), shape=(threads,))
    chosen = backend()
    device = _kernel_device(
        chosen, rows=rows, cols=cols, vals=vals, x=x, out=out, startrows=startrows
    )
    check_csr(CSR(rows, cols, vals), out_features, in_features)
    if startrows is not None:
        _check_startrows(rows, startrows, nnz_per_thread)
    if nnz == 0 or tokens == 0:
        return out
    defines = (("X_KIND", _KIND[x.dtype]), ("VAL_KIND", _KIND[vals.dtype]))
    if startrows is None:
        _launch_once(
            chosen,
            device,
            "spmv.cu",
            "spmv_rows",
            defines,
            (-(-out_features // SPMV_THREADS),),
            (rows, cols, vals, x, out, out_features, in_features, tokens),
        )
    else:
        _launch_once(
            chosen,
            device,
            "spmv.cu",
            "spmv_balanced",
            defines,
            (-(-threads // SPMV_THREADS),),
            (
                rows,
                cols,
                vals,
                x,
                out,
                startrows,
                nnz,
                nnz_per_thread,
                threads,
                out_features,
                in_features,
                tokens,
            ),
        )
    return out


def _check_startrows(rows: Tensor, startrows: Tensor, nnz_per_thread: int) -> None:
    """Each thread's first row must hold its first stored value (the kernel walks from there)."""
    first = torch.arange(startrows.numel(), device=rows.device, dtype=torch.int64) * nnz_per_thread
    start = startrows.long()
    if startrows.numel() and (
        bool((start < 0).any())
        or bool((start >= rows.numel() - 1).any())
        or bool((rows.long()[start] > first).any())
        or bool((rows.long()[start + 1] <= first).any())
    ):
        raise SqlabError(
            f"startrows do not match rows for {nnz_per_thread} values per thread; make them with "
            "sqlab.packing.balanced_startrows(rows, nnz_per_thread)"
        )


def _launch_once(
    chosen: Backend,
    device: torch.device,
    file: str,
    name: str,
    defines: tuple,
    grid: tuple,
    args: tuple,
    block: tuple = (SPMV_THREADS,),
) -> None:
    """An unprepared launch (checked by the caller);
    ``grid``/``block`` of up to three dimensions.
    """
    params = Params(args)
    pad = lambda dims: (*dims, *(1,) * (3 - len(dims)))  # noqa: E731
    chosen.launch(
        chosen.function(file, name, defines, device),
        pad(grid),
        pad(block),
        0,
        chosen.stream(device),
        params.address,
    )


# --- dequantization ------------------------------------------------------------------------------


def dequantize_packed(
    qweight: Tensor,
    lut: Tensor,
    wbits: int,
    in_features: int,
    csr: CSR | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    chosen: Backend | None = None,
    checked: bool = False,
) -> Tensor:
    """``W_hat = lut[row, index] + S`` as an ``(out_features, in_features)`` matrix on the GPU.

    ``checked``: the caller (a ``GemvKernels``) has validated the buffers already.
    """
    if dtype not in DTYPES:
        raise SqlabError(f"dtype must be {_NAMES}, got {dtype}")
    chosen = chosen or backend()
    sparse = csr is not None and csr.nnz > 0
    if not checked:
        out_features = _check_packed(qweight, lut, wbits, in_features)
        if sparse:
            _check_csr(csr, out_features, in_features)
    out_features = lut.shape[0]
    device = _kernel_device(
        chosen, qweight=qweight, lut=lut, **({"rows": csr.rows} if sparse else {})
    )
    weight = torch.empty((out_features, in_features), dtype=dtype, device=device)
    if not weight.numel():
        return weight
    defines = _gemv_defines(wbits, dtype, lut, csr, None)
    _launch_once(
        chosen,
        device,
        "lut_gemv.cu",
        "dequantize_dense",
        defines,
        (-(-out_features // DQ_ROWS), -(-in_features // (GROUP * DQ_GROUPS))),
        (qweight, lut, weight, in_features, out_features),
        block=(DQ_ROWS * DQ_GROUPS,),
    )
    if sparse:  # stream-ordered after the dense part, which it overwrites at its positions
        _launch_once(
            chosen,
            device,
            "lut_gemv.cu",
            "dequantize_sparse",
            defines,
            (-(-out_features // SPMV_THREADS),),
            (qweight, lut, csr.rows, csr.cols, csr.vals, weight, in_features, out_features),
        )
    return weight


def dequantize(layer, dtype: torch.dtype = torch.float16) -> Tensor:
    """A ``SqueezeLinear``'s ``W_hat`` ``(out_features, in_features)`` in ``dtype``, on its GPU."""
    return dequantize_packed(
        layer.qweight, layer.lookup_table, layer.wbits, layer.in_features, layer.csr(), dtype
    )


__all__ = [
    "available",
    "use_gemv",
    "gemv_plan",
    "GemvPlan",
    "GemvKernels",
    "lut_gemv",
    "spmv",
    "dequantize",
    "dequantize_packed",
    "Backend",
    "CupyBackend",
    "use_backend",
    "backend",
    "CounterArena",
    "capture_scope",
    "MAX_GEMV_TOKENS",
]
