"""The original release's ``.pt`` format, with files built the way its ``pack.py`` builds them.

The builder and the loader below are written here from the format's description, not
taken from the release. ``pack.py`` loads the base model with ``torch_dtype="auto"``
(fp16 for LLaMA checkpoints), gives each quantized linear ``qweight`` (int32,
``(in // 32 * wbits, out)``: the packer keeps whole groups of 32 inputs only), an fp32
``lookup_table`` (``(out, 2**wbits)``) and, with ``--include_sparse``, the sparse part as
torch's CSR form of its dense matrix (``rows`` (out + 1), ``cols``, fp32 ``vals``), and
``sparse_threshold.NAME``, the layer's number of values; ``--balanced`` adds
``startrows``. It saves ``model.state_dict()`` with ``torch.save`` and writes
``{"wbits": N}`` to ``quant_config.json`` beside the file. Its loader replaces every
linear but ``lm_head``, sizes ``rows``/``cols``/``vals`` by ``sparse_threshold.NAME``
(none when it is 0), always adds ``full_rows`` ``(in, topX)`` and ``full_row_indices``
``(topX,)`` (``topX`` = 10; whole rows of the sparse part, added to outputs
``full_row_indices``), and loads with ``load_state_dict(strict=False)``: entries it has no
buffer for are ignored, a shape that differs raises.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sqlab
from sqlab import QuantConfig, SqlabError, SqueezeLinear
from sqlab.checkpoint import quantized_layers
from sqlab.packing import CSR, original_startrows, pack, reconstruct, unpack
from tests.conftest import make_llama, run_cli, stored_as

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

X = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))
TOPX = 10  # the original loader's default number of dense rows


def startrows_by_description(rows: list[int], nnz_per_thread: int) -> list[int]:
    """The original ``--balanced`` startrows, step by step: threads rounded up to a multiple of
    128, each taking ceil(nnz / threads) values; per thread the last row starting before its
    first value (0 if none), -1 for a thread whose first value lies past the end."""
    nnz, out = rows[-1], len(rows) - 1
    threads = 128 * math.ceil(math.ceil(nnz / nnz_per_thread) / 128)
    per = math.ceil(nnz / threads) if threads else 0
    result = []
    for t in range(threads):
        first = t * per
        if first > nnz:
            result.append(-1)
            continue
        before = [r for r in range(out) if rows[r] < first]
        result.append(before[-1] if before else 0)
    return result


def _dense_sparse(layer: SqueezeLinear) -> torch.Tensor:
    """The layer's sparse part as a dense fp32 matrix (repeated positions summed)."""
    dense = torch.zeros(layer.out_features, layer.in_features)
    if layer.nnz:
        r = torch.repeat_interleave(
            torch.arange(layer.out_features), (layer.rows[1:] - layer.rows[:-1]).long()
        )
        dense.index_put_((r, layer.cols.long()), layer.vals.float(), accumulate=True)
    return dense


def pack_like_the_original(
    model: nn.Module, path, *, sparse: bool = True, balanced: bool = False, nnz_per_thread: int = 10
) -> dict:
    """Write ``model``'s quantized layers as the original ``pack.py`` would; returns the state."""
    state = {}
    for key, tensor in model.state_dict().items():
        state[key] = tensor.half() if tensor.is_floating_point() else tensor  # torch_dtype="auto"
    for name, layer in quantized_layers(model).items():
        kept = layer.in_features // 32 * 32  # whole groups of 32 inputs only
        state[f"{name}.qweight"] = pack(layer.indices()[:, :kept], layer.wbits)
        state[f"{name}.lookup_table"] = layer.lookup_table.float()
        for part in ("rows", "cols", "vals"):
            state.pop(f"{name}.{part}", None)
        if sparse:
            csr = _dense_sparse(layer).to_sparse_csr()
            state[f"{name}.rows"] = csr.crow_indices().to(torch.int32)
            state[f"{name}.cols"] = csr.col_indices().to(torch.int32)
            state[f"{name}.vals"] = csr.values().to(torch.float32)
            state[f"sparse_threshold.{name}"] = csr.values().numel()
            if balanced:
                rows = state[f"{name}.rows"].tolist()
                state[f"{name}.startrows"] = torch.tensor(
                    startrows_by_description(rows, nnz_per_thread), dtype=torch.int32
                )
    torch.save(state, path)
    (path.parent / "quant_config.json").write_text(json.dumps({"wbits": 3}, indent=4))
    return state


def load_like_the_original(path, base: nn.Module, wbits: int) -> dict[str, torch.Tensor]:
    """The dense weight of every quantized linear as the original loader and kernels see it."""
    state = torch.load(path, weights_only=True)
    numvals = {
        k.removeprefix("sparse_threshold."): v
        for k, v in state.items()
        if k.startswith("sparse_threshold.")
    }
    sparse = bool(numvals)
    weights = {}
    for name, linear in base.named_modules():
        if not isinstance(linear, nn.Linear) or name == "lm_head":
            continue
        n = numvals[name] if sparse else 0  # KeyError without a threshold, as in the original
        shapes = {
            "qweight": (linear.in_features // 32 * wbits, linear.out_features),
            "lookup_table": (linear.out_features, 2**wbits),
            "full_rows": (linear.in_features, TOPX),
            "full_row_indices": (TOPX,),
        }
        if n > 0:
            shapes.update(rows=(linear.out_features + 1,), cols=(n,), vals=(n,))
        buffers = {
            "full_rows": torch.zeros(linear.in_features, TOPX),
            "full_row_indices": torch.zeros(TOPX, dtype=torch.int32),
        }
        for part, shape in shapes.items():
            stored = state.get(f"{name}.{part}")
            if stored is None:
                continue
            if tuple(stored.shape) != shape:
                raise RuntimeError(
                    f"size mismatch for {name}.{part}: copying a param with shape "
                    f"{tuple(stored.shape)}, the shape in current model is {shape}"
                )
            buffers[part] = stored
        indices = unpack(buffers["qweight"], wbits, linear.in_features // 32 * 32)
        csr = CSR(buffers["rows"], buffers["cols"], buffers["vals"]) if n > 0 else None
        weight = reconstruct(indices, buffers["lookup_table"], csr, torch.float32)
        for t, row in enumerate(buffers["full_row_indices"].tolist()):
            weight[row] += buffers["full_rows"][:, t]
        weights[name] = weight
    return weights


def _quantized(hidden: int = 64, wbits: int = 3, sparse: bool = True, tie: bool = False):
    model = make_llama(hidden=hidden)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(
        wbits=wbits, outlier_pct=0.45 if sparse else 0.0, sensitive_pct=0.05 if sparse else 0.0
    )
    sqlab.quantize_model(
        model, config, sqlab.fisher_information(model, ids, progress=False), progress=False
    )
    return model


def _as_the_original_stores_it(model: nn.Module) -> nn.Module:
    """``model`` with fp16 tensors outside its packed layers and each sparse part as the CSR of its
    dense matrix (positions stored twice summed, zeros dropped): what the original file means."""
    reference = stored_as(model)
    for layer in quantized_layers(reference).values():
        if layer.nnz:
            csr = _dense_sparse(layer).to_sparse_csr()
            layer.rows = csr.crow_indices().to(torch.int32)
            layer.cols = csr.col_indices().to(torch.int32)
            layer.vals = csr.values().float()
    return reference


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    make_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "wbits, sparse, balanced", [(3, False, False), (4, True, False), (3, True, True)]
)
def test_files_of_the_original_packer_import_bit_exactly(
    tmp_path, base_dir, wbits, sparse, balanced
):
    model = _quantized(wbits=wbits, sparse=sparse)
    path = tmp_path / f"sq-tiny-w{wbits}.pt"
    state = pack_like_the_original(model, path, sparse=sparse, balanced=balanced)
    assert any(k.endswith(".startrows") for k in state) == balanced
    imported = sqlab.import_squeezellm(path, str(base_dir))
    reference = _as_the_original_stores_it(model)
    original = load_like_the_original(path, make_llama(), wbits)
    for name, layer in quantized_layers(imported).items():
        assert torch.equal(layer.dequantize(torch.float32), original[name]), name
    assert torch.equal(imported(X).logits, reference(X).logits)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=40), per_thread=st.integers(1, 12))
def test_original_startrows_follow_the_original_convention(counts, per_thread):
    rows = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    expected = startrows_by_description(rows.tolist(), per_thread)
    found = original_startrows(rows, per_thread)
    assert found.dtype == torch.int32 and found.tolist() == expected
    assert found.numel() % 128 == 0


def test_balanced_export_writes_the_original_startrows(tmp_path):
    model = _quantized()
    path = sqlab.export_squeezellm(model, tmp_path / "sq-w3.pt", balanced=True, nnz_per_thread=3)
    state = torch.load(path, weights_only=True)
    for name, layer in quantized_layers(model).items():
        expected = startrows_by_description(layer.rows.tolist(), 3)
        assert state[f"{name}.startrows"].tolist() == expected
        assert len(expected) % 128 == 0 and (layer.nnz > 3 * 128 or expected[-1] == -1)
    assert not any(
        k.endswith(".startrows")
        for k in torch.load(
            sqlab.export_squeezellm(model, tmp_path / "plain.pt"), weights_only=True
        )
    )


def test_empty_sparse_layers_both_ways(tmp_path, base_dir):
    """A layer without sparse values in a sparse model (e.g. v_proj at 3 bits, 0.05% outliers)."""
    model = _quantized()
    name = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(name)
    empty = SqueezeLinear.from_parts(layer.qweight, layer.lookup_table, layer.in_features)
    model.model.layers[1].self_attn.v_proj = empty
    path = sqlab.export_squeezellm(model, tmp_path / "sq-w3.pt")
    state = torch.load(path, weights_only=True)
    assert state[f"sparse_threshold.{name}"] == 0
    zeros = torch.zeros(empty.out_features + 1, dtype=torch.int32)
    assert torch.equal(state[f"{name}.rows"], zeros)
    assert state[f"{name}.cols"].numel() == 0 and state[f"{name}.vals"].numel() == 0
    # the original loader needs a threshold for every quantized linear
    original = load_like_the_original(path, make_llama(), 3)
    for key, layer in quantized_layers(model).items():
        assert torch.equal(layer.dequantize(torch.float32), original[key]), key
    imported = sqlab.import_squeezellm(path, str(base_dir))
    assert imported.get_submodule(name).nnz == 0
    assert torch.equal(imported(X).logits, stored_as(model)(X).logits)
    # and the same layer as the original packer writes it
    packed = pack_like_the_original(model, tmp_path / "orig.pt")
    assert packed[f"sparse_threshold.{name}"] == 0 and packed[f"{name}.vals"].numel() == 0
    assert torch.equal(
        sqlab.import_squeezellm(tmp_path / "orig.pt", str(base_dir))(X).logits,
        _as_the_original_stores_it(model)(X).logits,
    )


def test_dense_rows_of_the_sparse_part_are_folded_in(tmp_path, base_dir):
    """full_rows / full_row_indices: rows of S stored whole, added on top of the CSR part."""
    model = _quantized()
    path = tmp_path / "hybrid.pt"
    state = pack_like_the_original(model, path)
    name = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    dense = _dense_sparse(layer)
    busiest = (dense != 0).sum(1).topk(2).indices  # the two rows holding the most values
    full = torch.zeros(layer.in_features, TOPX)
    full[:, :2] = dense[busiest].T
    index = torch.zeros(TOPX, dtype=torch.int32)  # unused slots: rows of zeros pointing at row 0
    index[:2] = busiest.to(torch.int32)
    rest = dense.clone()
    rest[busiest] = 0
    rest[busiest[0], 0] = 0.25  # a position held by both parts: they add
    full[0, 0] -= 0.25
    csr = rest.to_sparse_csr()
    state.update(
        {
            f"{name}.rows": csr.crow_indices().to(torch.int32),
            f"{name}.cols": csr.col_indices().to(torch.int32),
            f"{name}.vals": csr.values().float(),
            f"{name}.full_rows": full,
            f"{name}.full_row_indices": index,
            f"sparse_threshold.{name}": csr.values().numel(),
        }
    )
    for other in quantized_layers(model):  # every other layer: the loader's default, zero rows
        if other != name:
            state[f"{other}.full_rows"] = torch.zeros(model.get_submodule(other).in_features, TOPX)
            state[f"{other}.full_row_indices"] = torch.zeros(TOPX, dtype=torch.int32)
    torch.save(state, path)
    original = load_like_the_original(path, make_llama(), 3)
    imported = sqlab.import_squeezellm(path, str(base_dir))
    assert torch.allclose(
        imported.get_submodule(name).dequantize(torch.float32), original[name], rtol=0, atol=1e-6
    )
    assert imported.get_submodule(name).nnz == int((rest != 0).sum()) + int((full != 0).sum())
    for other in quantized_layers(model):
        if other != name:
            found = imported.get_submodule(other).dequantize(torch.float32)
            assert torch.equal(found, original[other])
    for broken, message in (
        ({f"{name}.full_row_indices": None}, "without .*full_row_indices"),
        ({f"{name}.full_row_indices": index + 1000}, "holds row 1"),
        ({f"{name}.full_rows": full[:-1]}, "do not fit"),
    ):
        bad = {**state, **broken}
        bad = {k: v for k, v in bad.items() if v is not None}
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(SqlabError, match=message):
            sqlab.import_squeezellm(tmp_path / "bad.pt", str(base_dir))


def test_inputs_not_a_multiple_of_32(tmp_path, tiny_tokenizer):
    base = tmp_path / "base48"
    make_llama(hidden=48).save_pretrained(base)
    model = _quantized(hidden=48)
    with pytest.raises(
        SqlabError,
        match=r"model\.layers\.0\.self_attn\.\w+ has 48 inputs, not a "
        r"multiple of 32 .* pass padded=True",
    ):
        sqlab.export_squeezellm(model, tmp_path / "w3.pt")
    assert not (tmp_path / "w3.pt").exists() and not (tmp_path / "quant_config.json").exists()
    padded = sqlab.export_squeezellm(model, tmp_path / "padded.pt", padded=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_like_the_original(padded, make_llama(hidden=48), 3)  # as the README says
    assert torch.equal(
        sqlab.import_squeezellm(padded, str(base))(X).logits, stored_as(model)(X).logits
    )
    (tmp_path / "orig").mkdir()
    pack_like_the_original(model, tmp_path / "orig" / "w3.pt")  # truncated to 32 inputs
    with pytest.raises(
        SqlabError,
        match=r"packs only the first 32 of the layer's 48 inputs, as "
        "the original packer does .* cannot be imported "
        "faithfully",
    ):
        sqlab.import_squeezellm(tmp_path / "orig" / "w3.pt", str(base))


def test_export_writes_fp16_and_quant_config_beside_and_never_replaces_a_checkpoints(
    tmp_path, tiny_tokenizer
):
    model = _quantized(tie=True)
    path = sqlab.export_squeezellm(model, tmp_path / "out" / "sq-w3.pt")
    state = torch.load(path, weights_only=True)
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    # tied: one tensor under both names, so the file holds it once, as pack.py's does
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert state["model.layers.0.mlp.up_proj.lookup_table"].dtype == torch.float32
    assert json.loads((tmp_path / "out" / "quant_config.json").read_text()) == {"wbits": 3}
    ckpt = sqlab.save_quantized(model, tmp_path / "ckpt", {"wbits": 3}, tiny_tokenizer)
    before = (ckpt / "quant_config.json").read_text()
    with pytest.raises(SqlabError, match="belongs to a sqlab checkpoint"):
        sqlab.export_squeezellm(model, ckpt / "sq-w3.pt")
    assert (ckpt / "quant_config.json").read_text() == before and not (ckpt / "sq-w3.pt").exists()
    with pytest.raises(SqlabError, match=r"holds \{'wbits': 3\}, for another export"):
        sqlab.export_squeezellm(_quantized(wbits=4), tmp_path / "out" / "sq-w4.pt")


def test_sparse_threshold_must_count_the_values(tmp_path, base_dir):
    model = _quantized()
    state = pack_like_the_original(model, tmp_path / "w3.pt")
    name = "model.layers.0.self_attn.k_proj"
    for value, message in (
        (state[f"sparse_threshold.{name}"] + 1, "says .* sparse values, but"),
        (-1, "expected the layer's number of sparse values"),
    ):
        torch.save({**state, f"sparse_threshold.{name}": value}, tmp_path / "bad.pt")
        with pytest.raises(SqlabError, match=rf"sparse_threshold\.{name} in .* {message}"):
            sqlab.import_squeezellm(tmp_path / "bad.pt", str(base_dir))


def test_export_and_import_from_the_command_line(tmp_path, base_dir, tiny_tokenizer):
    model = _quantized()
    ckpt = sqlab.save_quantized(model, tmp_path / "ckpt", {"wbits": 3}, tiny_tokenizer)
    status, stdout, stderr = run_cli(
        "export", "--model", str(ckpt), "--out", str(tmp_path / "zoo" / "sq-w3.pt"), "--balanced"
    )
    assert status == 0 and "the original SqueezeLLM format" in stdout, stderr
    state = torch.load(tmp_path / "zoo" / "sq-w3.pt", weights_only=True)
    assert any(k.endswith(".startrows") for k in state)
    status, stdout, stderr = run_cli(
        "import",
        "--file",
        str(tmp_path / "zoo" / "sq-w3.pt"),
        "--base",
        str(base_dir),
        "--out",
        str(tmp_path / "back"),
    )
    assert status == 0, stderr
    back = sqlab.load(str(tmp_path / "back"), device="cpu")
    assert torch.equal(back(X).logits, stored_as(model)(X).logits)
    status, _, stderr = run_cli("export", "--model", str(base_dir), "--out", str(tmp_path / "x.pt"))
    assert status == 2 and stderr.count("sqlab: error:") == 1
    assert "no SqueezeLinear layers" in stderr
