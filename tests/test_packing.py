import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlab import SqlabError
from sqlab.packing import (
    balanced_startrows,
    correct_sparse,
    csr_row_indices,
    pack,
    packed_rows,
    reconstruct,
    to_csr,
    unpack,
)


@settings(max_examples=60, deadline=None)
@given(
    wbits=st.sampled_from([3, 4]),
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 130),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(wbits, out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**wbits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    q = pack(idx, wbits)
    assert q.dtype == torch.int32
    assert (
        q.shape
        == (packed_rows(in_features, wbits), out_features)
        == (-(-in_features // 32) * wbits, out_features)
    )
    assert torch.equal(unpack(q, wbits, in_features), idx)


def _bit(word: int, position: int) -> int:
    return (word >> position) & 1


def test_4bit_layout_is_eight_indices_per_word_low_bits_first():
    idx = torch.zeros(1, 32, dtype=torch.uint8)
    idx[0, 0], idx[0, 1], idx[0, 7], idx[0, 8] = 0x1, 0x2, 0xF, 0x3
    q = pack(idx, 4)[:, 0].tolist()
    assert q[0] & 0xF == 1 and (q[0] >> 4) & 0xF == 2 and (q[0] >> 28) & 0xF == 0xF
    assert q[1] & 0xF == 3


def test_3bit_layout_spans_words_at_indices_10_and_21():
    """32 indices in 3 words: 0-9, then 10 split 2+1 bits, 11-20, then 21 split 1+2 bits, 22-31."""
    idx = torch.zeros(1, 32, dtype=torch.uint8)
    idx[0, 9] = 0b111
    idx[0, 10] = 0b101  # low two bits end word 0, high bit starts word 1
    idx[0, 11] = 0b011
    idx[0, 21] = 0b110  # low bit ends word 1, high two bits start word 2
    idx[0, 22] = 0b001
    w0, w1, w2 = (v & 0xFFFFFFFF for v in pack(idx, 3)[:, 0].tolist())
    assert (w0 >> 27) & 0b111 == 0b111
    assert _bit(w0, 30) == 1 and _bit(w0, 31) == 0 and _bit(w1, 0) == 1
    assert (w1 >> 1) & 0b111 == 0b011
    assert _bit(w1, 31) == 0 and (w2 & 0b11) == 0b11
    assert (w2 >> 2) & 0b111 == 0b001


def test_pack_rejects_out_of_range_indices_and_bad_shapes():
    with pytest.raises(SqlabError, match=r"indices must lie in \[0, 8\)"):
        pack(torch.full((2, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(SqlabError, match="wbits must be 3 or 4"):
        pack(torch.zeros(2, 32, dtype=torch.uint8), 5)
    with pytest.raises(SqlabError, match="qweight has 3 rows; 4-bit packing of 64 inputs needs 8"):
        unpack(torch.zeros(3, 2, dtype=torch.int32), 4, 64)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 50),
    density=st.floats(0, 1),
    seed=st.integers(0, 10**6),
)
def test_csr_round_trip_and_row_indices(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    values = torch.randn(rows, cols, generator=gen)
    r, c = mask.nonzero(as_tuple=True)
    shuffle = torch.randperm(r.numel(), generator=gen)
    csr = to_csr(r[shuffle], c[shuffle], values[r, c][shuffle], rows)
    assert csr.rows.dtype == torch.int32 and csr.cols.dtype == torch.int32
    assert csr.rows.shape == (rows + 1,) and int(csr.rows[-1]) == int(mask.sum()) == csr.nnz
    dense = torch.zeros(rows, cols)
    dense[csr_row_indices(csr.rows), csr.cols.long()] = csr.vals
    assert torch.equal(dense, values * mask)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=30), per_thread=st.integers(1, 9))
def test_balanced_startrows_points_each_thread_at_its_first_row(counts, per_thread):
    rows = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    start = balanced_startrows(rows, per_thread)
    nnz = int(rows[-1])
    assert start.numel() == -(-nnz // per_thread)
    for t, r in enumerate(start.tolist()):
        first = t * per_thread
        assert rows[r] <= first < rows[r + 1]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    k=st.sampled_from([8, 16]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    scale=st.sampled_from([1e-8, 1e-3, 1.0, 30.0]),
)
def test_sparse_correction_is_exact_bit_for_bit(seed, k, dtype, scale):
    """dequant(dense) + sparse == the intended weight at every sparse position,
    for any weight size.
    """
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = 12, 40
    w = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dtype)
    mask = torch.rand(out_features, in_features, generator=gen) < 0.3
    w[mask] = (torch.randn(int(mask.sum()), generator=gen) * scale * 0.02).to(
        dtype
    )  # tiny to huge values
    w[0, 0], mask[0, 0] = 0.0, True  # an exact zero too
    lut = (torch.randn(out_features, k, generator=gen) * 0.02).sort(1).values.to(torch.float16)
    idx = (w.float()[..., None] - lut.float()[:, None, :]).abs().argmin(-1)
    r, c = mask.nonzero(as_tuple=True)
    sparse_idx, csr = correct_sparse(r, c, w[r, c], lut, out_features)
    idx[r, c] = sparse_idx
    assert csr.vals.dtype == dtype and csr.nnz >= int(mask.sum())
    w_hat = reconstruct(idx, lut, csr)
    assert w_hat.dtype == dtype
    assert torch.equal(w_hat[mask], w[mask])
    assert torch.equal(w_hat[~mask], lut.to(dtype).gather(1, idx)[~mask])


def _valid_csr():
    rows = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cols = torch.tensor([1, 4, 0, 3, 3], dtype=torch.int32)
    return rows, cols, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def test_check_csr_accepts_a_valid_part_and_empty_rows():
    from sqlab.packing import CSR, check_csr

    check_csr(CSR(*_valid_csr()), 3, 5, "layer")
    empty = CSR(
        torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    )
    check_csr(empty, 3, 5, "layer")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, c, v: (r, c.long(), v), "rows and cols must be int32"),
        (lambda r, c, v: (r[:-1], c, v), r"rows has shape \(3,\); 3 output rows need \(4,\)"),
        (
            lambda r, c, v: (torch.tensor([0, 3, 2, 5], dtype=torch.int32), c, v),
            "without decreasing.*a decrease",
        ),
        (lambda r, c, v: (torch.tensor([1, 2, 2, 5], dtype=torch.int32), c, v), "first 1"),
        (lambda r, c, v: (torch.tensor([0, 2, 2, 4], dtype=torch.int32), c, v), r"nnz = 5.*last 4"),
        (
            lambda r, c, v: (r, torch.tensor([1, 5, 0, 3, 3], dtype=torch.int32), v),
            "column index 5 out of range",
        ),
        (
            lambda r, c, v: (r, torch.tensor([1, -1, 0, 3, 3], dtype=torch.int32), v),
            "column index -1",
        ),
        (lambda r, c, v: (r, c, torch.tensor([1.0, float("nan"), 3.0, 4.0, 5.0])), "NaN or Inf"),
        (lambda r, c, v: (r, c, v[:-1]), "equal length"),
        (lambda r, c, v: (r, torch.tensor([1, 4, 3, 0, 3], dtype=torch.int32), v), "not adjacent"),
    ],
)
def test_check_csr_names_the_layer_and_the_fault(change, message):
    from sqlab.packing import CSR, check_csr

    with pytest.raises(SqlabError, match=f"^model.layers.0.q_proj: .*{message}"):
        check_csr(CSR(*change(*_valid_csr())), 3, 5, "model.layers.0.q_proj")
