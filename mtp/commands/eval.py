"""`mtp eval CKPT --task NAME`: one evaluation task on a checkpoint (see `mtp.evals`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mtp.errors import MTPError


def _ks(spec: str | None, n_samples: int) -> tuple[int, ...]:
    """pass@k values: the defaults keep those a run of n_samples allows; asked-for ones must fit."""
    if spec is None:
        return tuple(k for k in (1, 10, 100) if k <= n_samples)
    try:
        ks = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise MTPError(f"--k must be a comma-separated list of integers, got {spec!r}") from None
    if not ks or min(ks) < 1:
        raise MTPError(f"--k values must be >= 1, got {spec!r}")
    too_big = [k for k in ks if k > n_samples]
    if too_big:
        raise MTPError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per problem, but --n-samples is "
                       f"{n_samples}")
    return ks


def options_from_args(args):
    from mtp.evals import EvalOptions

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise MTPError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if args.workers < 1:
        raise MTPError(f"--workers must be at least 1, got {args.workers}")
    extra = {}
    if args.seq_len is not None:  # omitted: training's window length
        if args.seq_len < 1:
            raise MTPError(f"--seq-len must be at least 1, got {args.seq_len}")
        extra["seq_len"] = args.seq_len
    if args.max_m is not None:
        extra["max_m"] = args.max_m
    temperature = args.temperature
    if temperature is None:  # several samples of one problem only make sense when sampling
        temperature = 0.0 if args.n_samples == 1 else 0.8
    return EvalOptions(
        n_samples=args.n_samples, temperature=temperature, top_p=args.top_p,
        ks=_ks(args.k, args.n_samples), limit=args.limit, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, speculative=args.speculative, timeout=args.timeout, seed=args.seed,
        corpus=args.corpus, data=args.data, compile=args.compile, workers=args.workers, extra=extra,
    )


def cmd_eval(args) -> int:
    from mtp.commands.common import emit, load_for_decoding
    from mtp.evals import TASKS, format_table, json_meta, run_task

    if args.task not in TASKS:  # before loading anything
        raise MTPError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    opts = options_from_args(args)
    opts.validate()
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise MTPError(f"{args.out} exists: pass --overwrite to replace it")
    if args.out:
        from mtp.fileio import check_writable

        check_writable(args.out, "--out")  # before the evaluation, not after it
    model, tok, meta = load_for_decoding(args)
    result = run_task(args.task, model, tok, opts, json_meta(meta), progress=not args.json and not args.no_progress)
    result["checkpoint"] = str(args.checkpoint)
    if args.out:
        from mtp.fileio import atomic_write

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, [json.dumps(result, indent=2) + "\n"])
    table = format_table(result)
    if result.get("isolation"):  # code tasks: which sandbox layer ran the programs
        table += "\n  sandbox: " + ", ".join(f"{k} ({v} programs)" for k, v in result["isolation"].items())
    emit(result, args.json, table)
    return 0


def add_parser(sub) -> None:
    from mtp.evals import TASKS

    p = sub.add_parser("eval", help="evaluate a checkpoint: " + ", ".join(TASKS))
    p.add_argument("checkpoint", help="a run directory or checkpoint directory")
    p.add_argument("--task", required=True, help=" | ".join(TASKS))
    p.add_argument("--limit", type=int, default=None,
                   help="first N problems (humaneval, mbpp), windows (loss), stories (induction) or "
                        "examples per m (polyarith)")
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem for pass@k")
    p.add_argument("--k", default=None, help="pass@k values, e.g. 1,10 (default: those of 1,10,100 <= n)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (the default with one sample); 0.8 by default with --n-samples > 1")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="heads drafting during generation (default: all; 1: plain decoding)")
    p.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per program")
    p.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once")
    p.add_argument("--corpus", nargs="*", default=None, help="loss: corpus (default: the checkpoint's own)")
    p.add_argument("--seq-len", type=int, default=None, help="loss: window length (default: training's)")
    p.add_argument("--data", default=None, help="induction / polyarith: a directory from `mtp tasks make`")
    p.add_argument("--max-m", type=int, default=None, help="polyarith: evaluate m = 1..MAX_M operations")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
