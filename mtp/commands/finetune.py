"""`mtp finetune CKPT --out DIR`: fine-tune a checkpoint, adding (or removing) prediction heads.

    mtp finetune runs/n1 corpus/ --out runs/n1-heads --n-future 4            # Medusa-1: heads only
    mtp finetune runs/n1 --out runs/n1-full --n-future 4 --mode full --extra-weight 0.3 \\
        --extra-weight-warmup 200                                               # Medusa-2 / DeepSeek
    mtp finetune runs/n1 --out runs/n1-matched --n-future 4 --layout matched  # parameter-matched
    mtp finetune runs/n4 --out runs/n4-ntp --n-future 1                         # n = 4 -> n' = 1
    mtp finetune runs/n1 --out runs/n1-kd --n-future 4 --mode heads --distill \
        --trunk-cache-windows 2000                        # heads learn the model's own predictions

The run is the ordinary training loop (mtp.train) started from the checkpoint's weights and
tokenizer (TrainConfig.init_from); the result is a normal checkpoint in DIR/checkpoint.
--mode auto (the default) trains only the new heads when plus-layers adds heads (the next-token
path stays bit for bit), and the whole model otherwise.
"""

from __future__ import annotations

import dataclasses
import os

from mtp.commands.common import TRAIN_FLAGS, add_flags, add_run_flags, emit, training_lines
from mtp.errors import MTPError

# fine-tuning's own training options, beside the common ones (see TRAIN_FLAGS)
FINETUNE_FLAGS = {
    **TRAIN_FLAGS,
    "loss_weights": (str, "uniform, main:L, geometric:G, nth, or w1,...,wn (for the fine-tuned heads)"),
    "val_fraction": (float, "held-out share of the corpus (default: the checkpoint's)"),
    "extra_weight": (float, "lambda: the extra heads' loss weights are multiplied by it (default 1)"),
    "extra_weight_warmup": (int, "steps over which lambda ramps linearly from 0 (default 0: no ramp)"),
    "distill_weight": (float, "with --distill: W in (1 - W) * corpus CE + W * KL to the teacher (default 1)"),
    "distill_temperature": (float, "with --distill: the teacher's softmax temperature (default 1)"),
    "trunk_cache_windows": (int, "--mode heads: draw batches from a fixed pool of N training windows (epochs) and "
                                 "cache the frozen trunk's states on disk, so later epochs skip the trunk"),
    "trunk_cache_dtype": (str, "storage of the trunk cache: bfloat16 (default), float16, float32"),
}
_SWITCHES = ("compile", "activation_checkpointing", "log_grad_cosine", "fsdp", "distill")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint, adding or removing prediction heads")
    p.add_argument("checkpoint", help="the pretrained model: a run directory or checkpoint directory")
    p.add_argument("corpus", nargs="*", default=None,
                   help="directories, globs, files or 'stdlib' (default: the checkpoint's training corpus)")
    p.add_argument("--out", required=True, help="run directory of the fine-tuning run")
    h = p.add_argument_group("heads")
    h.add_argument("--n-future", type=int, default=None, help="heads after fine-tuning (default: the checkpoint's)")
    h.add_argument("--head-type", default=None, help="type of added heads (default: the checkpoint's)")
    h.add_argument("--layout", default="plus-layers", choices=("plus-layers", "matched"),
                   help="plus-layers: keep every block, add n-1 (next-token path unchanged); matched: keep "
                        "the block count (the trunk gives up blocks; needs --mode full)")
    h.add_argument("--mode", default="auto", choices=("auto", "heads", "full"),
                   help="heads: train only the extra heads (trunk frozen); full: everything; auto: heads when "
                        "plus-layers adds heads, else full")
    h.add_argument("--distill", action="store_true",
                   help="--mode heads: train head i towards the frozen next-token head's distribution at "
                        "t+i-1 (self-distillation; mixed with the corpus loss by --distill-weight)")
    h.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="train (and draft with) the extra heads over the N most frequent tokens of the "
                        "training split only: their unembedding costs N / V of the full one (stored in the "
                        "checkpoint's config; decoding uses it by default)")
    t = p.add_argument_group("training")
    add_flags(t, FINETUNE_FLAGS)
    add_run_flags(t, fsdp_help="under torchrun: FSDP2 instead of data parallel (--mode full)")
    p.set_defaults(func=cmd_finetune)


def _resolve_mode(args, src_n: int, new_n: int) -> str:
    mode = args.mode
    if mode == "auto":
        mode = "heads" if args.layout == "plus-layers" and new_n > src_n else "full"
    if mode == "heads" and new_n == 1:
        raise MTPError("--mode heads trains the extra heads only, but the model would have 1 head: give "
                       "--n-future above 1 or --mode full")
    return mode


def _new_config(args, src):
    from mtp.finetune import headed_config

    n_future = args.n_future if args.n_future is not None else src.n_future
    head_type = args.head_type or src.head_type
    if n_future == src.n_future and head_type == src.head_type:
        return src
    return headed_config(src, n_future, args.layout, head_type)


def _fresh_config(args):
    """TrainConfig of a new fine-tuning run, checked before anything is read or written."""
    from mtp.checkpoint import read_meta
    from mtp.config import TrainConfig
    from mtp.finetune import check_freeze

    if args.mode == "heads" and args.layout == "matched":
        raise MTPError("--mode heads cannot be combined with --layout matched: the matched layout changes the "
                       "next-token path (the trunk gives up blocks), so it needs --mode full")
    meta = read_meta(args.checkpoint)  # one line if it is not a checkpoint
    src, saved = meta["model"], meta.get("train") or {}
    cfg = _new_config(args, src)
    mode = _resolve_mode(args, src.n_future, cfg.n_future)
    freeze = "trunk" if mode == "heads" else "none"
    if args.fsdp and freeze == "trunk":
        raise MTPError("--mode heads (a frozen trunk) is not supported with --fsdp: use data parallel or --mode full")
    check_freeze(cfg, freeze)
    if args.distill and freeze != "trunk":
        raise MTPError(f"--distill trains the extra heads towards the frozen model's own predictions: it needs "
                       f"--mode heads (this run is mode {mode})")
    if freeze != "trunk" and args.trunk_cache_windows:
        raise MTPError(f"--trunk-cache-windows caches a frozen trunk: it needs --mode heads (this run is mode {mode})")
    if not args.distill and (args.distill_weight is not None or args.distill_temperature is not None):
        raise MTPError("--distill-weight and --distill-temperature need --distill")
    given = {k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k) is not None}
    base = dict(seq_len=given.get("seq_len") or cfg.max_seq_len)  # warmup: TrainConfig's (5% of the steps)
    if saved.get("val_fraction") is not None:
        base["val_fraction"] = saved["val_fraction"]
    return TrainConfig(
        **{**base, **given}, corpus=args.corpus or saved.get("corpus") or ["stdlib"], out=args.out,
        device=args.device, dtype=args.dtype, **{k: getattr(args, k) for k in _SWITCHES},
        init_from=str(meta["path"]), init_n_future=cfg.n_future, init_layout=args.layout,
        init_head_type=cfg.head_type, freeze=freeze, init_draft_vocab=args.draft_vocab,
    ), mode


def _resume_config(args):
    """TrainConfig continuing the fine-tuning run in --out: its own settings, with the training
    flags given on the command line taking precedence."""
    from mtp.checkpoint import read_meta
    from mtp.config import TrainConfig
    from mtp.train import check_out

    check_out(args.out, resume=True, overwrite=args.overwrite)
    meta = read_meta(args.out)
    saved = meta.get("train") or {}
    if not saved.get("init_from"):
        raise MTPError(f"--resume: {args.out} is not a fine-tuning run (continue it with mtp train --resume)")
    cfg = meta["model"]
    saved_mode = "heads" if saved.get("freeze") == "trunk" else "full"
    if args.n_future is not None and args.n_future != cfg.n_future:
        raise MTPError(f"--resume: the run in {args.out} has {cfg.n_future} heads, not {args.n_future}")
    if args.draft_vocab is not None:
        raise MTPError("--resume: the draft vocabulary is part of the run's model (its config); drop --draft-vocab")
    if args.mode not in ("auto", saved_mode):
        raise MTPError(f"--resume: the run in {args.out} trains in mode {saved_mode}, not {args.mode}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in saved.items() if k in known}
    d.update({k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k) is not None})
    d.update(out=args.out, device=args.device, dtype=args.dtype,
             **{k: True for k in _SWITCHES if getattr(args, k)})
    if args.corpus:
        d["corpus"] = args.corpus
    return TrainConfig(**d), saved_mode


def cmd_finetune(args) -> int:
    from mtp.distributed import run_then_teardown
    from mtp.train import train

    tcfg, mode = _resume_config(args) if args.resume else _fresh_config(args)
    res = run_then_teardown(train, tcfg, None, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    model = res.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    summary = {"out": str(res.out), "from": tcfg.init_from, "n_future": cfg.n_future, "n_layers": cfg.n_layers,
               "layout": tcfg.init_layout, "mode": mode, "trainable_params": trainable, "steps": res.steps,
               "eval_loss": res.final_eval["loss"], "eval_acc": res.final_eval["acc"],
               "train_loss": res.train_loss, "tokens_per_s": res.tokens_per_s,
               "distill": ({"weight": tcfg.distill_weight, "temperature": tcfg.distill_temperature}
                           if tcfg.distill else None),
               "trunk_cache_windows": tcfg.trunk_cache_windows,
               "draft_vocab": None if cfg.draft_vocab is None else len(cfg.draft_vocab)}
    what = (f"fine-tuned {tcfg.init_from} for {res.steps} steps ({cfg.n_future} heads, {tcfg.init_layout}, "
            f"mode {mode}, {trainable:,} parameters trained) -> {res.out / 'checkpoint'}")
    emit(summary, args.json, "\n".join(training_lines(what, res)))
    return 0
