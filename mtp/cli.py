"""The `mtp` command (also `python -m mtp`, so `torchrun -m mtp train ...` works).

Every command that measures something takes --json: one JSON object on stdout, nothing else
there; progress and logs go to stderr. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from mtp.errors import MTPError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise MTPError(f"{self.prog}: {message}")


def _emit(obj: dict, as_json: bool, text: str) -> None:
    print(json.dumps(obj) if as_json else text)


# ---- mtp train ----------------------------------------------------------------------------
MODEL_FLAGS = ("preset", "n_future", "head_type", "offsets", "dim", "n_layers", "n_heads",
               "n_kv_heads", "tie_embeddings", "max_seq_len")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="*", default=None,
                   help="directories, globs, files (.jsonl with a text field) or 'stdlib' (default)")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl)")
    m = p.add_argument_group("model (taken from the checkpoint with --resume)")
    m.add_argument("--preset", default=None, help="tiny, small, gpt2-124m, 350m, 1b, 7b (default small)")
    m.add_argument("--n-future", type=int, default=None, help="number of prediction heads (default 4)")
    m.add_argument("--head-type", default=None, help="parallel, linear, causal, anticausal, sequential")
    m.add_argument("--offsets", default=None, help="token offset each head predicts, e.g. 1,2,4,128")
    m.add_argument("--dim", type=int, default=None)
    m.add_argument("--n-layers", type=int, default=None)
    m.add_argument("--n-heads", type=int, default=None)
    m.add_argument("--n-kv-heads", type=int, default=None)
    m.add_argument("--max-seq-len", type=int, default=None)
    m.add_argument("--tie-embeddings", action="store_true", default=None)
    t = p.add_argument_group("training")
    t.add_argument("--loss-weights", default=None, help="uniform, main:L, geometric:G, nth, or w1,...,wn")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    t.add_argument("--tokens", type=float, default=None, help="training tokens instead of --steps")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--grad-accum", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of steps)")
    t.add_argument("--grad-clip", type=float, default=None,
                   help="largest global gradient norm (default 1.0; 0: no clipping)")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--naive-loss", action="store_true", help="all heads' logits at once (reference path)")
    t.add_argument("--log-grad-cosine", action="store_true", help="log the cosine similarity of the heads' "
                   "gradients at the trunk output (metrics.jsonl: grad_cosine)")
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--eval-batches", type=int, default=None)
    t.add_argument("--save-every", type=int, default=None)
    t.add_argument("--log-every", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32, bfloat16")
    t.add_argument("--compile", action="store_true", help="torch.compile each block")
    t.add_argument("--fsdp", action="store_true",
                   help="with several processes: FSDP2 (parameters, gradients and optimizer state sharded per "
                        "block) instead of data parallel")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each trunk block's activations in the backward (less memory)")
    t.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: re-runs the command under torchrun (one per GPU)")
    t.add_argument("--tokenizer", default=None, help="'byte' (default) or a tokenizer.json")
    t.add_argument("--val-fraction", type=float, default=None)
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def model_config_from_args(args, vocab_size: int):
    from mtp.config import preset

    def parse_offsets(s):
        try:
            return [int(x) for x in s.split(",")]
        except ValueError:
            raise MTPError(f"--offsets must be comma-separated integers, got {s!r}") from None

    return preset(
        args.preset or "small", vocab_size=vocab_size, n_future=args.n_future if args.n_future is not None else 4,
        head_type=args.head_type, offsets=parse_offsets(args.offsets) if args.offsets else None, dim=args.dim,
        n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        tie_embeddings=args.tie_embeddings, max_seq_len=args.max_seq_len,
    )


# training options that --resume takes from the checkpoint when not given; the others default
# to TrainConfig's values, except warmup (5% of the steps) and seq_len (the model's context)
RESUMABLE = ("steps", "batch_size", "grad_accum", "lr", "grad_clip", "weight_decay", "loss_weights", "eval_every",
             "eval_batches", "save_every", "log_every", "seed", "val_fraction", "warmup", "seq_len")
FINETUNE_FIELDS = ("init_from", "init_n_future", "init_layout", "init_head_type", "freeze", "extra_weight",
                   "extra_weight_warmup")


def _launch_torchrun(args) -> int:
    """`mtp train ... --nproc N` = `torchrun --standalone --nproc-per-node N -m mtp train ...`
    with the same options (rebuilt from the parsed arguments)."""
    import subprocess

    probe = _Parser(prog="mtp train")
    _add_train_args(probe)
    argv = []
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "nproc") or value is None or value is False or value == action.default:
            continue
        if not action.option_strings:  # the corpus
            argv += [str(v) for v in value]
        elif value is True:
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "mtp", "train", *argv]
    print("mtp: running " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.run(cmd).returncode


def cmd_train(args) -> int:
    from mtp.config import TrainConfig
    from mtp.distributed import run_then_teardown
    from mtp.tokenizers import get_tokenizer
    from mtp.train import pad_vocab, train

    if args.steps is not None and args.tokens is not None:
        raise MTPError("give --steps or --tokens, not both")
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise MTPError(f"--tokens must be a finite number > 0, got {args.tokens}")
    saved_train, saved_model, mcfg = {}, None, None
    if args.resume:  # unspecified options continue with the checkpoint's own values
        from mtp.checkpoint import read_meta
        from mtp.config import ModelConfig

        meta = read_meta(args.out)
        saved_train, saved_model = meta.get("train") or {}, meta["model"]
        if any(getattr(args, f) is not None for f in MODEL_FLAGS):
            base = saved_model.to_dict()
            given = model_config_from_args(args, base["vocab_size"]).to_dict()
            explicit = {f for f in MODEL_FLAGS if getattr(args, f) is not None} - {"preset"}
            mcfg = ModelConfig.from_dict({**base, **{k: given[k] for k in explicit}})
    else:
        tok = get_tokenizer(args.tokenizer)
        mcfg = model_config_from_args(args, pad_vocab(tok.vocab_size))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RESUMABLE}
    defaults.update(warmup=None, seq_len=None)
    opt = {k: getattr(args, k) if getattr(args, k) is not None else saved_train.get(k, d)
           for k, d in defaults.items()}
    # an omitted --seq-len is the model's context; a given one must be >= 1 (TrainConfig checks)
    seq_len = opt["seq_len"] if opt["seq_len"] is not None else (mcfg or saved_model).max_seq_len
    steps = opt["steps"]
    for flag, value in (("--batch-size", opt["batch_size"]), ("--grad-accum", opt["grad_accum"]),
                        ("--seq-len", seq_len)):
        if value < 1:  # before --tokens divides by them
            raise MTPError(f"{flag} must be at least 1, got {value}")
    if args.tokens is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # every process trains on its own batch
        steps = max(1, int(args.tokens // (opt["batch_size"] * seq_len * opt["grad_accum"] * world)))
    warmup = opt["warmup"] if opt["warmup"] is not None else max(1, steps // 20)
    tcfg = TrainConfig(
        corpus=args.corpus or saved_train.get("corpus") or ["stdlib"], out=args.out, steps=steps,
        batch_size=opt["batch_size"], grad_accum=opt["grad_accum"], seq_len=seq_len, lr=opt["lr"], warmup=warmup,
        weight_decay=opt["weight_decay"], grad_clip=opt["grad_clip"], loss_weights=opt["loss_weights"],
        memory_efficient=not args.naive_loss, eval_every=opt["eval_every"], eval_batches=opt["eval_batches"],
        save_every=opt["save_every"], log_every=opt["log_every"], seed=opt["seed"], device=args.device,
        dtype=args.dtype, compile=args.compile, tokenizer=args.tokenizer, val_fraction=opt["val_fraction"],
        fsdp=args.fsdp, activation_checkpointing=args.activation_checkpointing, log_grad_cosine=args.log_grad_cosine,
    )
    if args.resume:  # a fine-tuning run (mtp finetune) resumes with its own freeze and head schedule
        carried = {k: saved_train[k] for k in FINETUNE_FIELDS if k in saved_train}
        tcfg = dataclasses.replace(tcfg, **carried)
    if args.nproc is not None and args.nproc < 1:
        raise MTPError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from mtp.data import resolve_corpus
        from mtp.parallel import check_fsdp
        from mtp.train import prepare_run

        # bad input ends here with one line, before any process is launched
        saved_mcfg, _ = prepare_run(tcfg, mcfg, args.resume, args.overwrite)
        resolve_corpus(tcfg.corpus)
        if tcfg.fsdp:
            check_fsdp(saved_mcfg)
        return _launch_torchrun(args)
    res = run_then_teardown(train, tcfg, mcfg, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    summary = {"out": str(res.out), "steps": res.steps, "eval_loss": res.final_eval["loss"],
               "eval_acc": res.final_eval["acc"], "train_loss": res.train_loss, "tokens_per_s": res.tokens_per_s}
    lines = [f"trained {res.steps} steps -> {res.out / 'checkpoint'}",
             "held-out loss per head: " + ", ".join(f"{x:.4f}" for x in res.final_eval["loss"]),
             "held-out top-1 per head: " + ", ".join(f"{x:.3f}" for x in res.final_eval["acc"]),
             f"training throughput: {res.tokens_per_s:,.0f} tokens/s"]
    _emit(summary, args.json, "\n".join(lines))
    return 0


# ---- mtp info -----------------------------------------------------------------------------
def cmd_info(args) -> int:
    from mtp.checkpoint import inspect_checkpoint

    model, tok, meta = inspect_checkpoint(args.checkpoint)  # reads no weights
    cfg = model.config
    counts = model.param_counts()
    info = {"path": str(meta["path"]), "step": meta.get("step"), "config": cfg.to_dict(),
            "params": counts, "tokenizer": {"type": tok.name, "vocab_size": tok.vocab_size,
                                            "prompt_start_ids": list(tok.bos_ids)},
            "trunk_blocks": cfg.n_trunk, "head_offsets": cfg.head_offsets}
    lines = [f"checkpoint  {meta['path']} (step {meta.get('step')})",
             f"model       dim {cfg.dim}, {cfg.n_layers} blocks, {cfg.n_heads} attention heads "
             f"({cfg.n_kv_heads} kv), context {cfg.max_seq_len}, vocab {cfg.vocab_size}",
             f"heads       {cfg.n_future} x {cfg.head_type}, offsets {cfg.head_offsets}, "
             f"trunk {cfg.n_trunk} blocks",
             f"tokenizer   {tok.name} ({tok.vocab_size} ids), prompts: {tok.prompt_convention()}",
             "parameters  " + ", ".join(f"{k} {v:,}" for k, v in counts.items())]
    _emit(info, args.json, "\n".join(lines))
    return 0


# ---- mtp tokenizer train ------------------------------------------------------------------
def cmd_tokenizer_train(args) -> int:
    from mtp.data import iter_documents, resolve_corpus
    from mtp.tokenizers import train_bpe_from_texts

    if args.vocab_size < 300:
        raise MTPError(f"--vocab-size must be at least 300 for a byte-level BPE, got {args.vocab_size}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MTPError(f"{out} exists: pass --overwrite to replace it")
    from mtp.fileio import check_writable

    check_writable(out, "--out")
    files = resolve_corpus(args.corpus or ["stdlib"])
    tok = train_bpe_from_texts((piece for _, piece, _ in iter_documents(files)), args.vocab_size, out)
    _emit({"out": str(out), "vocab_size": tok.vocab_size, "files": len(files)}, args.json,
          f"trained a BPE tokenizer with {tok.vocab_size} ids on {len(files)} files -> {out}")
    return 0


# ---- mtp demo -----------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from mtp.demo import run_demo
    from mtp.fileio import check_writable

    if args.steps is not None and args.steps < 1:  # omitted: the demo's budget
        raise MTPError(f"--steps must be at least 1, got {args.steps}")
    check_writable(args.out, "--out", directory=True)
    result = run_demo(Path(args.out), steps=args.steps, device=args.device, progress=not args.no_progress)
    _emit(result, args.json, result["table"])
    return 0


# ---- mtp generate / mtp bench ----------------------------------------------------------------
def _load_for_decoding(args):
    """(model, tokenizer, meta) on the chosen device, in bf16 on CUDA unless --dtype says otherwise."""
    import torch

    from mtp.checkpoint import load_checkpoint
    from mtp.distributed import pick_device

    device = pick_device(args.device)
    model, tok, meta = load_checkpoint(args.checkpoint, device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        raise MTPError(f"unknown --dtype {args.dtype!r}: use auto, float32 or bfloat16")
    return model.to(dtype).eval(), tok, meta


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


PACK_WEIGHTS = {"auto": None, "on": True, "off": False}


def _gen_config(args, tok):
    from mtp.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, speculative=args.speculative,
                            eot_id=getattr(tok, "eot_id", None), stop=tuple(args.stop or ()), compile=args.compile,
                            pack_weights=PACK_WEIGHTS[args.pack_weights],
                            tree=None if args.tree in (None, "auto") else args.tree)


def _tree_texts(args, tok, meta, context: int) -> list[list[int]]:
    """Held-out text to measure the heads' acceptance on, for --tree auto: 16 windows of the
    checkpoint's training corpus (or --corpus) held-out split."""
    from mtp.bench import corpus_prompts

    train_cfg = meta.get("train") or {}
    corpus = getattr(args, "corpus", None) or train_cfg.get("corpus") or ["stdlib"]
    return corpus_prompts(corpus, tok, 16, min(128, context - 1), train_cfg.get("val_fraction", 0.005))


def _auto_tree(args, model, tok, meta, batch: int):
    """--tree auto for mtp generate: the tree chosen for this model, device and batch size."""
    from mtp.decode.tree import auto_tree

    if args.compile:
        raise MTPError("tree decoding runs eagerly: drop --compile to use --tree")
    choice = auto_tree(model, _tree_texts(args, tok, meta, model.config.max_seq_len), batch=batch,
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
    model, tok, meta = _load_for_decoding(args)
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
    from mtp.bench import file_prompts
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


def _int_list(flag: str, s: str | None) -> list[int] | None:
    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise MTPError(f"{flag} must be comma-separated integers, got {s!r}") from None


def cmd_bench(args) -> int:
    from mtp.bench import (DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LEN, check_bench_args, corpus_prompts,
                           default_new_tokens, default_prompt_len, file_prompts, format_table, run_bench)
    from mtp.fileio import check_writable

    batch_sizes, ks = _int_list("--batch-sizes", args.batch_sizes), _int_list("--k", args.k)
    for flag, value in (("--prompt-len", args.prompt_len), ("--n-prompts", args.n_prompts),
                        ("--max-new-tokens", args.max_new_tokens), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise MTPError(f"{flag} must be at least 1, got {value}")
    if args.plot:
        check_writable(args.plot, "--plot")
    model, tok, meta = _load_for_decoding(args)
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
    tree_texts = None
    if args.tree is not None:
        from mtp.decode.tree import Tree

        if args.tree != "auto":
            Tree.parse(args.tree)  # a malformed spec is refused before any measuring
        tree_texts = _tree_texts(args, tok, meta, ctx) if args.tree == "auto" or not args.prompts else prompts
    report = run_bench(model, prompts, batch_sizes, ks, max_new, compile=args.compile, hf=args.hf,
                       pack_weights=PACK_WEIGHTS[args.pack_weights],
                       log=(lambda m: None) if args.json else None, repeats=args.repeats,
                       tree=args.tree, tree_texts=tree_texts, tree_max_nodes=args.tree_max_nodes)
    report = {"checkpoint": str(meta["path"]), "prompts": source, **report}
    if args.plot:
        from mtp.plots import plot_decoding

        chains = {**report, "results": [r for r in report["results"] if "tree" not in r]}  # the chains' bars
        report["plot"] = str(plot_decoding(chains, Path(args.plot), title=f"decoding {meta['path']}"))
    _emit(report, args.json, format_table(report))
    return 0


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory or checkpoint directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: CUDA graphs on GPU; on CPU, C++ matrix kernels on the "
                        "weights frozen in (compiling takes 30 s to a few minutes per batch size and k)")
    p.add_argument("--pack-weights", choices=["auto", "on", "off"], default="auto",
                   help="CPU: linear layers compute with weights prepacked for oneDNN (one more copy of them in "
                        "memory); auto: for models with >= 64 MiB of linear weights")
    p.add_argument("--tree", default=None, metavar="auto|SPEC",
                   help="verify a tree of the heads' top candidates per step instead of a chain (eager): auto "
                        "(chosen for this device from the heads' acceptance on held-out text and the step cost), "
                        "or rank paths like '0;1;0,0;0,1' (head 2's top two, head 3's top two after head 2's "
                        "first), or chain:D")
    p.add_argument("--tree-max-nodes", type=int, default=32, help="--tree auto: at most this many nodes")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtp", description="Multi-token prediction language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a model with n-token prediction")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("info", help="config and parameter counts of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="generate text, with self-speculative decoding by default")
    _add_decoding_args(p)
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
    p = sub.add_parser("bench", help="greedy vs self-speculative decoding speed, side by side")
    _add_decoding_args(p)
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
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    tp = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    tp.add_argument("corpus", nargs="*")
    tp.add_argument("--vocab-size", type=int, default=8192)
    tp.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    tp.add_argument("--overwrite", action="store_true")
    tp.add_argument("--json", action="store_true")
    tp.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("demo", help="quickstart: n=4 vs n=1 on the standard library, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's budget)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    from mtp.commands import add_all

    add_all(sub)  # eval, sweep, tasks, convert, finetune, serve
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MTPError as e:
        print(f"mtp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`mtp generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
