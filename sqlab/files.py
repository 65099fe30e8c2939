"""Writing files safely: atomic replacement, reproducible safetensors, locks, early checks.

Every file sqlab writes appears complete or not at all (``atomic_path``); a
directory is filled under a temporary name beside its target and published at
the end (``partial_dir``, ``publish``); two runs writing the same target exclude
each other (``exclusive``); and a location is checked for writability before
any long work starts (``writable_dir``, ``writable_file``). A write that fails
raises ``SqlabError`` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import SqlabError

# a file inside each temporary directory sqlab fills; only directories holding it are cleaned up
PARTIAL_MARKER = ".sqlab-partial"
CHECKSUM = "sha256"  # the safetensors metadata key of a file's checksum


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    A failure (or an interrupt) removes the temporary file, and ``path`` keeps its old
    content; an ``OSError`` becomes a ``SqlabError`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
    except OSError as exc:
        raise SqlabError(f"cannot write {str(path)!r}: {_why(exc)}") from exc
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise SqlabError(f"cannot write {str(path)!r}: {_why(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload) -> Path:
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def torch_save(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of tensors (every name, dtype, shape and byte) and metadata, in name order."""
    sha = hashlib.sha256()
    for key, value in sorted((metadata or {}).items()):
        if key != CHECKSUM:
            sha.update(f"{key}\0{value}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        sha.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


# safetensors' names of torch dtypes, in the order of its Dtype enum: its writer lays tensors out
# by that rank, highest first, then by name
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a safetensors file to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def write_safetensors(
    path: str | Path,
    specs: Iterable[TensorSpec],
    pieces: Callable[[TensorSpec], Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file written one tensor, or one piece of a tensor, at a time; atomic.

    The header comes from ``specs`` alone; then ``pieces(spec)`` yields each tensor's
    content as tensors of its dtype whose bytes, in order, make up the tensor in
    row-major order (the whole tensor, or slices of rows). Only one piece is held at
    a time, so a file larger than memory can be written. The bytes are those of
    ``safetensors.torch.save_file`` (same layout, same header) with the metadata keys
    sorted, so the same tensors always give the same file.
    """
    specs = sorted(specs, key=lambda s: (-_RANK[s.dtype], s.name))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for spec in specs:
            written = 0
            for piece in pieces(spec):
                if piece.dtype != spec.dtype:
                    raise ValueError(
                        f"{spec.name}: a piece of dtype {piece.dtype}, expected {spec.dtype}"
                    )
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
            if written != spec.nbytes:
                raise ValueError(
                    f"{spec.name}: {written} bytes written, its shape "
                    f"{spec.shape} needs {spec.nbytes}"
                )
    return Path(path)


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    *,
    checksum: bool = False,
) -> Path:
    """``safetensors.torch.save_file``, atomic and byte-reproducible (``write_safetensors``).

    ``checksum`` stores the SHA-256 of the tensors and the metadata in the
    metadata, which ``load_safetensors(..., verify=True)`` checks.
    """
    metadata = dict(metadata or {})
    tensors = {k: v.detach() for k, v in tensors.items()}
    if checksum:
        metadata[CHECKSUM] = digest(tensors, metadata)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_safetensors(path, specs, lambda spec: [tensors[spec.name]], metadata)


class SafetensorsReader:
    """One safetensors file read a tensor, or some rows of one, at a time, without mapping it.

    ``safe_open`` maps the whole file, and every page it reads stays in the process's
    resident memory while the file is open; reading with ``readinto`` into a fresh
    tensor keeps only what the caller holds. ``SqlabError`` for an unreadable file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        try:
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {
                k: (names[v["dtype"]], tuple(v["shape"]), 8 + size + v["data_offsets"][0])
                for k, v in header.items()
            }
            end = 8 + size + max((v["data_offsets"][1] for v in header.values()), default=0)
            if self.path.stat().st_size < end:
                raise ValueError(
                    f"it ends at byte {self.path.stat().st_size}, its header says {end}"
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SqlabError(
                f"cannot read {str(self.path)!r}: missing, truncated or not a "
                f"safetensors file ({type(exc).__name__}: {exc})"
            ) from exc

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or its rows ``start:stop`` (along the first dimension)."""
        dtype, shape, offset = self.entries[name]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else min(stop, rows)
        row = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        try:
            with open(self.path, "rb") as f:
                f.seek(offset + start * row)
                view = out.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(view)) != view.nbytes:
                    raise OSError("the file ends early")
        except OSError as exc:
            raise SqlabError(
                f"cannot read {name} from {str(self.path)!r}: {_why(exc) if exc.strerror else exc}"
            ) from exc
        return out


def load_safetensors(
    path: str | Path, *, verify: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file.

    ``SqlabError`` if it is unreadable or, with ``verify``, if its stored checksum
    is missing or does not match.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SqlabError(
            f"cannot read {str(path)!r}: missing, truncated or not a safetensors file ({said})"
        ) from exc
    if verify:
        expected, found = metadata.get(CHECKSUM), digest(tensors, metadata)
        if expected is None:
            raise SqlabError(
                f"{str(path)!r} records no checksum (an older sqlab wrote it), so it "
                "cannot be trusted"
            )
        if expected != found:
            raise SqlabError(
                f"{str(path)!r} is damaged: its content has SHA-256 {found[:12]}..., "
                f"the file records {expected[:12]}..."
            )
    return tensors, metadata


def _absolute(path: str | Path, what: str) -> Path:
    absolute = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not absolute.name:
        raise SqlabError(
            f"{what} {str(path)!r} names no directory that can be written; give a "
            "path such as out/model-w3"
        )
    return absolute


def _probe(folder: Path, path: str | Path, what: str) -> None:
    """Create and delete a file in ``folder`` (``os.access`` misleads for root and read-only fs)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".sqlab-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise SqlabError(
            f"{what} {str(path)!r} is not writable: cannot create files in "
            f"{str(folder)!r} ({_why(exc)}); choose a location you can write "
            "to"
        ) from exc


def _existing_parent(path: Path, given: str | Path, what: str) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SqlabError(
            f"{what} {str(given)!r} cannot be created: {str(parent)!r} is a file, not a directory"
        )
    return parent


def writable_dir(path: str | Path, what: str) -> Path:
    """The absolute path of an output directory, checked before any long work.

    It must be a directory or not exist yet, and both it and the folder it sits in
    (where temporary files, the work directory and the lock go) must be writable.
    """
    absolute = _absolute(path, what)
    if absolute.exists() and not absolute.is_dir():
        raise SqlabError(
            f"{what} {str(path)!r} is a file; expected a directory (a new one, or a "
            "sqlab checkpoint to replace)"
        )
    _probe(_existing_parent(absolute, path, what), path, what)
    if absolute.is_dir():
        _probe(absolute, path, what)
    return absolute


def writable_file(path: str | Path, what: str) -> Path:
    """The absolute path of an output file, checked before any long work."""
    absolute = _absolute(path, what)
    if absolute.is_dir():
        raise SqlabError(
            f"{what} {str(path)!r} is a directory; expected a file name such as out/result.json"
        )
    _probe(_existing_parent(absolute, path, what), path, what)
    return absolute


def _partials(out: Path) -> list[Path]:
    return [
        p
        for p in out.parent.glob(f".{out.name}.tmp-*")
        if p.is_dir() and not p.is_symlink() and (p / PARTIAL_MARKER).is_file()
    ]


def partial_dir(out: Path) -> Path:
    """A new temporary directory beside ``out`` to fill, marked as sqlab's.

    Call it holding the lock on ``out`` (``exclusive``): then every other marked
    temporary directory of ``out`` is left over from a killed run, and is removed.
    """
    for stale in _partials(out):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        (tmp / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise SqlabError(f"cannot write {str(out)!r}: {_why(exc)}") from exc
    return tmp


def publish(tmp: Path, out: Path, *, stale: Iterable[str] = (), last: str | None = None) -> None:
    """Move the files written into ``tmp`` (a ``partial_dir``) to ``out``.

    A new ``out`` is one rename of the whole directory. Into an existing directory
    the files move one by one (each replaced atomically, ``last`` after the others),
    then the names in ``stale`` that were not rewritten are deleted; every other file
    in ``out`` is left as it is.
    """
    try:
        (tmp / PARTIAL_MARKER).unlink()
        os.chmod(tmp, 0o777 & ~_umask())
        if not out.exists():
            os.replace(tmp, out)
            return
        names = {p.name for p in tmp.iterdir()}
        for name in sorted(names - {last}):
            os.replace(tmp / name, out / name)
        for old in sorted(set(stale) - names):
            if "/" not in old and (out / old).is_file():
                (out / old).unlink()
        if last in names:
            os.replace(tmp / last, out / last)
    except OSError as exc:
        raise SqlabError(f"cannot write {str(out)!r}: {_why(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HELD: dict[str, int] = {}  # lock files this process holds, with their nesting depth


def lock_path(out: Path) -> Path:
    """The lock file of an output path: hidden, beside it, removed when the run ends."""
    return out.with_name(f".{out.name}.lock")


def _holder() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    text = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}"
    return " ".join(text.split())


@contextlib.contextmanager
def exclusive(out: Path, what: str) -> Iterator[None]:
    """Hold the lock on ``out`` while the block runs; nested use in one process is allowed.

    Another process holding it ends in a ``SqlabError`` naming that run. The lock
    is ``flock`` on ``lock_path(out)``: the kernel releases it when a run dies, and
    the file is deleted by whoever holds it at the end.
    """
    key = str(lock_path(out))
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(key, what)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(key)
        os.close(fd)


def _acquire(key: str, what: str) -> int:
    while True:
        try:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SqlabError(
                f"cannot create the lock file {key!r} for {what}: {_why(exc)}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = " ".join(os.read(fd, 4096).decode(errors="replace").split())
            os.close(fd)
            raise SqlabError(
                f"another sqlab run ({holder or 'starting up'}) is writing {what}; "
                "wait for it to finish, or choose another output (its lock: "
                f"{key})"
            ) from None
        try:
            current = os.stat(key).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else its last holder deleted the file after we opened it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, _holder().encode())
    return fd
