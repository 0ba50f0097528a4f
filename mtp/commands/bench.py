"""`mtp bench CKPT`: greedy against self-speculative decoding speed, side by side (`mtp.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

from mtp.commands.common import PACK_WEIGHTS, add_decoding_args, emit, file_prompts, int_list, tree_texts
from mtp.errors import MTPError


def cmd_bench(args) -> int:
    from mtp.bench import (DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LEN, check_bench_args, corpus_prompts,
                           default_new_tokens, default_prompt_len, format_table, run_bench)
    from mtp.fileio import check_writable

    batch_sizes, ks = int_list("--batch-sizes", args.batch_sizes), int_list("--k", args.k)
    for flag, value in (("--prompt-len", args.prompt_len), ("--n-prompts", args.n_prompts),
                        ("--max-new-tokens", args.max_new_tokens), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise MTPError(f"{flag} must be at least 1, got {value}")
    if args.plot:
        check_writable(args.plot, "--plot")
    from mtp.commands.common import load_for_decoding

    model, tok, meta = load_for_decoding(args)
    ks = check_bench_args(model, batch_sizes, ks)
    ctx, shortened = model.config.max_seq_len, []
    if args.prompts:
        prompts = file_prompts(args.prompts, tok)
        source = str(args.prompts)
    else:
        prompt_len = args.prompt_len
        if prompt_len is None:  # the defaults fit the model: say what was shortened
            prompt_len = default_prompt_len(ctx, len(tok.bos_ids), args.max_new_tokens)
            if prompt_len != DEFAULT_PROMPT_LEN:
                shortened.append(f"--prompt-len {prompt_len} (default {DEFAULT_PROMPT_LEN})")
        train_cfg = meta.get("train") or {}
        corpus = args.corpus or train_cfg.get("corpus") or ["stdlib"]
        prompts = corpus_prompts(corpus, tok, max(max(batch_sizes), args.n_prompts), prompt_len,
                                 train_cfg.get("val_fraction", 0.005), progress=not args.json)
        source = f"held-out split of {corpus}"
    longest = max(len(p) for p in prompts)
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = default_new_tokens(ctx, longest)
        if max_new != DEFAULT_NEW_TOKENS:
            shortened.append(f"--max-new-tokens {max_new} (default {DEFAULT_NEW_TOKENS})")
    if longest + max_new > ctx:
        raise MTPError(f"prompts of up to {longest} tokens plus --max-new-tokens {max_new} exceed the "
                       f"model's context of {ctx}")
    if shortened:
        print(f"mtp bench: the model's context is {ctx} tokens: using " + " and ".join(shortened), file=sys.stderr)
    if args.tree_max_nodes < 1:
        raise MTPError(f"--tree-max-nodes must be at least 1, got {args.tree_max_nodes}")
    texts = None  # what --tree measures the heads' acceptance on
    if args.tree is not None:
        from mtp.decode.tree import Tree

        if args.tree != "auto":
            Tree.parse(args.tree)  # a malformed spec is refused before any measuring
        texts = tree_texts(args, tok, meta, ctx) if args.tree == "auto" or not args.prompts else prompts
    draft_vocab = None
    if args.draft_vocab is not None:
        from mtp.decode.draft_vocab import checkpoint_draft_vocab

        if args.draft_vocab < 1:
            raise MTPError(f"--draft-vocab must be at least 1, got {args.draft_vocab}")
        draft_vocab = checkpoint_draft_vocab(meta, tok, args.draft_vocab, model.config.vocab_size, args.corpus,
                                             progress=not args.json)
    report = run_bench(model, prompts, batch_sizes, ks, max_new, compile=args.compile, hf=args.hf,
                       pack_weights=PACK_WEIGHTS[args.pack_weights],
                       log=(lambda m: None) if args.json else None, repeats=args.repeats,
                       tree=args.tree, tree_texts=texts, tree_max_nodes=args.tree_max_nodes, draft_vocab=draft_vocab,
                       lookup=args.lookup, lookup_ngram=args.lookup_ngram)
    report = {"checkpoint": str(meta["path"]), "prompts": source, **report}
    if args.plot:
        from mtp.plots import plot_decoding

        chains = {**report, "results": [r for r in report["results"] if "tree" not in r]}  # the chains' bars
        report["plot"] = str(plot_decoding(chains, Path(args.plot), title=f"decoding {meta['path']}"))
    emit(report, args.json, format_table(report))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="greedy vs self-speculative decoding speed, side by side")
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=None)
    p.add_argument("--prompts", default=None, help=".jsonl with a prompt (or text) field, or a text file, one per line")
    p.add_argument("--corpus", nargs="*", default=None, help="held-out prompts from this corpus (default: the "
                   "checkpoint's training corpus)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="tokens per prompt from the corpus (default 64; it and --max-new-tokens, default 128, "
                        "are shortened to fit the model's context when not given)")
    p.add_argument("--n-prompts", type=int, default=8,
                   help="prompts from the corpus (at least the largest batch size); each batch size decodes them all")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--k", default=None, help="heads to speculate with, e.g. 2,3,4 (default: 2..all)")
    p.add_argument("--hf", action="store_true", help="also time transformers' greedy generate on the same weights")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest is reported")
    p.add_argument("--plot", default=None, help="also draw the table as a bar chart into this PNG")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="the heads draft only among the N most frequent tokens of the training split of the "
                        "corpus (--corpus, default: the checkpoint's): a cheaper draft, the same output")
    p.set_defaults(func=cmd_bench)
