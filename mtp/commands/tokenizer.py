"""`mtp tokenizer train [CORPUS...] --out FILE`: train a byte-level BPE tokenizer (`mtp.tokenizers`)."""

from __future__ import annotations

from pathlib import Path

from mtp.commands.common import Parser, emit
from mtp.errors import MTPError


def cmd_tokenizer_train(args) -> int:
    from mtp.data import iter_documents, resolve_corpus
    from mtp.fileio import check_writable
    from mtp.tokenizers import train_bpe_from_texts

    if args.vocab_size < 300:
        raise MTPError(f"--vocab-size must be at least 300 for a byte-level BPE, got {args.vocab_size}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MTPError(f"{out} exists: pass --overwrite to replace it")
    check_writable(out, "--out")
    files = resolve_corpus(args.corpus or ["stdlib"])
    tok = train_bpe_from_texts((piece for _, piece, _ in iter_documents(files)), args.vocab_size, out)
    emit({"out": str(out), "vocab_size": tok.vocab_size, "files": len(files)}, args.json,
         f"trained a BPE tokenizer with {tok.vocab_size} ids on {len(files)} files -> {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    tp = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    tp.add_argument("corpus", nargs="*")
    tp.add_argument("--vocab-size", type=int, default=8192)
    tp.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    tp.add_argument("--overwrite", action="store_true")
    tp.add_argument("--json", action="store_true")
    tp.set_defaults(func=cmd_tokenizer_train)
