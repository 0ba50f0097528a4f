"""Tests for mtp.data: corpus discovery, token shards and their cache, batch sampling."""

import os

import numpy as np
import pytest
import torch

import mtp.data as data
from mtp.data import (
    build_token_data,
    check_tokens,
    eval_batches,
    resolve_corpus,
    sample_batch,
    stdlib_dir,
)
from mtp.errors import MTPError
from mtp.tokenizers import ByteTokenizer, Tokenizer, train_bpe

EOT = ByteTokenizer.eot_id


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    """A directory mixing usable text files with files discovery must skip."""
    root = tmp_path / "corpus"
    write(root / "a.py", "print('a')\n")
    write(root / "b.txt", "bee\n")
    write(root / "sub" / "deeper" / "c.md", "# see\n")
    write(root / "sub" / "d.rs", "fn main() {}\n")
    write(root / ".hidden" / "x.py", "hidden = 1\n")
    write(root / ".dotfile.py", "dot = 1\n")
    write(root / "__pycache__" / "y.py", "cached = 1\n")
    write(root / "binary.py", b"\x00\x01\x02binary")
    write(root / "image.png", "not really an image")
    write(root / "empty.txt", "")
    return root


def split_docs(arr):
    """The documents of a shard: token lists between eot separators."""
    docs, current = [], []
    for t in np.asarray(arr).tolist():
        if t == EOT:
            docs.append(bytes(current))
            current = []
        else:
            current.append(t)
    docs.append(bytes(current))
    return docs


# --------------------------------------------------------------------------------- discovery


def test_resolve_directory_picks_text_files_only(corpus):
    files = resolve_corpus([str(corpus)])
    rel = [f.relative_to(corpus.resolve()).as_posix() for f in files]
    assert rel == ["a.py", "b.txt", "sub/d.rs", "sub/deeper/c.md"]
    assert all(f.is_absolute() for f in files)


def test_resolve_glob_file_and_dedup(corpus):
    files = resolve_corpus([str(corpus / "**" / "*.md"), str(corpus / "a.py"), str(corpus)])
    assert files == sorted(set(files))
    assert len(files) == 4
    assert resolve_corpus([str(corpus / "*.txt")]) == [(corpus / "b.txt").resolve()]
    # a file named explicitly is taken whatever its extension
    assert resolve_corpus([str(corpus / "image.png")]) == [(corpus / "image.png").resolve()]


def test_resolve_errors_name_the_path(tmp_path, corpus):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(MTPError, match="does_not_exist"):
        resolve_corpus([str(missing)])
    with pytest.raises(MTPError, match=r"\*\.zzz"):
        resolve_corpus([str(corpus / "*.zzz")])
    empty = tmp_path / "empty_dir"
    write(empty / "nothing.txt", "")
    with pytest.raises(MTPError, match="empty_dir"):
        resolve_corpus([str(empty)])
    with pytest.raises(MTPError, match="binary.py"):
        resolve_corpus([str(corpus / "binary.py")])
    with pytest.raises(MTPError, match="corpus has no text"):
        resolve_corpus([str(corpus / "empty.txt")])
    with pytest.raises(MTPError):
        resolve_corpus([])


def test_directory_without_known_extensions_names_what_it_skipped(tmp_path):
    """Licence texts named Apache-2.0 or GPL-2 are skipped by a directory walk (no known
    extension): the error says so, names them, and gives the glob that takes them."""
    lic = tmp_path / "licences"
    write(lic / "Apache-2.0", "Apache License\nVersion 2.0\n" * 10)
    write(lic / "sub" / "GPL-2", "GNU GENERAL PUBLIC LICENSE\n" * 10)
    (lic / "blob").write_bytes(b"\0\1\2binary")
    write(lic / ".hidden", "not counted\n")
    with pytest.raises(MTPError) as e:
        resolve_corpus([str(lic)])
    msg = str(e.value)
    assert "skipped 2 other text files (Apache-2.0, GPL-2)" in msg and "blob" not in msg and "hidden" not in msg
    glob = msg.split("'")[-2]
    assert glob == str(lic / "**" / "*")
    assert [p.name for p in resolve_corpus([glob])] == ["Apache-2.0", "GPL-2"]
    (lic / "Apache-2.0").unlink()
    (lic / "sub" / "GPL-2").unlink()
    with pytest.raises(MTPError, match=r"no text files in corpus directory .*licences$"):  # only binary left
        resolve_corpus([str(lic)])


def test_resolve_stdlib():
    files = resolve_corpus(["stdlib"])
    assert len(files) > 1000
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert (stdlib_dir() / "os.py").resolve() in files


# ------------------------------------------------------------------------------------- jsonl


def test_jsonl_documents_text_and_content(tmp_path):
    path = write(tmp_path / "d.jsonl",
                 '{"text": "first"}\n\n{"content": "second", "id": 2}\n{"text": ""}\n'
                 '{"text": "third ✓"}\n')
    result = build_token_data([str(path)], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.0, progress=False)
    docs = split_docs(result.train) + split_docs(result.val)
    assert sorted(docs) == sorted([b"first", b"second", "third ✓".encode()])
    assert result.meta["n_docs_train"] + result.meta["n_docs_val"] == 3


def test_jsonl_custom_field_and_bad_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"body": "x"}\n')
    with pytest.raises(MTPError, match=r"d\.jsonl.*line 1"):
        build_token_data([str(path)], ByteTokenizer(), tmp_path / "cache", progress=False)
    result = build_token_data([str(path)], ByteTokenizer(), tmp_path / "cache",
                              text_field="body", progress=False)
    assert result.meta["n_tokens_train"] + result.meta["n_tokens_val"] == 1
    write(path, '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(MTPError, match=r"d\.jsonl: line 2: invalid JSON"):
        build_token_data([str(path)], ByteTokenizer(), tmp_path / "cache", progress=False)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []  # failed builds leave no temporary directory


# ------------------------------------------------------------------------------------ shards


@pytest.fixture
def many_docs(tmp_path):
    root = tmp_path / "many"
    contents = {}
    for i in range(200):
        text = f"document number {i}: " + "x" * (i % 7)
        write(root / f"d{i:03d}.txt", text)
        contents[f"d{i:03d}.txt"] = text.encode()
    return root, contents


def test_split_by_document(tmp_path, many_docs):
    root, contents = many_docs
    result = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.1, progress=False)
    train, val = split_docs(result.train), split_docs(result.val)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(contents.values())
    assert 5 <= len(val) <= 40  # about 10% of 200
    meta = result.meta
    assert (meta["n_docs_train"], meta["n_docs_val"]) == (len(train), len(val))
    assert (meta["n_tokens_train"], meta["n_tokens_val"]) == (len(result.train), len(result.val))
    # documents are joined with eot between them (none at the ends)
    assert int((np.asarray(result.train) == EOT).sum()) == len(train) - 1
    assert result.train[0] != EOT and result.train[-1] != EOT
    assert meta["dtype"] == "uint16" and result.train.dtype == np.uint16
    assert isinstance(result.train, np.memmap)
    assert (meta["tokenizer"], meta["vocab_size"], meta["n_files"]) == ("byte", 257, 200)
    assert meta["split"] == "document"


def test_split_is_stable_across_corpus_growth(tmp_path, many_docs):
    root, _ = many_docs
    first = split_docs(build_token_data([str(root)], ByteTokenizer(), tmp_path / "c1",
                                        val_fraction=0.1, progress=False).val)
    write(root / "new.txt", "a brand new document")
    second = split_docs(build_token_data([str(root)], ByteTokenizer(), tmp_path / "c2",
                                         val_fraction=0.1, progress=False).val)
    assert set(first) <= set(second)


def test_tiny_corpus_moves_last_document_to_val(tmp_path):
    for name in "abc":
        write(tmp_path / "tiny" / f"{name}.txt", f"doc {name}")
    result = build_token_data([str(tmp_path / "tiny")], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.0, progress=False)
    assert split_docs(result.train) == [b"doc a", b"doc b"]
    assert split_docs(result.val) == [b"doc c"]


def test_min_val_tokens_moves_documents_then_positions(tmp_path):
    for name in "abcd":
        write(tmp_path / "tiny" / f"{name}.txt", f"doc {name}" * 3)  # 15 bytes each
    result = build_token_data([str(tmp_path / "tiny")], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.0, min_val_tokens=20, progress=False)
    assert split_docs(result.val) == [b"doc cdoc cdoc c", b"doc ddoc ddoc d"]
    assert result.meta["split"] == "document"
    result = build_token_data([str(tmp_path / "tiny")], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.0, min_val_tokens=60, progress=False)
    assert len(result.val) == 60 and result.meta["split"] == "document+position"
    assert split_docs(result.train) == [b"doc"]  # the tail of the last train document moved
    assert split_docs(result.val)[-1] == b" adoc adoc a"


def test_single_document_split_by_position(tmp_path):
    text = bytes(range(256)) * 4  # 1024 bytes, invalid UTF-8 included
    path = write(tmp_path / "one.bin.txt", text.replace(b"\x00", b"\x01"))
    result = build_token_data([str(path)], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.1, progress=False)
    assert result.meta["split"] == "position"
    assert len(result.val) == 103  # ceil(1024 * 0.1)
    joined = np.concatenate([result.train, result.val]).astype(np.uint8).tobytes()
    assert joined == path.read_bytes()


def test_large_file_streamed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_LARGE_FILE", 100)
    monkeypatch.setattr(data, "_PIECE_BYTES", 64)
    monkeypatch.setattr(data, "_FLUSH_TOKENS", 50)
    text = "".join(f"line {i} ✓\n" for i in range(300)).encode()
    write(tmp_path / "big" / "big.txt", text)
    write(tmp_path / "big" / "small.txt", "small")
    result = build_token_data([str(tmp_path / "big")], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.0, progress=False)
    assert split_docs(result.train) == [text]  # one document, no eot inside
    assert split_docs(result.val) == [b"small"]


class BigVocabTokenizer(Tokenizer):
    """Bytes shifted above 65535, so ids need uint32."""

    name = "big"
    vocab_size = 70_000
    eot_id = 69_999

    def encode(self, text):
        raw = text.encode() if isinstance(text, str) else text
        return [65_536 + b for b in raw]


def test_dtype_follows_vocab_size(tmp_path, many_docs):
    root, _ = many_docs
    big = build_token_data([str(root)], BigVocabTokenizer(), tmp_path / "cache", progress=False)
    assert big.train.dtype == np.uint32 and big.meta["dtype"] == "uint32"
    assert int(np.asarray(big.train).max()) == 69_999 and int(np.asarray(big.train).min()) >= 65_536
    small = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert small.train.dtype == np.uint16
    assert len(small.train) == len(big.train)
    assert big.directory != small.directory


def test_cache_reused_without_retokenizing(tmp_path, many_docs, monkeypatch):
    root, _ = many_docs
    first = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache", progress=False)
    train_bin = first.directory / "train.bin"
    mtime = train_bin.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenised a cached corpus")

    for method in ("encode", "encode_batch", "encode_arrays", "encode_array"):
        monkeypatch.setattr(ByteTokenizer, method, fail)
    second = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert second.directory == first.directory
    assert train_bin.stat().st_mtime_ns == mtime
    assert second.meta == first.meta
    np.testing.assert_array_equal(second.train, first.train)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.directory.name]

    # a changed file or a different split changes the key: it is tokenised again
    monkeypatch.undo()
    write(root / "d000.txt", "changed content, longer than before")
    os.utime(root / "d000.txt", ns=(1, 1))
    third = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert third.directory != first.directory
    fourth = build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache",
                              val_fraction=0.2, progress=False)
    assert fourth.directory not in (first.directory, third.directory)


def test_bpe_shards_decode_to_documents(tmp_path, many_docs):
    root, contents = many_docs
    bpe = train_bpe(sorted(root.iterdir())[:50], vocab_size=300, out_path=tmp_path / "t.json")
    result = build_token_data([str(root)], bpe, tmp_path / "cache", val_fraction=0.1,
                              progress=False)
    assert result.meta["tokenizer"] == "bpe"
    docs = []
    for split in (result.train, result.val):
        ids = np.asarray(split).tolist()
        cuts = [-1] + [i for i, t in enumerate(ids) if t == bpe.eot_id] + [len(ids)]
        docs += [bpe.decode(ids[a + 1 : b]).encode() for a, b in zip(cuts, cuts[1:])]
    assert sorted(docs) == sorted(contents.values())
    assert len(result.train) < sum(len(c) for c in contents.values())  # merges were used


def test_progress_goes_to_stderr(tmp_path, many_docs, capfd):
    root, _ = many_docs
    build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache", progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "tokenizing" in err
    build_token_data([str(root)], ByteTokenizer(), tmp_path / "cache2", progress=False)
    assert capfd.readouterr() == ("", "")


# ----------------------------------------------------------------------------------- batches


def test_check_tokens():
    check_tokens(np.zeros(9), 8, "val")
    with pytest.raises(MTPError, match=r"val has 8 tokens, fewer than seq_len\+1 = 9"):
        check_tokens(np.zeros(8), 8, "val")


@pytest.fixture
def tokens(tmp_path):
    """A memmapped token array whose values are their own positions."""
    arr = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="w+", shape=(5000,))
    arr[:] = np.arange(5000)
    arr.flush()
    return np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")


def test_sample_batch_shape_and_real_windows(tokens):
    batch = sample_batch(tokens, 16, 32, seed=0, step=3)
    assert batch.shape == (16, 33) and batch.dtype == torch.long
    for row in batch.tolist():
        start = row[0]
        assert 0 <= start <= len(tokens) - 33
        assert row == np.asarray(tokens[start : start + 33]).tolist()


def test_sample_batch_determinism(tokens):
    def draw(**kw):
        args = dict(seed=1, step=5, micro=0, rank=0, world_size=1) | kw
        return sample_batch(tokens, 8, 16, **args)

    assert torch.equal(draw(), draw())
    for change in ({"step": 6}, {"seed": 2}, {"micro": 1}, {"rank": 1, "world_size": 2}):
        assert not torch.equal(draw(), draw(**change)), change
    # the global batch is the same however it is split over ranks
    halves = [sample_batch(tokens, 4, 16, seed=1, step=5, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), draw())


def test_sample_batch_uses_whole_range():
    tokens = np.arange(10, dtype=np.uint16)
    starts = torch.cat([sample_batch(tokens, 64, 4, seed=0, step=s)[:, 0] for s in range(10)])
    assert set(starts.tolist()) == set(range(6))  # every start 0 .. len - seq_len - 1


def test_sample_batch_too_short():
    with pytest.raises(MTPError, match="fewer than seq_len"):
        sample_batch(np.zeros(10, dtype=np.uint16), 2, 10, seed=0, step=0)


def test_eval_batches(tokens):
    batches = list(eval_batches(tokens, 4, 49, max_batches=3))
    assert len(batches) == 3 and all(b.shape == (4, 50) for b in batches)
    starts = torch.cat(batches)[:, 0].tolist()
    assert starts == sorted(starts) and starts[0] == 0
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))  # no overlap
    assert starts[-1] == len(tokens) - 50  # spread over the whole split
    again = list(eval_batches(tokens, 4, 49, max_batches=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    for row in torch.cat(batches).tolist():
        assert row == np.asarray(tokens[row[0] : row[0] + 50]).tolist()


def test_eval_batches_on_small_split():
    tokens = np.arange(100, dtype=np.uint16)  # room for exactly 2 windows of 50
    batches = list(eval_batches(tokens, 4, 49, max_batches=10))
    assert len(batches) == 1 and batches[0].shape == (2, 50)
    assert batches[0][:, 0].tolist() == [0, 50]


def test_document_identity_survives_adding_files_elsewhere(tmp_path):
    """The held-out split hashes document identities: adding a file in a sibling directory (or
    moving the corpus) must not change the identities, hence the split, of the others."""
    from mtp.data import iter_documents

    a = tmp_path / "proj" / "a"
    a.mkdir(parents=True)
    for i in range(5):
        (a / f"m{i}.py").write_text(f"x = {i}\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.py").write_text("y = 1\n")
    alone = {p for p, _, _ in iter_documents(resolve_corpus([str(a)]))}
    together = {p for p, _, _ in iter_documents(resolve_corpus([str(a), str(other)]))}
    assert alone < together and len(together) == len(alone) + 1
