"""The CPU LUT-GEMV: packed 3/4-bit weights decoded on the fly, compiled at first use.

``kernels/lut_gemv_cpu.cpp`` is compiled once per machine with the system C++ compiler
(``-O3 -march=native -fopenmp``; cached under ``data/cache/cpu_kernels`` by source, flags,
compiler and CPU), so users need no build step. Its OpenMP threads are torch's own: the
library links ``libgomp.so.1``, which resolves to the copy torch already loaded, so
``torch.set_num_threads`` governs both and they never compete for cores.

``CpuGemv`` is a layer's prepared CPU path, the twin of ``kernels.GemvKernels``: built once
(buffers validated, each row's centroids as an fp32 table of 16), called with 1 to 8
tokens it reads ``qweight``, the table and the CSR part directly and keeps no dequantized
weight; more tokens (a prompt) dequantize a block of rows at a time and use a matmul.
Without a compiler ``available()`` says why, and ``SqueezeLinear`` falls back to its
dequantized weights.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from . import files, kernels
from .assets import cache_dir
from .errors import SqlabError
from .packing import CSR, GROUP

log = logging.getLogger(__name__)

SOURCE = "lut_gemv_cpu.cpp"
KMEANS_SOURCE = "kmeans_dp.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-fPIC", "-shared")
MAX_TOKENS = 8
PREFILL_BLOCK = 1 << 22  # weights dequantized at a time for a prompt (16 MB of fp32)


class _Args(ctypes.Structure):
    """``struct SqGemv`` of lut_gemv_cpu.cpp."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("qweight", "table", "rows", "cols", "vals", "bias", "x", "y")
    ] + [(name, ctypes.c_int32) for name in ("K", "N", "wbits", "tokens", "x_stride")]


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else g++, c++ or clang++ on the PATH."""
    named = os.environ.get("CXX")
    if named:
        return shutil.which(named) or named
    return next((found for c in ("g++", "c++", "clang++") if (found := shutil.which(c))), None)


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    try:
        flags = next(
            (
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            "",
        )
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.lru_cache(maxsize=None)
def library(flags: tuple[str, ...] = FLAGS, source_name: str = SOURCE) -> ctypes.CDLL:
    """A compiled CPU kernel library of ``kernels/``
    (compiled on first use, then loaded from the cache).
    """
    cxx = compiler()
    if cxx is None:
        raise SqlabError(
            "no C++ compiler found (g++, c++ or clang++; or set CXX): the CPU kernel cannot be "
            "built (apt-get install g++)"
        )
    source = kernels.KERNEL_DIR / source_name
    if not source.is_file():
        raise SqlabError(
            f"kernel source {source} not found; "
            "set SQLAB_KERNEL_DIR to the repository's kernels/ folder"
        )
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError as exc:
        raise SqlabError(f"the C++ compiler {cxx!r} does not run: {exc}") from exc
    key = hashlib.sha256(
        "\0".join([source.read_text(), *flags, cxx, version, _cpu_signature()]).encode()
    )
    folder = cache_dir("cpu_kernels")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem}-{key.hexdigest()[:20]}.so"
    if not target.exists():
        with files.atomic_path(target) as tmp:  # another process may be compiling the same source
            done = subprocess.run(
                [cxx, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True
            )
            if done.returncode:
                raise SqlabError(f"{cxx} could not compile {source}:\n{done.stderr[-3000:]}")
    lib = ctypes.CDLL(str(target))
    if source_name == SOURCE:
        lib.sq_gemv.argtypes = [ctypes.c_void_p]
        lib.sq_dequantize.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.c_void_p,
        ]
        for function in (lib.sq_gemv, lib.sq_dequantize, lib.sq_vectorized):
            function.restype = ctypes.c_int
    elif source_name == KMEANS_SOURCE:
        lib.sq_kmeans_dp.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            *[ctypes.c_int] * 3,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        lib.sq_assign.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            *[ctypes.c_int] * 3,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        for function in (lib.sq_kmeans_dp, lib.sq_assign):
            function.restype = ctypes.c_int
    return lib


def unavailable_reason() -> str | None:
    """Why the CPU kernel cannot be used here, in words; None when it can."""
    if os.environ.get("SQLAB_CPU_KERNEL", "1") == "0":
        return "SQLAB_CPU_KERNEL=0 turns it off"
    try:
        library()
    except SqlabError as exc:
        return str(exc)
    return None


def available() -> bool:
    return unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def _built(source_name: str) -> bool:
    try:
        library(source_name=source_name)
    except SqlabError:
        return False
    return True


def ready(source_name: str) -> bool:
    """Whether a program of ``kernels/`` can run here, for paths that ask on every call: a
    failed build is tried once per process, not again on every call."""
    return os.environ.get("SQLAB_CPU_KERNEL", "1") != "0" and _built(source_name)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuGemv:
    """A packed layer's CPU calls, prepared once: ``y = x @ W_hat.T (+ S x) (+ bias)``.

    ``dtype`` is the activations' dtype; sums are fp32 and y comes back in ``dtype``. The
    table holds every centroid as W_hat holds it in ``dtype`` (through the sparse values'
    dtype first, as ``sqlab.packing.reconstruct`` computes), 16 fp32 entries a row.
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
        flags: tuple[str, ...] = FLAGS,
    ):
        if dtype not in kernels.DTYPES:
            raise SqlabError(
                f"the CPU kernel takes float32, float16 or bfloat16 activations, got {dtype}"
            )
        self.out_features = kernels.check_parts(qweight, lut, wbits, in_features, csr, bias, name)
        for tensor, what in ((qweight, "qweight"), (lut, "lut")):
            if tensor.device.type != "cpu":
                raise SqlabError(f"{what} is on {tensor.device}; the CPU kernel needs CPU tensors")
        self.lib = library(flags)
        self.in_features, self.wbits, self.dtype = in_features, wbits, dtype
        self.device_index = -1  # what Tensor.get_device() says for CPU tensors
        sparse = csr is not None and csr.nnz > 0
        weights = lut.to(csr.vals.dtype if sparse else dtype).to(dtype).float()  # (N, 2^wbits)
        self.table = (
            torch.cat([weights, weights], 1) if wbits == 3 else weights
        ).contiguous()  # (N, 16)
        self.qweight = qweight
        self.rows, self.cols = (csr.rows, csr.cols) if sparse else (None, None)
        self.vals = csr.vals.float().contiguous() if sparse else None
        self.bias = None if bias is None else bias.float().contiguous()
        self.x_stride = -(-in_features // GROUP) * GROUP
        self.args = _Args(
            *(
                _pointer(t)
                for t in (qweight, self.table, self.rows, self.cols, self.vals, self.bias)
            ),
            None,
            None,
            in_features,
            self.out_features,
            wbits,
            0,
            self.x_stride,
        )
        self._address = ctypes.addressof(self.args)
        self._out_shapes: dict = {}

    def resident(self) -> tuple[Tensor, ...]:
        """The tensors this kernel keeps beside the layer's buffers (for memory accounting)."""
        return tuple(t for t in (self.table, self.vals, self.bias) if t is not None)

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise SqlabError(
                f"input has shape {tuple(shape)}; the layer takes (..., {self.in_features})"
            )
        tokens = x.numel() // self.in_features if self.in_features else 0
        if not 1 <= tokens <= MAX_TOKENS or not self.out_features:
            return self._prefill(x)
        if x.dtype != torch.float32 or not x.is_contiguous() or self.x_stride != self.in_features:
            x = torch.nn.functional.pad(
                x.reshape(tokens, self.in_features).float(), (0, self.x_stride - self.in_features)
            )
        out_shape = self._out_shapes.get(shape)
        if out_shape is None:
            out_shape = self._out_shapes[shape] = (*shape[:-1], self.out_features)
        y = torch.empty(out_shape, dtype=torch.float32)
        args = self.args
        args.x, args.y, args.tokens = x.data_ptr(), y.data_ptr(), tokens
        self.lib.sq_gemv(self._address)
        return y if self.dtype == torch.float32 else y.to(self.dtype)

    def dequantize(
        self, row0: int = 0, row1: int | None = None, out: Tensor | None = None
    ) -> Tensor:
        """Rows ``[row0, row1)`` of ``W_hat`` as fp32, ``(row1 - row0, in_features)``."""
        row1 = self.out_features if row1 is None else row1
        if out is None:
            out = torch.empty(row1 - row0, self.in_features)
        if row1 > row0 and self.in_features:
            self.lib.sq_dequantize(self._address, row0, row1, out.data_ptr())
        return out[: row1 - row0]

    def _prefill(self, x: Tensor) -> Tensor:
        """More than 8 tokens: a block of ``W_hat`` rows at a time, then a matmul
        (no whole copy is kept).
        """
        x2 = x.reshape(x.shape[:-1].numel(), self.in_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
        rows = max(GROUP, PREFILL_BLOCK // max(self.in_features, 1))
        scratch = torch.empty(min(rows, self.out_features), self.in_features)
        for row0 in range(0, self.out_features, rows):
            row1 = min(row0 + rows, self.out_features)
            w = self.dequantize(row0, row1, scratch)
            y[:, row0:row1] = x2 @ (w if x.dtype == torch.float32 else w.to(x.dtype)).T
        if self.bias is not None:
            y += self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


@functools.lru_cache(maxsize=None)
def warn_unavailable(reason: str) -> None:
    """Say once why packed layers on the CPU compute with dequantized weights."""
    log.warning(
        "sqlab: the CPU LUT-GEMV is not available (%s); SqueezeLinear on the CPU uses dequantized "
        "weights instead (more memory, slower decoding)",
        reason,
    )
