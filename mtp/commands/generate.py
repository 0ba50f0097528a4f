"""`mtp generate CKPT --prompt TEXT`: generate text, with self-speculative decoding by default
(`mtp.generate`); --prompts FILE decodes many prompts in batches, --tree decodes a token tree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtp.commands.common import PACK_WEIGHTS, add_decoding_args, file_prompts, tree_texts
from mtp.errors import MTPError


class _Stream:
    """Prints decoded text as tokens arrive, holding back what may still change: an unfinished
    UTF-8 character, and a tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stops):
        self.tok, self.tokens, self.shown = tokenizer, [], ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def __call__(self, step_tokens):
        self.tokens.extend(step_tokens[0])
        text = self.tok.decode(self.tokens).rstrip("\ufffd")
        self._show(text[: len(text) - self.hold] if self.hold else text)

    def _show(self, text):
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, final_text):
        self._show(final_text)
        sys.stdout.write("\n")


def _gen_config(args, tok):
    from mtp.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, speculative=args.speculative,
                            eot_id=getattr(tok, "eot_id", None), stop=tuple(args.stop or ()), compile=args.compile,
                            pack_weights=PACK_WEIGHTS[args.pack_weights],
                            tree=None if args.tree in (None, "auto") else args.tree, lookup=args.lookup,
                            lookup_ngram=args.lookup_ngram)


def _auto_tree(args, model, tok, meta, batch: int):
    """--tree auto for mtp generate: the tree chosen for this model, device and batch size."""
    from mtp.decode.tree import auto_tree

    if args.compile:
        raise MTPError("tree decoding runs eagerly: drop --compile to use --tree")
    choice = auto_tree(model, tree_texts(args, tok, meta, model.config.max_seq_len), batch=batch,
                       max_nodes=args.tree_max_nodes, max_depth=None if args.speculative is None else args.speculative - 1,
                       pack_weights=PACK_WEIGHTS[args.pack_weights])
    print(f"[tree: {choice.tree.spec() or 'none (plain decoding pays best here)'}; {choice.tree.size} nodes, "
          f"expecting {choice.expected_tokens_per_step:.2f} tokens per step; chosen in {choice.seconds:.1f} s]",
          file=sys.stderr)
    return choice.tree


def _stats_line(s, reason: str | None = None) -> str:
    acc = " / ".join(f"{a:.2f}" for a in s.acceptance_by_head)
    return (f"[{s.new_tokens} tokens in {s.seconds:.2f}s, {s.tokens_per_s:,.1f} tok/s, k={s.k}, "
            f"{s.tokens_per_forward:.2f} tokens/forward" + (f", acceptance by head {acc}" if acc else "")
            + (f", stop: {reason}" if reason else "") + "]")


def cmd_generate(args) -> int:
    from mtp.generate import generate

    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompts)) != 1:
        raise MTPError("give one of --prompt TEXT, --prompt-file FILE or --prompts FILE")
    if args.batch_size < 1:
        raise MTPError(f"--batch-size must be at least 1, got {args.batch_size}")
    if any(not s for s in args.stop or ()):  # "" is in every text: it would stop after one token
        raise MTPError("--stop must not be an empty string")
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise MTPError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    else:
        text = args.prompt
    from mtp.commands.common import load_for_decoding

    model, tok, meta = load_for_decoding(args)
    cfg = _gen_config(args, tok)
    if args.tree_max_nodes < 1:
        raise MTPError(f"--tree-max-nodes must be at least 1, got {args.tree_max_nodes}")
    if args.tree == "auto":
        cfg.tree = _auto_tree(args, model, tok, meta, 1 if args.prompts is None else args.batch_size)
    cfg.validate()
    if args.prompts is not None:
        return _generate_batch(model, tok, cfg, args)
    prompt = tok.encode_prompt(text)
    if cfg.compile and not args.json:
        print("[compiling the decode step; the time below includes it]", file=sys.stderr)
    stream = None if args.json else _Stream(tok, cfg.stop)
    out = generate(model, [prompt], cfg, tokenizer=tok, on_step=stream)
    s = out.stats
    if args.json:
        print(json.dumps({"text": out.texts[0], "tokens": out.tokens[0], "prompt_tokens": len(prompt),
                          "stop_reason": out.stop_reasons[0], "stats": s.to_dict()}))
    else:
        stream.finish(out.texts[0])
        print(_stats_line(s, out.stop_reasons[0]), file=sys.stderr)
    return 0


def _generate_batch(model, tok, cfg, args) -> int:
    """--prompts FILE: every prompt of the file, --batch-size at a time (rows of a batch decode
    together, each at its own length). Text: each completion under a '### i' line; --json: one
    object with a result per prompt and the statistics of each batch."""
    from mtp.generate import generate

    prompts = file_prompts(args.prompts, tok)
    results, batches = [], []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        out = generate(model, chunk, cfg, tokenizer=tok)
        batches.append(out.stats.to_dict())
        for j, (prompt, toks, text, reason) in enumerate(zip(chunk, out.tokens, out.texts, out.stop_reasons)):
            results.append({"index": start + j, "text": text, "tokens": toks, "prompt_tokens": len(prompt),
                            "stop_reason": reason})
            if not args.json:
                print(f"### {start + j}\n{text}", flush=True)
        if not args.json:
            print(_stats_line(out.stats), file=sys.stderr)
    if args.json:
        print(json.dumps({"results": results, "batches": batches}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text, with self-speculative decoding by default")
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=256)
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--prompts", default=None, help="many prompts: .jsonl with a prompt (or text) field, "
                   "or a text file, one per line; decoded --batch-size at a time")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="heads drafting and verifying per step (default: all; 1: plain decoding)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    p.set_defaults(func=cmd_generate)
