"""Tests for mtp.tokenizers: byte and BPE tokenizers, save/load, get_tokenizer, train_bpe."""

import json

import numpy as np
import pytest
import torch

from mtp.errors import MTPError
from mtp.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)

UNICODE_TEXT = "héllo wörld: 日本語 ✓ 😀\n\tdef f(x):\n        return x ** 2  # ünïcödé\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small BPE tokenizer trained on a few files of code and prose."""
    corpus = tmp_path_factory.mktemp("bpe_corpus")
    files = []
    for i in range(3):
        path = corpus / f"f{i}.py"
        lines = [f"def function_{j}(x, y):\n    return x * {j} + y  # número {j}\n"
                 for j in range(50)]
        path.write_text("".join(lines) + "Привет, мир! " * 20, encoding="utf-8")
        files.append(path)
    return train_bpe(files, vocab_size=400, out_path=corpus / "out" / "tokenizer.json")


# ---------------------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_constants():
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)


def test_byte_round_trip_arbitrary_bytes_including_invalid_utf8():
    tok = ByteTokenizer()
    data = bytes(range(256)) + b"\xff\xfe\xc3(\xe2\x82" + "ünï".encode() + b"\x00"
    ids = tok.encode(data)
    assert ids == list(data)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode_bytes(ids) == data
    assert tok.decode_bytes(np.array(ids)) == data
    assert tok.decode_bytes(torch.tensor(ids)) == data


def test_byte_encode_str_is_utf8_and_decode_replaces_invalid():
    tok = ByteTokenizer()
    assert tok.encode(UNICODE_TEXT) == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"


def test_byte_decode_drops_eot():
    tok = ByteTokenizer()
    assert tok.decode([104, tok.eot_id, 105, tok.eot_id]) == "hi"
    assert tok.decode_bytes([tok.eot_id]) == b""


def test_byte_encode_batch_and_arrays():
    tok = ByteTokenizer()
    texts = ["ab", b"\xff", ""]
    assert tok.encode_batch(texts) == [[97, 98], [255], []]
    arrays = tok.encode_arrays(texts)
    assert [a.tolist() for a in arrays] == [[97, 98], [255], []]


def test_byte_save_and_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"type": "byte", "eot_id": 256, "vocab_size": 257}
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer_config.json"]  # no temp left


# ----------------------------------------------------------------------------- BPE tokenizer


def test_train_bpe_writes_file_and_has_eot(bpe, tmp_path):
    assert isinstance(bpe, BPETokenizer)
    assert bpe.name == "bpe"
    assert 257 < bpe.vocab_size <= 400
    assert bpe.hf_tokenizer.id_to_token(bpe.eot_id) == "<|endoftext|>"
    assert bpe.source.endswith("tokenizer.json")


def test_bpe_round_trip_unicode(bpe):
    ids = bpe.encode(UNICODE_TEXT)
    assert bpe.decode(ids) == UNICODE_TEXT
    assert bpe.eot_id not in ids
    # it learned merges: fewer ids than bytes on text like its corpus
    code = "def function_7(x, y):\n    return x * 7 + y\n"
    assert len(bpe.encode(code)) < len(code.encode())


def test_bpe_encode_bytes_and_batch(bpe):
    texts = [UNICODE_TEXT, "x = 1\n", ""]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert bpe.encode(UNICODE_TEXT.encode("utf-8")) == bpe.encode(UNICODE_TEXT)
    assert [a.tolist() for a in bpe.encode_arrays(texts)] == bpe.encode_batch(texts)


def test_bpe_literal_special_token_in_text_is_plain_text(bpe):
    text = "before <|endoftext|> after"
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_decode_drops_eot_and_replaces_broken_utf8(bpe):
    ids = bpe.encode("ab")
    assert bpe.decode([bpe.eot_id] + ids + [bpe.eot_id]) == "ab"
    char_ids = bpe.encode("日")  # not in the training corpus: one id per UTF-8 byte
    assert len(char_ids) == 3
    assert bpe.decode(char_ids[:2]) == "\ufffd"


def test_bpe_save_load_gives_identical_ids(bpe, tmp_path):
    bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"type": "bpe", "eot_id": bpe.eot_id, "vocab_size": bpe.vocab_size}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.vocab_size, loaded.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert loaded.encode(UNICODE_TEXT) == bpe.encode(UNICODE_TEXT)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_get_tokenizer_specs(bpe, tmp_path):
    assert isinstance(get_tokenizer(None), ByteTokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    from_file = get_tokenizer(bpe.source)
    assert isinstance(from_file, BPETokenizer)
    assert from_file.eot_id == bpe.eot_id
    assert from_file.encode(UNICODE_TEXT) == bpe.encode(UNICODE_TEXT)
    (tmp_path / "ckpt").mkdir()
    bpe.save(tmp_path / "ckpt")
    assert get_tokenizer(str(tmp_path / "ckpt")).encode("x = 1") == bpe.encode("x = 1")


def test_get_tokenizer_missing_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(MTPError, match="nope"):
        get_tokenizer(str(missing))


def test_load_tokenizer_missing_or_corrupt(tmp_path, bpe):
    with pytest.raises(MTPError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(MTPError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"type": "bpe", "eot_id": 0}')
    with pytest.raises(MTPError, match="tokenizer.json"):  # config says bpe, file missing
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(MTPError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["vocab_size"] += 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MTPError, match="vocab_size"):
        load_tokenizer(tmp_path)


def _hf_tokenizer_file(directory, special_tokens):
    """A tiny byte-level BPE tokenizer.json with the given special tokens (no <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["some text to train on"] * 10, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok, directory / "tokenizer.json"


def test_tokenizer_json_without_endoftext_uses_eos(tmp_path):
    hf, path = _hf_tokenizer_file(tmp_path / "a", ["<pad>", "</s>"])
    assert get_tokenizer(str(path)).eot_id == hf.token_to_id("</s>")
    # an eos token named by a Hugging Face tokenizer_config.json beside the file wins
    hf, path = _hf_tokenizer_file(tmp_path / "b", ["<pad>", "<my_end>"])
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<my_end>"}))
    assert get_tokenizer(str(path)).eot_id == hf.token_to_id("<my_end>")


def test_tokenizer_json_without_any_eot_is_an_error(tmp_path):
    _, path = _hf_tokenizer_file(tmp_path, ["<pad>"])
    with pytest.raises(MTPError, match="eos"):
        get_tokenizer(str(path))


def test_train_bpe_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello")
    with pytest.raises(MTPError, match="vocab_size"):
        train_bpe([corpus], vocab_size=100, out_path=tmp_path / "t.json")
    with pytest.raises(MTPError, match="missing.txt"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300, out_path=tmp_path / "t.json")


def test_prompts_follow_each_tokenizers_start_token_convention(tmp_path, bpe):
    """A Hugging Face tokenizer whose post-processor adds a BOS (add_bos_token, as Llama's) puts
    it before prompts, not before training text; ours (bytes, trained BPE) put nothing."""
    from tokenizers.processors import TemplateProcessing

    hf, path = _hf_tokenizer_file(tmp_path / "llama", ["<s>", "</s>"])
    bos = hf.token_to_id("<s>")
    hf.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf.save(str(path))
    tok = get_tokenizer(str(path))
    assert tok.bos_ids == (bos,)
    assert tok.encode_prompt("some text") == [bos, *tok.encode("some text")]
    assert bos not in tok.encode("some text")
    assert "'<s>'" in tok.prompt_convention() and f"id {bos}" in tok.prompt_convention()
    # a post-processor that appends (eos) but prepends nothing adds no start token
    hf.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", hf.token_to_id("</s>"))])
    hf.save(str(path))
    assert get_tokenizer(str(path)).bos_ids == ()
    for ours in (ByteTokenizer(), bpe):
        assert ours.bos_ids == () and ours.encode_prompt("abc") == ours.encode("abc")
        assert ours.prompt_convention() == "no start token"
