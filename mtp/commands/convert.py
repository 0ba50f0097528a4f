"""`mtp convert`: checkpoints in and out of other formats.

    mtp convert meta DIR OUT     Meta's multi-token release (params.json + consolidated.*.pth)
    mtp convert hf SRC OUT       a local transformers Llama directory, or a .gguf file
    mtp convert to-hf CKPT OUT   an mtp checkpoint's next-token path as a transformers Llama

OUT is never overwritten unless --overwrite is given. Nothing is downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path

from mtp.commands.common import Parser, emit, parse_dtype
from mtp.errors import MTPError
from mtp.fileio import check_writable


def _dtype(name: str):
    """--dtype: auto keeps the stored dtype (None)."""
    return parse_dtype(name, None, allowed=("float32", "bfloat16", "float16"))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MTPError(f"{out} exists: pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MTPError(f"{out} exists and is not a directory")
    check_writable(out, "OUT", directory=True)  # before the conversion, not after it


def _report(args, source: str, out: Path, model, tok, t0: float) -> int:
    cfg = model.config
    obj = {"source": source, "input": str(args.src), "out": str(out), "vocab_size": cfg.vocab_size,
           "dim": cfg.dim, "n_layers": cfg.n_layers, "n_future": cfg.n_future,
           "params": sum(p.numel() for p in model.parameters()), "tokenizer": tok.name if tok else None,
           "seconds": round(time.perf_counter() - t0, 2)}
    emit(obj, args.json, f"converted {source} {args.src} -> {out} ({obj['params'] / 1e6:.1f}M parameters, "
          f"{cfg.n_layers} blocks, {cfg.n_future} heads, {obj['seconds']:.1f} s)")
    return 0


def _quiet_transformers() -> None:
    """No progress bars from transformers: stderr carries our one-line error, if any."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # the import path reports the missing extra itself
    hf_logging.disable_progress_bar()


def cmd_convert_meta(args) -> int:
    from mtp.checkpoint import save_checkpoint
    from mtp.interop.meta import load_meta

    t0, out = time.perf_counter(), Path(args.out)
    _check_out(out, args.overwrite)
    model, tok, _ = load_meta(args.src, "cpu", dtype=_dtype(args.dtype), tokenizer=args.tokenizer,
                              max_seq_len=args.max_seq_len)
    save_checkpoint(out, model, tok)
    return _report(args, "meta", out, model, tok, t0)


def cmd_convert_hf(args) -> int:
    from mtp.checkpoint import save_checkpoint
    from mtp.interop.hf import import_hf

    t0, out = time.perf_counter(), Path(args.out)
    _check_out(out, args.overwrite)
    _quiet_transformers()
    model, tok = import_hf(args.src, tokenizer=args.tokenizer, dtype=_dtype(args.dtype), max_seq_len=args.max_seq_len)
    save_checkpoint(out, model, tok)
    return _report(args, "hf", out, model, tok, t0)


def cmd_convert_to_hf(args) -> int:
    from mtp.checkpoint import load_checkpoint
    from mtp.interop.hf import save_hf_llama

    t0, out = time.perf_counter(), Path(args.out)
    _check_out(out, args.overwrite)
    _quiet_transformers()
    model, tok, _ = load_checkpoint(args.src, "cpu")
    save_hf_llama(model, out, _dtype(args.dtype), tokenizer=tok)
    return _report(args, "mtp", out, model, tok, t0)


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints: Meta's release or transformers/GGUF -> mtp, "
                       "mtp -> transformers")
    csub = p.add_subparsers(dest="convert_command", required=True, parser_class=Parser)

    def common(cp, src_help: str, importing: bool = True) -> None:
        cp.add_argument("src", help=src_help)
        cp.add_argument("out", help="output directory")
        cp.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
        if importing:
            cp.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the source's)")
            cp.add_argument("--max-seq-len", type=int, default=None, help="context of the converted model")
        cp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        cp.add_argument("--json", action="store_true")

    cp = csub.add_parser("meta", help="Meta's multi-token release directory -> mtp checkpoint")
    common(cp, "directory with params.json, consolidated.*.pth (tokenizer.model there or one level up)")
    cp.set_defaults(func=cmd_convert_meta)
    cp = csub.add_parser("hf", help="transformers Llama directory or .gguf file -> mtp checkpoint")
    common(cp, "a local transformers model directory, or a .gguf file (needs pip install 'mtp[gguf]')")
    cp.set_defaults(func=cmd_convert_hf)
    cp = csub.add_parser("to-hf", help="mtp checkpoint -> transformers LlamaForCausalLM directory (next-token path)")
    common(cp, "an mtp run or checkpoint directory (or a Meta release directory)", importing=False)
    cp.set_defaults(func=cmd_convert_to_hf)
