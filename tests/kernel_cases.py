"""Packed layers for kernel tests, and the float64 references they are checked against.

``exact_layer`` builds layers whose every product and partial sum is exact in fp16, bf16
and fp32 when the activations come from ``exact_x``: centroids are distinct multiples of
1/8 in [-2, 2], sparse values and biases multiples of 1/8 in [-1, 1], activations
integers in [-3, 3]. A group's 16 fp16 products per lane then sum to at most 96 (exact
in fp16), and any sum over a LLaMA-sized row stays below 2^24 eighths (exact in fp32).
So a kernel's output must equal the float64 reference rounded once to its dtype, bit for
bit, whatever the order of its sums: one wrong index, a dropped term or a stale shared
value shows. ``random_layer`` builds realistic values, checked within rounding bounds.
"""

from __future__ import annotations

import torch

from sqlab import SqueezeLinear
from sqlab.packing import csr_row_indices, pack, to_csr

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# (x, LUT, sparse values, bias) dtypes as SqueezeLinear meets them: a model moved with
# .to("cuda", torch.float16); a freshly quantized layer (fp16 LUT, fp32 values and bias)
# given fp16 activations; a model moved with .to("cuda") (fp32 activations, the LUT stays
# fp16); a file imported from the original release (fp32 LUT and values) run in fp32; an
# all-bf16 model. Between them every kind appears for x, the LUT and the sparse values,
# and every decoding path: fp16 pairs with HFMA2, bf16 pairs, fp32 singles.
DTYPE_SETS = {
    "fp16-model": (F16, F16, F16, F16),
    "fp16-x_fp32-vals": (F16, F16, F32, F32),
    "fp32-model": (F32, F16, F32, F32),
    "fp32-imported": (F32, F32, F32, None),
    "bf16-model": (BF16, BF16, BF16, BF16),
}
SPMV_KINDS = {
    "fp16-x_fp32-vals": (F16, F32),
    "fp32-all": (F32, F32),
    "bf16-x_fp16-vals": (BF16, F16),
}


def _sparse_positions(gen, out_features, in_features, density, skewed, device):
    nnz = round(density * in_features * out_features)
    if not nnz:
        return None
    r = torch.randint(0, out_features, (nnz,), generator=gen)
    c = torch.randint(0, in_features, (nnz,), generator=gen)
    if skewed:
        r[: nnz // 3] = out_features // 2
    dup = max(
        1, nnz // 10
    )  # every tenth position twice, as the packer stores an exact two-term correction
    return torch.cat([r, r[:dup]]).to(device), torch.cat([c, c[:dup]]).to(device)


def exact_layer(
    in_features: int,
    out_features: int,
    wbits: int,
    density: float,
    dtypes: tuple,
    device: torch.device,
    seed: int = 0,
    skewed: bool = False,
) -> SqueezeLinear:
    """A SqueezeLinear whose sums are exact in every dtype (see the module docstring)."""
    _, lut_dtype, vals_dtype, bias_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(
        0, 1 << wbits, (out_features, in_features), generator=gen, dtype=torch.uint8
    )
    grid = torch.arange(-16, 17) / 8  # 33 distinct values; each row draws 2^wbits of them
    choice = torch.rand(out_features, grid.numel(), generator=gen).argsort(1)[:, : 1 << wbits]
    lut = grid[choice].to(lut_dtype)
    csr = None
    positions = _sparse_positions(gen, out_features, in_features, density, skewed, "cpu")
    if positions is not None:
        vals = (torch.randint(-8, 9, (positions[0].numel(),), generator=gen) / 8).to(vals_dtype)
        csr = to_csr(*positions, vals, out_features)
    bias = (
        None
        if bias_dtype is None
        else (torch.randint(-8, 9, (out_features,), generator=gen) / 8).to(bias_dtype)
    )
    layer = SqueezeLinear.from_parts(pack(idx, wbits), lut, in_features, csr, bias)
    return layer.to(device)


def exact_x(
    tokens: int, in_features: int, dtype: torch.dtype, device: torch.device, seed: int = 1
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (tokens, in_features), generator=gen).to(dtype).to(device)


def random_layer(
    in_features: int,
    out_features: int,
    wbits: int,
    density: float,
    dtypes: tuple,
    device: torch.device,
    seed: int = 0,
    skewed: bool = False,
) -> SqueezeLinear:
    """A SqueezeLinear of random indices, Gaussian LUTs, sparse values and bias."""
    _, lut_dtype, vals_dtype, bias_dtype = dtypes
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(
        0, 1 << wbits, (out_features, in_features), generator=gen, dtype=torch.uint8
    )
    lut = torch.randn(out_features, 1 << wbits, generator=gen).to(lut_dtype)
    csr = None
    positions = _sparse_positions(gen, out_features, in_features, density, skewed, "cpu")
    if positions is not None:
        csr = to_csr(
            *positions,
            torch.randn(positions[0].numel(), generator=gen).to(vals_dtype),
            out_features,
        )
    bias = None if bias_dtype is None else torch.randn(out_features, generator=gen).to(bias_dtype)
    return SqueezeLinear.from_parts(pack(idx, wbits), lut, in_features, csr, bias).to(device)


def reference_parts(
    layer: SqueezeLinear, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense part (centroids as W_hat holds them in x's dtype) and the sparse part, float64.

    The kernels add the sparse part separately (S x), so the reference keeps them apart.
    """
    lut = layer.lookup_table.cpu()
    if layer.nnz:
        lut = lut.to(layer.vals.dtype)  # the centroid passes through the sparse values' dtype first
    w = lut.to(x_dtype).double().gather(1, layer.indices().cpu().long())
    s = torch.zeros_like(w)
    if layer.nnz:
        s.index_put_(
            (csr_row_indices(layer.rows.cpu()).long(), layer.cols.cpu().long()),
            layer.vals.cpu().double(),
            accumulate=True,
        )
    return w, s


def reference_y(layer: SqueezeLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ (D + S).T + bias`` in float64, on the CPU."""
    w, s = reference_parts(layer, x.dtype)
    y = x.cpu().double() @ (w + s).T
    return y if layer.bias is None else y + layer.bias.cpu().double()


EPS = {F16: 2**-10, BF16: 2**-7, F32: 2**-22}


def gemv_tolerance(layer: SqueezeLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference and a bound on the error of a correct kernel with random values.

    fp32 sums contribute a few ulps of fp32 of the sum of magnitudes; fp16 activations
    (weights looked up in pairs) sum each group's 16 pair products per lane in fp16 (at
    most 16 fp16 roundings of that group's magnitudes); the output is rounded once to x's dtype.
    """
    w, s = reference_parts(layer, x.dtype)
    xd = x.cpu().double()
    ref = reference_y(layer, x)
    scale = xd.abs() @ (w.abs() + s.abs()).T
    if layer.bias is not None:
        scale = scale + layer.bias.cpu().double().abs()
    inner = 16 * 2**-11 if x.dtype == F16 else 3e-5
    return ref, EPS[x.dtype] * ref.abs() + inner * scale + 1e-30
