"""`mtp train [CORPUS...] --out DIR`: train a model with n-token prediction (`mtp.train`).

    mtp train --out runs/n4                               # 4 heads on the standard library
    mtp train corpus/ --out runs/n1 --n-future 1 --preset tiny
    mtp train --out runs/n4 --resume --steps 2000         # continue a run
    mtp train corpus/ --out runs/big --nproc 8 --fsdp     # torchrun, one process per GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from mtp.commands.common import TRAIN_FLAGS, Parser, add_flags, add_run_flags, emit, training_lines
from mtp.errors import MTPError

# `mtp train` trains multi-token models: 4 heads unless told otherwise (the paper's n = 4), while
# ModelConfig's own default is 1, a plain next-token model (what any Python caller or converted
# checkpoint gets without asking for heads)
N_FUTURE = 4
MODEL_FLAGS = ("preset", "n_future", "head_type", "offsets", "dim", "n_layers", "n_heads",
               "n_kv_heads", "tie_embeddings", "max_seq_len")
# what a fine-tuning run (mtp finetune) resumes with: its freeze and head schedule
FINETUNE_FIELDS = ("init_from", "init_n_future", "init_layout", "init_head_type", "freeze", "extra_weight",
                   "extra_weight_warmup")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="*", default=None,
                   help="directories, globs, files (.jsonl with a text field) or 'stdlib' (default)")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl)")
    m = p.add_argument_group("model (taken from the checkpoint with --resume)")
    m.add_argument("--preset", default=None, help="tiny, small, gpt2-124m, 350m, 1b, 7b (default small)")
    m.add_argument("--n-future", type=int, default=None, help=f"number of prediction heads (default {N_FUTURE})")
    m.add_argument("--head-type", default=None, help="parallel, linear, causal, anticausal, sequential")
    m.add_argument("--offsets", default=None, help="token offset each head predicts, e.g. 1,2,4,128")
    m.add_argument("--dim", type=int, default=None)
    m.add_argument("--n-layers", type=int, default=None)
    m.add_argument("--n-heads", type=int, default=None)
    m.add_argument("--n-kv-heads", type=int, default=None)
    m.add_argument("--max-seq-len", type=int, default=None)
    m.add_argument("--tie-embeddings", action="store_true", default=None)
    t = p.add_argument_group("training")
    add_flags(t, TRAIN_FLAGS)
    t.add_argument("--tokens", type=float, default=None, help="training tokens instead of --steps")
    t.add_argument("--naive-loss", action="store_true", help="all heads' logits at once (reference path)")
    add_run_flags(t, fsdp_help="with several processes: FSDP2 (parameters, gradients and optimizer state "
                               "sharded per block) instead of data parallel")
    t.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: re-runs the command under torchrun (one per GPU)")
    t.add_argument("--tokenizer", default=None, help="'byte' (default) or a tokenizer.json")


def model_config_from_args(args, vocab_size: int):
    from mtp.config import preset

    def parse_offsets(s):
        try:
            return [int(x) for x in s.split(",")]
        except ValueError:
            raise MTPError(f"--offsets must be comma-separated integers, got {s!r}") from None

    return preset(
        args.preset or "small", vocab_size=vocab_size,
        n_future=args.n_future if args.n_future is not None else N_FUTURE,
        head_type=args.head_type, offsets=parse_offsets(args.offsets) if args.offsets else None, dim=args.dim,
        n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        tie_embeddings=args.tie_embeddings, max_seq_len=args.max_seq_len,
    )


def _launch_torchrun(args) -> int:
    """`mtp train ... --nproc N` = `torchrun --standalone --nproc-per-node N -m mtp train ...`
    with the same options (rebuilt from the parsed arguments)."""
    import subprocess

    probe = Parser(prog="mtp train")
    add_train_args(probe)
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


def _configs(args):
    """(TrainConfig, ModelConfig or None: the checkpoint's) from the options; with --resume the
    options not given continue with the checkpoint's own values."""
    from mtp.config import ModelConfig, TrainConfig
    from mtp.tokenizers import get_tokenizer, pad_vocab

    saved_train, saved_model, mcfg = {}, None, None
    if args.resume:
        from mtp.checkpoint import read_meta

        meta = read_meta(args.out)
        saved_train, saved_model = meta.get("train") or {}, meta["model"]
        if any(getattr(args, f) is not None for f in MODEL_FLAGS):
            base = saved_model.to_dict()
            given = model_config_from_args(args, base["vocab_size"]).to_dict()
            explicit = {f for f in MODEL_FLAGS if getattr(args, f) is not None} - {"preset"}
            mcfg = ModelConfig.from_dict({**base, **{k: given[k] for k in explicit}})
    else:
        mcfg = model_config_from_args(args, pad_vocab(get_tokenizer(args.tokenizer).vocab_size))
    # not given, not saved: TrainConfig's default (None: warmup and seq_len are worked out below)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_FLAGS}
    defaults["seq_len"] = None
    opt = {k: getattr(args, k) if getattr(args, k) is not None else saved_train.get(k, d)
           for k, d in defaults.items()}
    # an omitted --seq-len is the model's context; a given one must be >= 1 (TrainConfig checks)
    if opt["seq_len"] is None:
        opt["seq_len"] = (mcfg or saved_model).max_seq_len
    for flag, key in (("--batch-size", "batch_size"), ("--grad-accum", "grad_accum"), ("--seq-len", "seq_len")):
        if opt[key] < 1:  # before --tokens divides by them
            raise MTPError(f"{flag} must be at least 1, got {opt[key]}")
    if args.tokens is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # every process trains on its own batch
        opt["steps"] = max(1, int(args.tokens // (opt["batch_size"] * opt["seq_len"] * opt["grad_accum"] * world)))
    tcfg = TrainConfig(
        **opt, corpus=args.corpus or saved_train.get("corpus") or ["stdlib"], out=args.out,
        memory_efficient=not args.naive_loss, device=args.device, dtype=args.dtype, compile=args.compile,
        tokenizer=args.tokenizer, fsdp=args.fsdp, activation_checkpointing=args.activation_checkpointing,
        log_grad_cosine=args.log_grad_cosine,
    )
    if args.resume:  # a fine-tuning run (mtp finetune) resumes with its own freeze and head schedule
        tcfg = dataclasses.replace(tcfg, **{k: saved_train[k] for k in FINETUNE_FIELDS if k in saved_train})
    return tcfg, mcfg


def cmd_train(args) -> int:
    from mtp.distributed import run_then_teardown
    from mtp.train import train

    if args.steps is not None and args.tokens is not None:
        raise MTPError("give --steps or --tokens, not both")
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise MTPError(f"--tokens must be a finite number > 0, got {args.tokens}")
    tcfg, mcfg = _configs(args)
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
    emit(summary, args.json, "\n".join(training_lines(f"trained {res.steps} steps -> {res.out / 'checkpoint'}", res)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model with n-token prediction")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
