"""``SqueezeLinear``: a linear layer stored as packed 3/4-bit indices, a LUT per row, and CSR.

The reconstructed weight is ``W_hat = lut[row, index] + S``: each output row
decodes its indices through its own look-up table (the row's k-means centroids),
then the sparse part adds back the outliers and sensitive values. The forward pass
computes ``x @ W_hat.T + b`` without keeping ``W_hat``: on a GPU through the CUDA
kernels (``kernels.GemvKernels``), on the CPU through the compiled CPU LUT-GEMV
(``cpu_kernels.CpuGemv``), each prepared once per device and dtype. Without either
(no CuPy, no C++ compiler) it computes with the dequantized weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import cpu_kernels, kernels
from .config import check_wbits
from .errors import SqlabError
from .packing import CSR, check_csr, packed_rows, reconstruct, unpack


class SqueezeLinear(nn.Module):
    """A quantized ``nn.Linear`` in the SqueezeLLM layout.

    Buffers: ``qweight`` (int32, ``(ceil(in/32)·wbits, out)``), ``lookup_table``
    (``(out, 2**wbits)``), and with sparsity ``rows`` (int32, ``out + 1``),
    ``cols`` (int32, ``nnz``), ``vals`` (``nnz``); ``bias`` if the layer has one
    (``bias_dtype``, by default that of ``vals``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        wbits: int,
        nnz: int = 0,
        bias: bool = False,
        lut_dtype: torch.dtype = torch.float16,
        vals_dtype: torch.dtype = torch.float32,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_wbits(wbits)
        self.in_features, self.out_features, self.wbits = in_features, out_features, wbits
        self.name = (
            ""  # the module's name in its model, for messages (set by the quantizer and loaders)
        )
        self.register_buffer(
            "qweight",
            torch.zeros(
                packed_rows(in_features, wbits), out_features, dtype=torch.int32, device=device
            ),
        )
        self.register_buffer(
            "lookup_table", torch.zeros(out_features, 2**wbits, dtype=lut_dtype, device=device)
        )
        if nnz:
            self.register_buffer(
                "rows", torch.zeros(out_features + 1, dtype=torch.int32, device=device)
            )
            self.register_buffer("cols", torch.zeros(nnz, dtype=torch.int32, device=device))
            self.register_buffer("vals", torch.zeros(nnz, dtype=vals_dtype, device=device))
        else:
            self.rows = self.cols = self.vals = None
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=bias_dtype or vals_dtype, device=device)
            )
        else:
            self.bias = None

    @classmethod
    def from_parts(
        cls,
        qweight: Tensor,
        lookup_table: Tensor,
        in_features: int,
        csr: CSR | None = None,
        bias: Tensor | None = None,
    ) -> "SqueezeLinear":
        out_features, k = lookup_table.shape
        wbits = {8: 3, 16: 4}.get(k)
        if wbits is None:
            raise SqlabError(
                f"lookup_table has {k} entries per row; expected 8 (3-bit) or 16 (4-bit)"
            )
        nnz = csr.nnz if csr is not None else 0
        vals_dtype = csr.vals.dtype if nnz else (bias.dtype if bias is not None else torch.float32)
        layer = cls(
            in_features,
            out_features,
            wbits,
            nnz,
            bias is not None,
            lookup_table.dtype,
            vals_dtype,
            device=qweight.device,
        )
        layer.qweight.copy_(qweight)
        layer.lookup_table.copy_(lookup_table)
        if nnz:
            layer.rows.copy_(csr.rows)
            layer.cols.copy_(csr.cols)
            layer.vals.copy_(csr.vals)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @property
    def nnz(self) -> int:
        return 0 if self.vals is None else self.vals.numel()

    def validate(self, name: str = "SqueezeLinear") -> None:
        """Raise ``SqlabError`` naming ``name`` unless the packed buffers are consistent and finite.

        Run where a layer's buffers enter from outside (a checkpoint, an imported file)
        and before kernels index memory with them.
        """
        expected = (packed_rows(self.in_features, self.wbits), self.out_features)
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != expected:
            raise SqlabError(
                f"{name}.qweight is {self.qweight.dtype} of shape {tuple(self.qweight.shape)}; "
                f"{self.wbits}-bit packing of {self.in_features} inputs needs int32 {expected}"
            )
        lut = self.lookup_table
        if tuple(lut.shape) != (self.out_features, 1 << self.wbits) or not lut.is_floating_point():
            raise SqlabError(
                f"{name}.lookup_table is {lut.dtype} of shape {tuple(lut.shape)}; expected floats "
                f"of shape ({self.out_features}, {1 << self.wbits})"
            )
        if not bool(torch.isfinite(lut).all()):
            raise SqlabError(f"{name}.lookup_table contains NaN or Inf")
        if self.vals is not None:
            check_csr(self.csr(), self.out_features, self.in_features, name)
        if self.bias is not None and not bool(torch.isfinite(self.bias).all()):
            raise SqlabError(f"{name}.bias contains NaN or Inf")

    def indices(self) -> Tensor:
        """The dense part's indices, ``(out_features, in_features)`` uint8."""
        return unpack(self.qweight, self.wbits, self.in_features)

    def csr(self) -> CSR | None:
        return CSR(self.rows, self.cols, self.vals) if self.vals is not None else None

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat`` (out_features, in_features): LUT lookup plus the sparse part."""
        return reconstruct(self.indices(), self.lookup_table, self.csr(), dtype)

    def _dense(self, dtype: torch.dtype) -> Tensor:
        """``W_hat`` for the CPU path, decoded once and kept until a buffer changes."""
        key = (dtype, self.qweight.device, *(t._version for t in self.buffers()))
        cached = getattr(self, "_dense_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.dequantize(dtype))
            self._dense_cache = cached
        return cached[1]

    def _forget(self) -> None:
        """Drop what was derived from the buffers (prepared launches, decoded weights)."""
        self.__dict__["_kernel"] = None
        self.__dict__["_dense_cache"] = None

    def _apply(self, fn, *args, **kwargs):
        self._forget()  # moved or cast: prepare again
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget()  # new values: validate and prepare again
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # copies and pickles carry the buffers, not what was derived from them
        return {**self.__dict__, "_kernel": None, "_dense_cache": None}

    def __setattr__(self, name, value):
        if name in ("qweight", "lookup_table", "rows", "cols", "vals", "bias"):
            self._forget()
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.__dict__.get("_kernel")
        if kernel is not None and x.dtype == kernel.dtype and x.get_device() == kernel.device_index:
            return kernel(
                x
            )  # the prepared launch: no checks, no planning, two pointers and a launch
        return self._first_call(x)

    def _first_call(self, x: Tensor) -> Tensor:
        """A call on a new device or dtype: prepare the kernels there (GPU, or the CPU LUT-GEMV)."""
        name = self.name or f"SqueezeLinear({self.in_features} -> {self.out_features})"
        chosen = kernels.backend()
        if (
            chosen.accepts(x.device)
            and x.dtype in kernels.DTYPES
            and chosen.unavailable_reason() is None
        ):
            self.__dict__["_kernel"] = kernels.GemvKernels(
                self.qweight,
                self.lookup_table,
                self.wbits,
                self.in_features,
                x.dtype,
                self.csr(),
                self.bias,
                name=name,
                chosen=chosen,
            )
            return self.__dict__["_kernel"](x)
        if (
            x.device.type == "cpu"
            and x.dtype in kernels.DTYPES
            and self.qweight.device.type == "cpu"
        ):
            reason = cpu_kernels.unavailable_reason()
            if reason is None:
                self.__dict__["_kernel"] = cpu_kernels.CpuGemv(
                    self.qweight,
                    self.lookup_table,
                    self.wbits,
                    self.in_features,
                    x.dtype,
                    self.csr(),
                    self.bias,
                    name=name,
                )
                return self.__dict__["_kernel"](x)
            cpu_kernels.warn_unavailable(reason)
        # no kernel for this device: compute with the dequantized weight (kept on the CPU,
        # where this is the fallback for a missing compiler; decoded per call on a GPU)
        weight = self._dense(x.dtype) if not x.is_cuda else self.dequantize(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> dict[str, int]:
        """Bits stored for each part: indices, LUT, sparse values and their indices, bias."""
        lut = self.lookup_table
        bits = {"indices": self.qweight.numel() * 32, "lut": lut.numel() * lut.element_size() * 8}
        if self.vals is not None:
            bits["sparse"] = sum(
                t.numel() * t.element_size() * 8 for t in (self.rows, self.cols, self.vals)
            )
        return bits

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"wbits={self.wbits}, nnz={self.nnz}, bias={self.bias is not None}"
        )
