"""Run the unchanged ``kernels/*.cu`` on the CPU: g++ and host threads standing in for a GPU.

``CudaOnCpu`` is a ``sqlab.kernels.Backend``: with it active (``kernels.use_backend``),
every launch sqlab makes (``GemvKernels``, ``lut_gemv``, ``spmv``, the dequantization)
runs the real kernel source, compiled by the system ``g++`` against ``cuda_on_cpu.h``,
on CPU tensors, with the grid, block, shared memory and parameter block sqlab computed.
So the tests check the kernels and the launch path together, with no GPU.

Compiled libraries are cached by content (source, options, header, compiler flags) in
sqlab's cache directory, so a second test run starts at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sqlab import kernels
from sqlab.assets import cache_dir

HEADER = Path(__file__).with_name("cuda_on_cpu.h")
CXX = shutil.which("g++")
# -fno-gnu-unique and hidden visibility: every compiled variant keeps its own statics (its
# __shared__ arrays differ in size) instead of binding to the first library's of that name
FLAGS = (
    "-std=c++20",
    "-O1",
    "-fno-strict-aliasing",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-gnu-unique",
    "-fvisibility=hidden",
)
ORDERS = {"concurrent": 0, "forward": 1, "reverse": 2}


def unavailable_reason() -> str | None:
    return None if CXX else "the CUDA-on-CPU harness needs g++ (apt-get install g++)"


def _defines(options: tuple[str, ...]) -> list[str]:
    """The -D options of sqlab's compile options (the -std one is nvcc's, not ours)."""
    return [o for o in options if o.startswith("-D")]


def kernel_names(source: Path, options: tuple[str, ...]) -> list[str]:
    """Every ``__global__`` function of ``source``, macro-generated ones included."""
    done = subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-E",
            "-P",
            "-DCUDA_ON_CPU_FIND_KERNELS",
            "-include",
            str(HEADER),
            *_defines(options),
            "-x",
            "c++",
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"g++ could not preprocess {source}:\n{done.stderr[-3000:]}")
    return re.findall(r"__cuda_on_cpu_kernel__\s+void\s+(\w+)\s*\(", done.stdout)


@functools.lru_cache(maxsize=None)
def build(source_text: str, options: tuple[str, ...]) -> ctypes.CDLL:
    """The shared library of one kernel source compiled with ``options`` (cached on disk)."""
    key = hashlib.sha256(
        "\0".join([source_text, *options, HEADER.read_text(), *FLAGS]).encode()
    ).hexdigest()[:24]
    folder = cache_dir("cuda_on_cpu")
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"{key}.so"
    if not library.exists():
        source = folder / f"{key}.cu"
        source.write_text(source_text)
        names = kernel_names(source, options)
        wrapper = folder / f"{key}.cpp"
        table = ", ".join(f"CUDA_ON_CPU_KERNEL({n})" for n in names)
        wrapper.write_text(
            f'#include "{HEADER}"\n#include "{source}"\n'
            f"static const ::cuda_on_cpu::Kernel cuda_on_cpu_kernels[] = {{{table}}};\n"
            "CUDA_ON_CPU_EXPORT(cuda_on_cpu_kernels)\n"
        )
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
        os.close(fd)
        done = subprocess.run(
            [CXX, *FLAGS, *_defines(options), "-o", tmp, str(wrapper)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            os.unlink(tmp)
            raise RuntimeError(
                f"g++ could not compile {source} with {options}:\n{done.stderr[-6000:]}"
            )
        os.replace(tmp, library)
    lib = ctypes.CDLL(str(library))
    lib.cuda_on_cpu_launch.restype = ctypes.c_int
    lib.cuda_on_cpu_launch.argtypes = [
        ctypes.c_char_p,
        *[ctypes.c_uint] * 6,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return lib


class CudaOnCpu(kernels.Backend):
    """Kernels on CPU tensors, each block on ``blockDim`` host threads.

    ``order``: ``concurrent`` (threads race, barriers are real barriers), or ``forward``
    / ``reverse`` (one thread at a time in thread order or its reverse, blocks likewise:
    deterministic interleavings). ``sm_count`` is the GPU the plans are made for.
    ``source_override`` maps a kernel file name to other source text (a deliberately
    broken copy, in the test that proves the harness can fail).
    """

    def __init__(
        self, order: str = "concurrent", sm_count: int = 132, source_override: dict | None = None
    ):
        self.order = ORDERS[order]
        self.sms = sm_count
        self.override = dict(source_override or {})
        self.launches = 0

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()

    def accepts(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def device_error(self, name: str, device: torch.device) -> str:
        return f"{name} is on {device}; the CUDA-on-CPU harness runs kernels on CPU tensors"

    def sm_count(self, device: torch.device) -> int:
        return self.sms

    def stream(self, device: torch.device) -> int:
        return 0

    def function(self, file: str, name: str, defines: tuple, device: torch.device):
        source = self.override.get(file) or kernels._source(file)
        return build(source, kernels._options(defines)), name.encode()

    def launch(self, function, grid, block, shared, stream, params) -> None:
        lib, name = function
        if shared + 16 > 227 * 1024:
            raise RuntimeError(
                f"{name.decode()}: {shared} bytes of dynamic shared memory exceed any GPU's"
            )
        if block[0] * block[1] * block[2] > 1024:
            raise RuntimeError(f"{name.decode()}: a block of {block} threads exceeds CUDA's 1024")
        status = lib.cuda_on_cpu_launch(name, *grid, *block, shared, params, self.order)
        if status:
            raise RuntimeError(f"no kernel {name.decode()} in the compiled source")
        self.launches += 1
