"""`mtp sweep`: parameter-matched models for a list of n trained with one budget, evaluated, and
reported with plots (see `mtp.evals.sweep`)."""

from __future__ import annotations

import math
from pathlib import Path

from mtp.commands.common import emit
from mtp.errors import MTPError
from mtp.fileio import check_writable


def cmd_sweep(args) -> int:
    from mtp.commands.eval import _ks
    from mtp.config import preset
    from mtp.evals import EvalOptions
    from mtp.evals.sweep import SWEEP_TASKS, parse_variant, run_sweep
    from mtp.tokenizers import get_tokenizer, pad_vocab

    if args.task not in SWEEP_TASKS:
        raise MTPError(f"unknown sweep task {args.task!r}; choose from {', '.join(SWEEP_TASKS)}")
    if args.variants:
        variants = [parse_variant(s) for s in args.variants]
    else:
        try:
            ns = [int(x) for x in args.n.split(",") if x.strip()]
        except ValueError:
            raise MTPError(f"--n must be a comma-separated list of integers, got {args.n!r}") from None
        variants = [parse_variant(f"n={n}") for n in ns]
    if not variants:
        raise MTPError("--n lists no number of heads")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise MTPError(f"--seeds must be a comma-separated list of integers, got {args.seeds!r}") from None
    if not seeds:
        raise MTPError("--seeds lists no seed")
    out = Path(args.out)
    check_writable(out, "--out", directory=True)  # also refuses an existing file
    # a sweep kept in git has only its runs' small files (data/, checkpoints and results.json are
    # not committed): a run's run.json marks it as a sweep directory too
    is_sweep = ((out / "results.json").exists() or (out / "data").exists() or any(out.glob("*/checkpoint"))
                or any(out.glob("*/run.json")))
    if out.is_dir() and any(out.iterdir()) and not is_sweep:
        raise MTPError(f"{out} is not empty and not a sweep directory: choose another --out")
    tok = get_tokenizer(args.tokenizer)
    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "max_seq_len")}
    base = preset(args.preset, vocab_size=pad_vocab(tok.vocab_size), **overrides)
    need = max(v.n_future for v in variants)
    if need > base.n_layers:
        raise MTPError(f"a variant with n={need} heads needs at least {need} blocks; the model has {base.n_layers}")
    train_args = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=min(args.warmup, args.steps // 10 + 1), eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
                      device=args.device, tokenizer=args.tokenizer)
    if args.eval_batch_size < 1:
        raise MTPError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    if not math.isfinite(args.temperature):
        raise MTPError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    opts = EvalOptions(n_samples=args.n_samples, temperature=args.temperature, ks=_ks(None, args.n_samples),
                       limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    opts.validate()  # before any model is trained
    summary = run_sweep(args.task, out, variants, base=base, train_args=train_args, seeds=seeds,
                        corpus=args.corpus, n_train=args.n_train, eval_opts=opts, overwrite=args.overwrite,
                        progress=not args.no_progress)
    text = Path(summary["report"]).read_text()
    emit(summary, args.json, text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train parameter-matched models for several n, evaluate, report with plots")
    p.add_argument("--task", required=True, help="loss (a corpus), induction, polyarith, humaneval, mbpp")
    p.add_argument("--out", required=True, help="sweep directory (re-running it resumes what is missing)")
    p.add_argument("--n", default="1,2,4", help="numbers of heads (default 1,2,4)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="instead of --n: variants such as 'n=4' 'n=4;loss=nth' 'n=4;offsets=1,2,4,8'")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    p.add_argument("--corpus", nargs="*", default=None, help="training corpus (task loss, humaneval, mbpp)")
    p.add_argument("--n-train", type=int, default=None, help="induction / polyarith: training documents")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: byte-level)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None, help="blocks in all, heads included")
    p.add_argument("--n-heads", type=int, default=None, help="attention heads")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="evaluation size (see mtp eval --limit)")
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate every run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)
