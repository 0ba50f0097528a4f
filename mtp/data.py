"""Corpus discovery, tokenisation into memory-mapped shards, deterministic batch sampling.

The flow is ``resolve_corpus`` (specs -> sorted text files) -> ``build_token_data`` (files ->
``train.bin`` / ``val.bin`` token shards in a cache directory, built once and memory-mapped) ->
``sample_batch`` / ``eval_batches`` (shards -> ``(B, T + 1)`` LongTensors of consecutive tokens).

Documents: a ``.jsonl`` line (its ``text`` or ``content`` field) or any other whole file. In a
shard, documents are joined with the tokenizer's ``eot_id`` between them. The held-out split is
by document, decided by a stable hash of the document's identity (its directory's name and its
file name, plus the line number for ``.jsonl``), so adding files or moving the corpus moves no
other document between the splits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mtp.errors import MTPError

TEXT_EXTENSIONS = frozenset(
    ".py .pyi .pyx .txt .md .rst .tex .c .h .cc .cpp .cxx .hpp .hh .cs .java .kt .scala .go .rs "
    ".swift .m .js .jsx .mjs .ts .tsx .rb .php .pl .lua .r .jl .hs .ml .zig .sql .sh .bash .zsh "
    ".ps1 .bat .json .jsonl .toml .yaml .yml .ini .cfg .xml .html .htm .css .scss .csv .tsv".split()
)
TEXT_FILENAMES = frozenset({"Makefile", "Dockerfile", "README", "LICENSE", "CMakeLists.txt"})
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
JSONL_FIELDS = ("text", "content")  # the configured field first, then these fallbacks

CACHE_FORMAT = 2                  # bump when the shard layout or the split changes
_SNIFF_BYTES = 8192               # a NUL byte in the first 8 KB marks a file as binary
_LARGE_FILE = 8 << 20             # files above this are read (and encoded) in pieces
_PIECE_BYTES = 4 << 20
_BATCH_DOCS = 256                 # documents per encode call
_BATCH_BYTES = 4 << 20            # ... or this much text, whichever comes first
_FLUSH_TOKENS = 1 << 21           # tokens buffered in memory before they go to the .bin file


# --------------------------------------------------------------------------------------------
# Corpus discovery


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(_SNIFF_BYTES)
    except OSError as e:
        raise MTPError(f"cannot read {path}: {e.strerror or e}") from None


def _is_text_name(path: Path) -> bool:
    return path.suffix.lower() in TEXT_EXTENSIONS or path.name in TEXT_FILENAMES


def _walk(directory: Path, suffixes: frozenset[str] | None = None) -> list[Path]:
    """Non-empty text files under ``directory``, skipping hidden and cache directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith("."):
                continue
            if suffixes is not None and path.suffix not in suffixes:
                continue
            if suffixes is None and not _is_text_name(path):
                continue
            if path.is_file() and path.stat().st_size > 0 and not _is_binary(path):
                found.append(path)
    return found


def _unnamed_text(directory: Path) -> list[Path]:
    """The files a directory walk leaves out only for their names: non-empty, not binary, but
    without a known text extension or file name (licence files such as ``Apache-2.0``)."""
    skipped = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if (not name.startswith(".") and not _is_text_name(path) and path.is_file()
                    and path.stat().st_size > 0 and not _is_binary(path)):
                skipped.append(path)
    return sorted(skipped)


def default_cache_dir() -> Path:
    """Where token shards (and the trunk cache, mtp.distill) are kept: $MTP_CACHE, else ~/.cache/mtp."""
    return Path(os.environ.get("MTP_CACHE", Path.home() / ".cache" / "mtp"))


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _expand(spec: str) -> list[Path]:
    """The files named by one spec (see :func:`resolve_corpus`)."""
    if spec == "stdlib":
        files = _walk(stdlib_dir(), suffixes=frozenset({".py"}))
        if not files:
            raise MTPError(f"no .py files in the standard library at {stdlib_dir()}")
        return files
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise MTPError(f"corpus pattern matched nothing: {spec}")
        files = []
        for match in map(Path, matches):
            if match.is_dir():
                files += _walk(match)
            elif match.is_file() and match.stat().st_size > 0 and not _is_binary(match):
                files.append(match)
        if not files:
            raise MTPError(f"corpus pattern matched no text files: {spec}")
        return files
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _walk(path)
        if not files:
            skipped = _unnamed_text(path)
            if skipped:
                names = ", ".join(p.name for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
                raise MTPError(f"no files with a known text extension in corpus directory {path}; skipped "
                               f"{len(skipped)} other text file{'s' if len(skipped) > 1 else ''} ({names}): to take "
                               f"every file, give a glob in quotes: '{path / '**' / '*'}'")
            raise MTPError(f"no text files in corpus directory {path}")
        return files
    if path.is_file():
        if _is_binary(path):
            raise MTPError(f"corpus file is binary, not text: {path}")
        return [path]
    raise MTPError(f"corpus path not found: {spec}")


def resolve_corpus(specs: Sequence[str]) -> list[Path]:
    """Resolve corpus specs into a sorted, deduplicated list of absolute text-file paths.

    A spec is a directory (searched recursively for text and code files by extension, skipping
    hidden directories, ``__pycache__`` and binary files; when it has none, the error names the
    text files it skipped for their names), a glob pattern (the files it matches are taken
    whatever their extension, unless binary), a file (taken whatever its extension, unless
    binary), or ``stdlib``: the running Python's standard library ``.py`` source (without
    site-packages). MTPError for a missing path, a pattern matching nothing, or a
    corpus without any text.
    """
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    if not specs:
        raise MTPError("no corpus given")
    files = sorted({p.resolve() for spec in specs for p in _expand(str(spec))})
    if sum(p.stat().st_size for p in files) == 0:
        raise MTPError(f"corpus has no text: {' '.join(map(str, specs))}")
    return files


# --------------------------------------------------------------------------------------------
# Documents


def _doc_identity(path: Path) -> str:
    """A file's identity for the held-out split: its directory's name and its own name. It does
    not change when the corpus moves or other files are added; a rare clash of two identities
    only means the two files share their split."""
    return "/".join(path.parts[-2:])


def _read_pieces(path: Path) -> Iterator[bytes]:
    """A non-JSONL file's bytes: whole if small, else in pieces cut after a newline."""
    try:
        if path.stat().st_size <= _LARGE_FILE:
            yield path.read_bytes()
            return
        with open(path, "rb") as f:
            carry = b""
            while block := f.read(_PIECE_BYTES):
                block = carry + block
                cut = block.rfind(b"\n") + 1 or len(block)
                carry = block[cut:]
                if cut:
                    yield block[:cut]
            if carry:
                yield carry
    except OSError as e:
        raise MTPError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-empty document of a JSONL file."""
    fields = (text_field,) + tuple(f for f in JSONL_FIELDS if f != text_field)
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    msg = getattr(e, "msg", None) or str(e).splitlines()[0]
                    raise MTPError(f"{path}: line {lineno}: invalid JSON ({msg})") from None
                text = next(
                    (record[k] for k in fields if isinstance(record, dict)
                     and isinstance(record.get(k), str)),
                    None,
                )
                if text is None:
                    raise MTPError(
                        f"{path}: line {lineno}: no string field {' or '.join(map(repr, fields))}"
                    )
                if text:
                    yield lineno, text
    except OSError as e:
        raise MTPError(f"cannot read {path}: {e.strerror or e}") from None


def iter_documents(
    files: Sequence[Path], text_field: str = "text"
) -> Iterator[tuple[str, str | bytes, bool]]:
    """Stream the corpus as ``(doc_id, piece, first)`` triples.

    ``doc_id`` is the file's directory name and name (``dir/name:line`` for JSONL documents);
    ``piece`` is the document's text (bytes for plain files, str for JSONL), or a part of it for
    large files, in which case ``first`` is True only on the document's first piece.
    """
    files = [Path(f) for f in files]
    if not files:
        return
    for path in files:
        yield from _file_documents(path, _doc_identity(path), text_field)


def _file_documents(
    path: Path, rel: str, text_field: str
) -> Iterator[tuple[str, str | bytes, bool]]:
    """The ``(doc_id, piece, first)`` triples of one file whose identity is ``rel``."""
    if path.suffix.lower() == ".jsonl":
        for lineno, text in _jsonl_documents(path, text_field):
            yield f"{rel}:{lineno}", text, True
    else:
        first = True
        for piece in _read_pieces(path):
            yield rel, piece, first
            first = False


def _in_val(doc_id: str, val_fraction: float) -> bool:
    """Stable held-out decision: a 64-bit hash of the document identity, scaled to [0, 1)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


# --------------------------------------------------------------------------------------------
# Token shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _ShardWriter:
    """Appends documents' tokens to one .bin file, with ``eot_id`` between documents."""

    def __init__(self, path: Path, dtype: np.dtype, eot_id: int, vocab_size: int):
        self.path, self.dtype, self.eot_id, self.vocab_size = path, dtype, eot_id, vocab_size
        self.n_tokens = 0
        self.doc_starts = array("q")  # token offset where each document begins
        self._file = open(path, "wb")
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def begin_doc(self) -> None:
        if self.doc_starts:
            self.write(np.array([self.eot_id]))
        self.doc_starts.append(self.n_tokens)

    def write(self, ids: np.ndarray) -> None:
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size {self.vocab_size}")
        self._buffer.append(ids.astype(self.dtype, copy=False))
        self._buffered += ids.size
        self.n_tokens += ids.size
        if self._buffered >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).tofile(self._file)
            self._buffer, self._buffered = [], 0
        self._file.flush()

    def doc_end(self, j: int) -> int:
        """Offset just past document ``j`` (its separator excluded)."""
        return self.doc_starts[j + 1] - 1 if j + 1 < self.n_docs else self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        self.flush()
        with open(self.path, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            return np.fromfile(f, dtype=self.dtype, count=stop - start)

    def truncate(self, n_tokens: int) -> None:
        self.flush()
        self._file.truncate(n_tokens * self.dtype.itemsize)
        self._file.seek(n_tokens * self.dtype.itemsize)
        self.n_tokens = n_tokens

    def close(self) -> None:
        self.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        """Close without flushing (the build failed; its directory is about to be removed)."""
        self._file.close()


def _copy_tokens(src: _ShardWriter, dst: _ShardWriter, start: int, stop: int) -> None:
    for a in range(start, stop, _FLUSH_TOKENS):
        dst.write(src.read(a, min(stop, a + _FLUSH_TOKENS)))


def _move_last_docs(src: _ShardWriter, dst: _ShardWriter, k: int) -> None:
    """Move ``src``'s last ``k`` documents, in order, to the end of ``dst``."""
    if k <= 0:
        return
    first = src.n_docs - k
    for j in range(first, src.n_docs):
        dst.begin_doc()
        _copy_tokens(src, dst, src.doc_starts[j], src.doc_end(j))
    src.truncate(max(src.doc_starts[first] - 1, 0))  # drop the separator before them too
    del src.doc_starts[first:]


def _move_tail_tokens(src: _ShardWriter, dst: _ShardWriter, n: int) -> None:
    """Move ``src``'s last ``n`` tokens (part of its last document) to a new document of ``dst``."""
    dst.begin_doc()
    _copy_tokens(src, dst, src.n_tokens - n, src.n_tokens)
    src.truncate(src.n_tokens - n)


def _balance_splits(
    train: _ShardWriter, val: _ShardWriter, val_fraction: float, min_val_tokens: int
) -> str:
    """Fix splits the hash left degenerate; returns how val was made ("document"/"position").

    Both splits get at least one document. When the corpus is a single document, its last
    ``val_fraction`` of tokens (at least ``min_val_tokens``, at least one) become val. When val has
    fewer than ``min_val_tokens`` tokens, train's last documents move to val (keeping one in train)
    and, if that is still not enough, the tail of train's last document.
    """
    if train.n_docs == 0:
        _move_last_docs(val, train, 1)
    if train.n_docs + val.n_docs == 1:
        n = train.n_tokens
        n_val = min(n - 1, max(1, math.ceil(n * val_fraction), min_val_tokens))
        if n_val >= 1:
            _move_tail_tokens(train, val, n_val)
        return "position"

    def val_tokens_after_moving(k: int) -> int:
        if k == 0:
            return val.n_tokens
        moved = train.n_tokens - train.doc_starts[train.n_docs - k]
        return val.n_tokens + moved + (1 if val.n_docs else 0)

    k = 0 if val.n_docs else 1
    while val_tokens_after_moving(k) < min_val_tokens and k < train.n_docs - 1:
        k += 1
    _move_last_docs(train, val, k)
    need = min(min_val_tokens - val.n_tokens - 1, train.n_tokens - 1)  # -1: the separator
    if need >= 1:
        _move_tail_tokens(train, val, need)
        return "document+position"
    return "document"


def _tokenizer_identity(tokenizer) -> str:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        return fingerprint()
    return f"{tokenizer.name}-{tokenizer.vocab_size}-{tokenizer.eot_id}"


def _encode_pieces(tokenizer, pieces: list) -> list[np.ndarray]:
    if hasattr(tokenizer, "encode_arrays"):
        return tokenizer.encode_arrays(pieces)
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(pieces)]


@dataclass
class TokenData:
    """Tokenised corpus: memory-mapped ``train`` and ``val`` token arrays plus their ``meta``."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    directory: Path | None = field(default=None)


def _open_shard(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot memory-map an empty file
    arr = np.memmap(path, dtype=dtype, mode="r")
    if arr.shape[0] != n_tokens:
        raise MTPError(f"corrupt token cache {path.parent}: delete it and run again")
    return arr


def _load_entry(directory: Path) -> TokenData:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        train = _open_shard(directory / "train.bin", dtype, meta["n_tokens_train"])
        val = _open_shard(directory / "val.bin", dtype, meta["n_tokens_val"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MTPError(f"corrupt token cache {directory}: {e}; delete it and run again") from None
    return TokenData(train=train, val=val, meta=meta, directory=directory)


def build_token_data(
    specs: Sequence[str],
    tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.005,
    min_val_tokens: int = 0,
    progress: bool = True,
    *,
    text_field: str = "text",
) -> TokenData:
    """Tokenise the corpus ``specs`` once into ``cache_dir/<key>/`` and memory-map the result.

    ``key`` hashes the resolved files (paths, sizes, mtimes), the tokenizer's identity and the
    split settings, so a second call with the same inputs only opens the memmaps. The entry is
    built in a temporary directory and renamed when complete. Documents are streamed: the corpus
    is never held in memory, only a few MB of text and tokens at a time.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MTPError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = resolve_corpus(specs)
    stats = [f.stat() for f in files]
    key_material = {
        "format": CACHE_FORMAT,
        "files": [[str(f), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)],
        "tokenizer": _tokenizer_identity(tokenizer),
        "val_fraction": val_fraction,
        "min_val_tokens": min_val_tokens,
        "text_field": text_field,
    }
    key = hashlib.sha256(json.dumps(key_material).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"{tokenizer.name}-{key}"
    if (final / "meta.json").is_file():
        return _load_entry(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{final.name}-"))
    try:
        meta = _tokenize_into(tmp, files, tokenizer, val_fraction, min_val_tokens, text_field,
                              total_bytes=sum(s.st_size for s in stats), progress=progress)
        meta["key"] = key
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent build of the same entry
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_entry(final)


def _tokenize_into(
    directory: Path, files: list[Path], tokenizer, val_fraction: float, min_val_tokens: int,
    text_field: str, total_bytes: int, progress: bool,
) -> dict:
    """Write train.bin and val.bin into ``directory``; return the metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {
        name: _ShardWriter(directory / f"{name}.bin", dtype, tokenizer.eot_id, tokenizer.vocab_size)
        for name in ("train", "val")
    }
    try:
        split = _stream_documents(splits, files, tokenizer, val_fraction, min_val_tokens,
                                  text_field, total_bytes, progress)
    except BaseException:
        for writer in splits.values():
            writer.discard()
        raise
    train, val = splits["train"], splits["val"]
    for writer in (train, val):
        writer.close()
    return {
        "n_docs_train": train.n_docs,
        "n_docs_val": val.n_docs,
        "n_tokens_train": train.n_tokens,
        "n_tokens_val": val.n_tokens,
        "dtype": dtype.name,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "n_files": len(files),
        "n_bytes": total_bytes,
        "split": split,
        "val_fraction": val_fraction,
        "min_val_tokens": min_val_tokens,
    }


def _stream_documents(
    splits: dict[str, _ShardWriter], files: list[Path], tokenizer, val_fraction: float,
    min_val_tokens: int, text_field: str, total_bytes: int, progress: bool,
) -> str:
    """Encode every document into its split's writer, then balance the splits (see there)."""
    from tqdm import tqdm

    batch: list[tuple[_ShardWriter, bool, str | bytes]] = []
    batch_bytes = 0

    def flush_batch() -> None:
        nonlocal batch, batch_bytes
        pieces = [piece for _, _, piece in batch]
        for (writer, first, _), ids in zip(batch, _encode_pieces(tokenizer, pieces)):
            if first:
                writer.begin_doc()
            writer.write(np.asarray(ids))
        batch, batch_bytes = [], 0

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="tokenizing", disable=not progress, file=sys.stderr)
    writer = splits["train"]
    with bar:
        for i, path in enumerate(files):
            for doc_id, piece, first in _file_documents(path, _doc_identity(path), text_field):
                if first:
                    writer = splits["val" if _in_val(doc_id, val_fraction) else "train"]
                batch.append((writer, first, piece))
                batch_bytes += len(piece)
                if len(batch) >= _BATCH_DOCS or batch_bytes >= _BATCH_BYTES:
                    flush_batch()
            bar.update(path.stat().st_size)
            bar.set_postfix(files=f"{i + 1}/{len(files)}", refresh=False)
        flush_batch()

    train, val = splits["train"], splits["val"]
    if train.n_docs + val.n_docs == 0:
        raise MTPError(f"corpus has no documents with text ({len(files)} files)")
    return _balance_splits(train, val, val_fraction, min_val_tokens)


# --------------------------------------------------------------------------------------------
# Batches


def check_tokens(arr: np.ndarray, seq_len: int, what: str) -> None:
    """MTPError unless ``arr`` holds at least one window of ``seq_len + 1`` tokens."""
    if len(arr) < seq_len + 1:
        raise MTPError(f"{what} has {len(arr)} tokens, fewer than seq_len+1 = {seq_len + 1}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Rows ``tokens[s : s + seq_len + 1]`` as a LongTensor; a memmap only reads those rows."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts.tolist()])
    return torch.from_numpy(rows.astype(np.int64))  # (B, T + 1)


def sample_batch(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    micro: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """A (batch_size, seq_len + 1) LongTensor of random windows of consecutive tokens.

    Window starts are uniform over ``[0, len(tokens) - seq_len - 1]``. They come from a generator
    seeded with ``(seed, step, micro)`` that draws the global batch of ``batch_size * world_size``
    windows, of which ``rank`` takes its slice: a resumed run draws the same batches, ranks draw
    different windows, and the global batch does not depend on how it is split over ranks.
    """
    check_tokens(tokens, seq_len, "token array")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size * world_size)
    return _windows(tokens, starts[rank * batch_size : (rank + 1) * batch_size], seq_len)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> Iterator[torch.Tensor]:
    """Deterministic, non-overlapping windows spread evenly over ``tokens``, in batches.

    Yields up to ``max_batches`` tensors of shape (batch_size, seq_len + 1); only when the split
    holds fewer windows than ``max_batches * batch_size`` is the last batch smaller.
    """
    check_tokens(tokens, seq_len, "token array")
    window = seq_len + 1
    n = min(max_batches * batch_size, len(tokens) // window)
    span = len(tokens) - window  # the last possible start
    # floor(i * span / (n - 1)): consecutive starts differ by >= window since span / (n-1) >= window
    starts = np.arange(n, dtype=np.int64) * span // max(n - 1, 1)
    for i in range(0, n, batch_size):
        yield _windows(tokens, starts[i : i + batch_size], seq_len)
