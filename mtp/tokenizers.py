"""Tokenizers: raw bytes (the default), byte-level BPE through Hugging Face ``tokenizers``, and
SentencePiece models (Llama 2's ``tokenizer.model``, as in Meta's multi-token release; needs the
``sentencepiece`` package: pip install 'mtp[gguf]').

All share one small interface, :class:`Tokenizer`:

* ``name`` ("byte", "bpe" or "sentencepiece"), ``vocab_size`` (every id, specials included) and ``eot_id``, the
  end-of-text id that separates documents in the token shards and stops generation;
* ``encode`` / ``encode_batch`` turn text (``str`` or ``bytes``) into ids, adding no specials;
* ``decode`` turns ids back into text, dropping specials and replacing broken UTF-8;
* ``save(directory)`` writes the tokenizer into a checkpoint directory, which
  :func:`load_tokenizer` reads back.

:func:`get_tokenizer` maps a command-line spec (``None``, ``"byte"``, a ``tokenizer.json`` file or
a directory) to a tokenizer, and :func:`train_bpe` trains a BPE vocabulary on local files.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from mtp.errors import MTPError
from mtp.fileio import atomic_write

EOT_TOKEN = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
BPE_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
KINDS = ("byte", "bpe", "sentencepiece")

# Tried in order when a tokenizer.json has no <|endoftext|> and no config names its eos token.
_KNOWN_EOS_TOKENS = ("</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>", "<|eot_id|>")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory + rename."""
    atomic_write(path, [text])


def _as_text(text: str | bytes) -> str:
    """Text for a str-based tokenizer: bytes are decoded as UTF-8, invalid bytes replaced."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="replace")
    return text


def _int_array(ids: Iterable[int]) -> np.ndarray:
    """``ids`` (a list, numpy array, torch tensor or any iterable) as a flat int64 array."""
    if isinstance(ids, np.ndarray):
        arr = ids
    elif hasattr(ids, "tolist"):  # a torch tensor
        arr = np.asarray(ids.tolist())
    else:
        arr = np.asarray(list(ids))
    return arr.astype(np.int64, copy=False).reshape(-1)


class Tokenizer:
    """Common interface of all tokenizers (subclass it, or provide the same attributes)."""

    name: str
    vocab_size: int
    eot_id: int
    # the ids this tokenizer's convention puts before a prompt (Llama's BOS): none for ours
    bos_ids: tuple[int, ...] = ()
    # a Jinja chat template (Hugging Face's `chat_template`, kept from an imported model), or None
    chat_template: str | None = None

    def encode(self, text: str | bytes) -> list[int]:
        """Ids of ``text``, without any special token."""
        raise NotImplementedError

    def encode_prompt(self, text: str | bytes) -> list[int]:
        """Ids of a prompt to decode from: ``bos_ids`` (the model family's start tokens), then
        ``encode(text)``. Training data is encoded without them (documents are separated by
        the end-of-text token)."""
        return [*self.bos_ids, *self.encode(text)]

    def prompt_convention(self) -> str:
        """How prompts start, in words (for `mtp info`)."""
        if not self.bos_ids:
            return "no start token"
        return "starts with " + ", ".join(f"{self.decode_piece(i)!r} (id {i})" for i in self.bos_ids)

    def decode_piece(self, i: int) -> str:
        """The text of one id, specials included."""
        return self.decode([i])

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        """``encode`` applied to every text (subclasses may do it faster)."""
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Like ``encode_batch`` but returns int64 numpy arrays (the fast path for sharding)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials are dropped and invalid UTF-8 becomes U+FFFD."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write this tokenizer's files into ``directory`` (which must exist)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string that changes whenever the mapping from text to ids changes (for caches)."""
        return f"{self.name}-{self.vocab_size}-{self.eot_id}"

    def _write_config(self, directory: Path) -> None:
        config = {"type": self.name, "eot_id": self.eot_id, "vocab_size": self.vocab_size}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes themselves, id 256 is ``<|endoftext|>``; any bytes round-trip."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    @staticmethod
    def _bytes(text: str | bytes) -> bytes:
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)

    def encode_array(self, text: str | bytes) -> np.ndarray:
        """The bytes of ``text`` (UTF-8 for str) as a uint8 array, without copying bytes input."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)

    def encode(self, text: str | bytes) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids``; ``eot`` (and anything outside 0..255) is dropped."""
        arr = _int_array(ids)
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        self._write_config(Path(directory))


class BPETokenizer(Tokenizer):
    """Byte-level BPE held by a Hugging Face ``tokenizers.Tokenizer``.

    Build one with :meth:`from_file` (a ``tokenizer.json``, e.g. GPT-NeoX's) or :func:`train_bpe`.
    Special-token strings inside the text are encoded as ordinary text, so a document that
    mentions ``<|endoftext|>`` does not produce a document break.
    """

    name = "bpe"

    def __init__(self, hf_tokenizer, eot_id: int, source: str = "<memory>"):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True
        self.eot_id = int(eot_id)
        self.source = source
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        if not 0 <= self.eot_id < self.vocab_size:
            raise MTPError(f"{source}: end-of-text id {self.eot_id} outside the vocabulary")
        self.bos_ids = self._leading_special_ids()

    def _leading_special_ids(self) -> tuple[int, ...]:
        """What the tokenizer's post-processor puts before a text (its `add_bos_token` setting,
        as transformers writes it into the pipeline): the ids it adds in front of "x"."""
        plain = self._tok.encode("x", add_special_tokens=False).ids
        full = self._tok.encode("x", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return tuple(full[:i])
        return ()

    @classmethod
    def from_file(cls, path: str | Path, eot_id: int | None = None) -> "BPETokenizer":
        """Load a ``tokenizer.json``; the end-of-text id is ``eot_id`` if given, else found.

        It is ``<|endoftext|>`` if the vocabulary has it, else the eos token named by a
        ``tokenizer_config.json`` / ``special_tokens_map.json`` beside the file, else a well-known
        eos token among its added tokens; MTPError if none of these exists.
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise MTPError(f"tokenizer file not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for bad JSON
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MTPError(f"cannot load tokenizer {path}: {first_line}") from None
        if eot_id is None:
            eot_id = _find_eot_id(tok, path)
        return cls(tok, eot_id, source=str(path))

    @property
    def hf_tokenizer(self):
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def to_json(self) -> str:
        """The ``tokenizer.json`` text of this tokenizer."""
        return self._tok.to_str()

    def encode(self, text: str | bytes) -> list[int]:
        return self._tok.encode(_as_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        encodings = self._tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_int_array(ids).tolist(), skip_special_tokens=True)

    def decode_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        _atomic_write_text(directory / BPE_FILE, self.to_json())
        self._write_config(directory)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]
        return f"{super().fingerprint()}-{digest}"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. Llama 2's ``tokenizer.model``), through the ``sentencepiece``
    package. ``encode`` adds no bos/eos (SentencePiece's dummy-prefix space is kept, as in Llama);
    ``encode_prompt`` puts the model's bos (``<s>``) first, as Llama and Meta's multi-token
    release do when they generate; control tokens such as ``</s>`` written inside the text are
    encoded as ordinary text; the end-of-text id is the model's eos (``</s>``)."""

    name = "sentencepiece"

    def __init__(self, processor, eot_id: int | None = None, source: str = "<memory>"):
        self._sp = processor
        self.source = source
        self.vocab_size = int(processor.get_piece_size())
        if eot_id is None:
            eot_id = processor.eos_id()
            if eot_id < 0:
                eot_id = processor.piece_to_id("</s>")
                if processor.id_to_piece(eot_id) != "</s>":
                    raise MTPError(f"{source}: this SentencePiece model has no eos token (</s>)")
        self.eot_id = int(eot_id)
        if not 0 <= self.eot_id < self.vocab_size:
            raise MTPError(f"{source}: end-of-text id {self.eot_id} outside the vocabulary")
        bos = processor.bos_id()
        self.bos_ids = (int(bos),) if 0 <= bos < self.vocab_size else ()

    @staticmethod
    def _module():
        try:
            import sentencepiece
        except ImportError:
            raise MTPError("SentencePiece tokenizers need the sentencepiece package: pip install 'mtp[gguf]'") from None
        return sentencepiece

    @classmethod
    def from_file(cls, path: str | Path, eot_id: int | None = None) -> "SentencePieceTokenizer":
        """Load a SentencePiece ``tokenizer.model``; MTPError if it is missing or not one."""
        path = Path(path)
        if not path.is_file():
            raise MTPError(f"tokenizer file not found: {path}")
        spm = cls._module()
        try:
            proc = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError / OSError for a bad proto
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MTPError(f"cannot load SentencePiece model {path}: {first_line}") from None
        return cls(proc, eot_id, source=str(path))

    @property
    def processor(self):
        """The wrapped ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def encode(self, text: str | bytes) -> list[int]:
        return self._sp.encode(_as_text(text))

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return self._sp.encode([_as_text(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        arr = _int_array(ids)
        return self._sp.decode(arr[(arr >= 0) & (arr < self.vocab_size)].tolist())

    def decode_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        atomic_write(directory / SP_FILE, [self.model_proto()], binary=True)
        self._write_config(directory)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.model_proto()).hexdigest()[:16]
        return f"{super().fingerprint()}-{digest}"


def _find_eot_id(tok, path: Path) -> int:
    """The end-of-text id of a Hugging Face tokenizer loaded from ``path`` (see from_file)."""
    eot = tok.token_to_id(EOT_TOKEN)
    if eot is not None:
        return eot
    for side_file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = json.loads((path.parent / side_file).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return tok.token_to_id(eos)
    for name in _KNOWN_EOS_TOKENS:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise MTPError(f"{path}: no {EOT_TOKEN} or eos token in this tokenizer")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read the tokenizer that :meth:`Tokenizer.save` wrote into ``directory``."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MTPError(f"no tokenizer in {directory}: {CONFIG_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise MTPError(f"corrupt tokenizer config {config_path}: {e}") from None
    if not isinstance(config, dict) or config.get("type") not in KINDS:
        raise MTPError(f"corrupt tokenizer config {config_path}: 'type' must be 'byte', 'bpe' or 'sentencepiece'")
    if config["type"] == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        eot_id = config.get("eot_id")
        if not isinstance(eot_id, int):
            raise MTPError(f"corrupt tokenizer config {config_path}: 'eot_id' must be an integer")
        if config["type"] == "bpe":
            tokenizer = BPETokenizer.from_file(directory / BPE_FILE, eot_id=eot_id)
        else:
            tokenizer = SentencePieceTokenizer.from_file(directory / SP_FILE, eot_id=eot_id)
    for field in ("eot_id", "vocab_size"):
        if field in config and config[field] != getattr(tokenizer, field):
            raise MTPError(
                f"corrupt tokenizer config {config_path}: {field} is {config[field]}, "
                f"the tokenizer has {getattr(tokenizer, field)}"
            )
    if isinstance(config.get("chat_template"), str):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


def get_tokenizer(spec: str | Path | None) -> Tokenizer:
    """The tokenizer named by ``spec``.

    ``None`` or ``"byte"``: :class:`ByteTokenizer`; a path to a ``tokenizer.json`` file:
    :class:`BPETokenizer`; a SentencePiece ``.model`` file: :class:`SentencePieceTokenizer`; a
    directory: what :func:`load_tokenizer` reads there (or its ``tokenizer.json`` /
    ``tokenizer.model`` if it is a plain Hugging Face / Meta tokenizer directory).
    """
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer.from_file(path)
        return BPETokenizer.from_file(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).exists() and (path / BPE_FILE).is_file():
            return BPETokenizer.from_file(path / BPE_FILE)
        if not (path / CONFIG_FILE).exists() and (path / SP_FILE).is_file():
            return SentencePieceTokenizer.from_file(path / SP_FILE)
        return load_tokenizer(path)
    raise MTPError(f"tokenizer not found: {spec} (expected 'byte', a tokenizer.json or a folder)")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the tokenizer's vocabulary up so the unembedding matmul has friendly shapes."""
    return multiple * math.ceil(n / multiple)


def check_vocab(tokenizer, vocab_size: int, source: str, exact: bool = False) -> None:
    """MTPError unless the tokenizer belongs to a model of `vocab_size` embeddings: it must emit
    no id the model lacks (a trained model's vocabulary is the tokenizer's, padded: pad_vocab);
    exact: the sizes must be equal (an imported model, whose rows are its tokenizer's ids)."""
    n = tokenizer.vocab_size
    if n > vocab_size or (exact and n != vocab_size):
        raise MTPError(f"{source}: the tokenizer has {n} ids but the model's vocab_size is {vocab_size}"
                       + ("" if exact else ": the model has no embedding for some of its ids"))


def _iter_file_chunks(files: Sequence[Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Text of ``files`` in pieces of about ``chunk_chars`` characters, cut after a newline."""
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                pending: list[str] = []
                size = 0
                for line in f:
                    pending.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(pending)
                        pending, size = [], 0
                if pending:
                    yield "".join(pending)
        except OSError as e:
            raise MTPError(f"cannot read {path}: {e.strerror or e}") from None


def train_bpe(files: Sequence[str | Path], vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids on ``files``, save it to ``out_path``.

    The files are streamed in chunks (never read into one string). The vocabulary holds the 256
    byte symbols, ``<|endoftext|>`` (id 0) and the learned merges; it may be smaller than
    ``vocab_size`` when the corpus has fewer distinct merges. ``out_path`` is a ``tokenizer.json``.
    """
    files = [Path(f) for f in files]
    if not files:
        raise MTPError("train_bpe: no files given")
    for f in files:
        if not f.is_file():
            raise MTPError(f"BPE training file not found: {f}")
    return train_bpe_from_texts(_iter_file_chunks(files), vocab_size, out_path)


def train_bpe_from_texts(texts: Iterable[str | bytes], vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Like ``train_bpe`` on a stream of texts (e.g. a corpus's documents: the text fields of a
    ``.jsonl`` file rather than its JSON syntax); bytes are decoded as UTF-8 with replacement."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_size = 256 + 1
    if vocab_size < min_size:
        raise MTPError(f"BPE vocab_size must be at least {min_size} (256 bytes + {EOT_TOKEN})")
    texts = (t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts)

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bpe = BPETokenizer(tok, tok.token_to_id(EOT_TOKEN), source=str(out_path))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out_path, bpe.to_json())
    return bpe
