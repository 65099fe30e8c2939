"""Packing: 3/4-bit indices into int32 words, the CSR sparse part, and its exact correction.

Layout (the original SqueezeLLM one, shared with its model zoo): ``qweight`` has
shape ``(in_features // 32 * wbits, out_features)``. Down each column (one output
channel), every 32 consecutive input positions become ``wbits`` int32 words that
read as one little-endian bit stream: index ``j`` of the group occupies bits
``wbits·j … wbits·j + wbits - 1``. For 4 bits that is 8 indices per word; for 3
bits indices 10 and 21 straddle two words, exactly as the original packer wrote
them. ``in_features`` that is not a multiple of 32 is padded with index 0 here; the
original packer instead drops the inputs past the last multiple of 32, so such a
layer has no faithful form in the original format (``checkpoint.export_squeezellm``
refuses it unless asked for the padded layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import check_wbits
from .errors import SqlabError

GROUP = 32  # input positions per group of wbits words


def packed_rows(in_features: int, wbits: int) -> int:
    """Rows of ``qweight`` for ``in_features`` inputs (padded up to a multiple of 32)."""
    return -(-in_features // GROUP) * wbits


def _bit_positions(wbits: int, device) -> tuple[Tensor, Tensor]:
    start = torch.arange(GROUP, device=device) * wbits
    return start // 32, start % 32  # word within the group, bit offset within that word


def pack(indices: Tensor, wbits: int) -> Tensor:
    """Pack ``(out_features, in_features)`` indices in ``[0, 2**wbits)`` into int32 ``qweight``."""
    check_wbits(wbits)
    if indices.ndim != 2:
        raise SqlabError(
            f"indices must be (out_features, in_features), got shape {tuple(indices.shape)}"
        )
    out_features, in_features = indices.shape
    idx = indices.to(torch.int64)
    if idx.numel() and (idx.min() < 0 or idx.max() >= 1 << wbits):
        raise SqlabError(f"indices must lie in [0, {1 << wbits}) for {wbits}-bit packing")
    padded = -(-in_features // GROUP) * GROUP
    idx = torch.nn.functional.pad(idx, (0, padded - in_features))
    groups = idx.T.reshape(padded // GROUP, GROUP, out_features)  # (groups, 32, out)
    word, bit = _bit_positions(wbits, idx.device)
    words = torch.zeros(
        padded // GROUP, wbits + 1, out_features, dtype=torch.int64, device=idx.device
    )
    for j in range(GROUP):  # 32 bit positions, each a whole-tensor operation
        value = groups[:, j]
        words[:, word[j]] |= (value << bit[j]) & 0xFFFFFFFF
        words[:, word[j] + 1] |= value >> (32 - bit[j])  # the part that spills into the next word
    words = words[:, :wbits].reshape(-1, out_features)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def unpack(qweight: Tensor, wbits: int, in_features: int) -> Tensor:
    """Indices ``(out_features, in_features)`` (uint8) from ``qweight``."""
    check_wbits(wbits)
    rows, out_features = qweight.shape
    if rows != packed_rows(in_features, wbits):
        raise SqlabError(
            f"qweight has {rows} rows; {wbits}-bit packing of {in_features} inputs needs "
            f"{packed_rows(in_features, wbits)}"
        )
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    groups = words.reshape(-1, wbits, out_features)
    groups = torch.cat([groups, torch.zeros_like(groups[:, :1])], 1)  # a zero word past the end
    word, bit = _bit_positions(wbits, qweight.device)
    # two adjacent words side by side hold every index whole, whatever its bit offset
    pair = groups[:, word] | (groups[:, word + 1] << 32)  # (groups, 32, out)
    idx = (pair >> bit[None, :, None]) & ((1 << wbits) - 1)
    return idx.reshape(-1, out_features)[:in_features].T.to(torch.uint8)


@dataclass
class CSR:
    """The sparse part ``S`` of one matrix in compressed sparse row form."""

    rows: Tensor  # (out_features + 1,) int32 row pointers
    cols: Tensor  # (nnz,) int32 column of each value
    vals: Tensor  # (nnz,) value

    @property
    def nnz(self) -> int:
        return self.cols.numel()


def check_csr(csr: CSR, out_features: int, in_features: int, name: str = "the sparse part") -> None:
    """Raise ``SqlabError`` unless ``csr`` is a well-formed ``(out_features, in_features)`` sparse
    part.

    Checked: int32 ``rows`` of ``out_features + 1`` non-decreasing pointers from 0 to
    ``nnz``; int32 ``cols`` in ``[0, in_features)``; one finite value per column; and a
    position stored twice (an exact two-term correction) in adjacent entries, which
    ``reconstruct`` and the kernels rely on. Kernels index memory with these values,
    so this runs wherever a sparse part enters (loading, import, moving to a device).
    """
    rows, cols, vals = csr.rows, csr.cols, csr.vals
    if rows.dtype != torch.int32 or cols.dtype != torch.int32:
        raise SqlabError(f"{name}: rows and cols must be int32, got {rows.dtype} and {cols.dtype}")
    if rows.ndim != 1 or rows.numel() != out_features + 1:
        raise SqlabError(
            f"{name}: rows has shape {tuple(rows.shape)}; {out_features} output rows need "
            f"({out_features + 1},)"
        )
    nnz = cols.numel()
    if cols.ndim != 1 or vals.ndim != 1 or vals.numel() != nnz:
        raise SqlabError(
            f"{name}: cols and vals must be 1-D of equal length, got shapes {tuple(cols.shape)} "
            f"and {tuple(vals.shape)}"
        )
    r = rows.long()
    if int(r[0]) != 0 or int(r[-1]) != nnz or bool((r[1:] < r[:-1]).any()):
        raise SqlabError(
            f"{name}: rows must rise from 0 to nnz = {nnz} without decreasing, got first "
            f"{int(r[0])}, last {int(r[-1])}"
            + (", and a decrease" if (r[1:] < r[:-1]).any() else "")
        )
    if nnz:
        low, high = int(cols.min()), int(cols.max())
        if low < 0 or high >= in_features:
            bad = low if low < 0 else high
            raise SqlabError(
                f"{name}: column index {bad} out of range; the layer has {in_features} inputs"
            )
        if not bool(torch.isfinite(vals).all()):
            raise SqlabError(f"{name}: the sparse values contain NaN or Inf")
        key = csr_row_indices(rows) * in_features + cols.long()
        runs = 1 + int((key[1:] != key[:-1]).sum())
        if runs != torch.unique(key).numel():
            raise SqlabError(
                f"{name}: a position is stored in entries that are not adjacent; a repeated "
                "(row, column) must follow itself"
            )


def to_csr(rows: Tensor, cols: Tensor, vals: Tensor, out_features: int) -> CSR:
    """CSR from coordinates, ordered by row then column.

    A position may appear twice (an exact correction in two terms, see
    ``correct_sparse``); the stable sort keeps its entries in the given order.
    """
    key = rows.long() * (int(cols.max()) + 1 if cols.numel() else 1) + cols.long()
    order = torch.sort(key, stable=True).indices
    r, c = rows[order].long(), cols[order]
    counts = torch.bincount(r, minlength=out_features)
    pointers = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return CSR(pointers, c.to(torch.int32), vals[order])


def csr_row_indices(rows: Tensor) -> Tensor:
    """The row of each stored value, from the row pointers."""
    counts = (rows[1:] - rows[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts)


def balanced_startrows(rows: Tensor, nnz_per_thread: int) -> Tensor:
    """First row touched by each thread of sqlab's balanced SpMV (``kernels/spmv.cu``).

    Thread ``t`` handles values ``[t·n, (t+1)·n)`` whatever rows they fall in, so
    work is balanced even when a few rows hold most of the outliers. Its start row
    is the row holding value ``t·n`` (``rows[r] <= t·n < rows[r + 1]``), one entry
    per thread. The original release stores a different convention in its files
    (``original_startrows``).
    """
    if nnz_per_thread < 1:
        raise SqlabError(f"nnz_per_thread must be >= 1, got {nnz_per_thread}")
    nnz = int(rows[-1])
    first = torch.arange(0, nnz, nnz_per_thread, device=rows.device, dtype=torch.int64)
    return (torch.searchsorted(rows.long(), first, right=True) - 1).to(torch.int32)


ORIGINAL_BLOCK = 128  # threads per block of the original balanced kernel
ORIGINAL_NNZ_PER_THREAD = 10  # the original release's default num_nonzero_per_thread


def original_startrows(rows: Tensor, nnz_per_thread: int = ORIGINAL_NNZ_PER_THREAD) -> Tensor:
    """``startrows`` as the original release's packer writes it with ``--balanced``.

    Threads: ``ceil(nnz / nnz_per_thread)`` rounded up to a multiple of 128 (its
    block size); each takes ``n = ceil(nnz / threads)`` values, so thread ``t``
    starts at value ``t·n``. Its entry is the last row that starts *before* that
    value (``rows[r] < t·n``; 0 when none does), and -1 for a thread past the end
    (``t·n > nnz``). No threads, so an empty tensor, without values.
    """
    if nnz_per_thread < 1:
        raise SqlabError(f"nnz_per_thread must be >= 1, got {nnz_per_thread}")
    nnz = int(rows[-1])
    threads = ORIGINAL_BLOCK * math.ceil(math.ceil(nnz / nnz_per_thread) / ORIGINAL_BLOCK)
    per_thread = math.ceil(nnz / threads) if threads else 0
    first = torch.arange(threads, dtype=torch.int64) * per_thread  # (threads,)
    starts = rows[:-1].long().cpu()  # (out_features,) first value of each row
    start = (torch.searchsorted(starts, first, right=False) - 1).clamp(min=0)
    return torch.where(first > nnz, -1, start).to(torch.int32)


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a + b = s + e`` exactly, with ``s = fl(a + b)`` (Knuth's error-free transformation)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def correct_sparse(
    rows: Tensor, cols: Tensor, target: Tensor, lut: Tensor, out_features: int
) -> tuple[Tensor, CSR]:
    """The dense index at each sparse position and the sparse part ``S``,
    exact in ``target``'s dtype.

    At a sparse position the dense part still decodes to some centroid ``c`` of
    its row, so ``S`` stores ``w - c``. In floating point ``c + fl(w - c)`` is not
    always ``w``; every centroid is tried, nearest first, with the rounded
    difference and its neighbours one ulp away, and the first that adds up to
    ``w`` bit for bit is kept. This always succeeds when a centroid lies between
    0 and 2w, so for every outlier beyond its row's centroids. A weight much
    smaller than every centroid instead stores two terms at its position, the
    rounded difference and its exact rounding error (``c + v1 + v2 = w``, each sum
    exact), which CSR allows and every SpMV simply adds.

    ``rows``, ``cols`` (m,) locate the sparse positions, ``target`` (m,) holds the
    intended weights, ``lut`` is the whole ``(out_features, k)`` look-up table.
    """
    dtype = target.dtype
    cands = lut[rows.long()].to(dtype)  # (m, k)
    order = (cands.float() - target.float()[:, None]).abs().argsort(1)
    m = target.numel()
    index = order[:, 0].clone()
    first = (target.double() - cands.gather(1, index[:, None])[:, 0].double()).to(dtype)
    second = torch.zeros_like(target)
    found = torch.zeros(m, dtype=torch.bool, device=target.device)
    two = torch.zeros_like(found)
    up, down = torch.full_like(target, float("inf")), torch.full_like(target, float("-inf"))
    for rank in range(order.shape[1]):
        choice = order[:, rank]
        c = cands.gather(1, choice[:, None])[:, 0]
        base = (target.double() - c.double()).to(dtype)
        for v in (base, torch.nextafter(base, up), torch.nextafter(base, down)):
            hit = ~found & (c + v == target)
            index, first, found = (
                torch.where(hit, choice, index),
                torch.where(hit, v, first),
                found | hit,
            )
        if found.all():
            break
    if not found.all():
        for rank in range(order.shape[1]):
            choice = order[:, rank]
            c = cands.gather(1, choice[:, None])[:, 0]
            v1, v2 = _two_sum(target, -c)
            hit = ~found & ((c + v1) + v2 == target)
            index, first, second = (
                torch.where(hit, choice, index),
                torch.where(hit, v1, first),
                torch.where(hit, v2, second),
            )
            found, two = found | hit, two | hit
            if found.all():
                break
    csr = to_csr(
        torch.cat([rows, rows[two]]),
        torch.cat([cols, cols[two]]),
        torch.cat([first, second[two]]),
        out_features,
    )
    return index, csr


def reconstruct(
    indices: Tensor, lut: Tensor, csr: CSR | None, dtype: torch.dtype | None = None
) -> Tensor:
    """``W_hat = lut[row, index] + S`` as a dense ``(out_features, in_features)`` matrix.

    Computed in the sparse values' dtype (the precision ``correct_sparse`` made the
    sparse part exact for), then cast to ``dtype``. Entries repeating a position
    are added in their stored order.
    """
    work = csr.vals.dtype if csr is not None and csr.nnz else (dtype or torch.float32)
    weight = lut.to(work).gather(1, indices.long())
    if csr is not None and csr.nnz:
        r, c, vals = csr_row_indices(csr.rows), csr.cols.long(), csr.vals
        while r.numel():
            repeat = torch.zeros_like(r, dtype=torch.bool)
            repeat[1:] = (r[1:] == r[:-1]) & (c[1:] == c[:-1])
            now = ~repeat
            weight[r[now], c[now]] = weight[r[now], c[now]] + vals[now]
            r, c, vals = r[repeat], c[repeat], vals[repeat]
    return weight.to(dtype or work)
