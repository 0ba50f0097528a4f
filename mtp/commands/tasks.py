"""`mtp tasks make {induction,polyarith} --out DIR`: write a synthetic task's directory
(`mtp.evals.taskdata`)."""

from __future__ import annotations

from mtp.commands.common import Parser, emit
from mtp.errors import MTPError
from mtp.evals.taskdata import TASK_NAMES, make_corpus


def cmd_tasks_make(args) -> int:
    from mtp.fileio import check_writable

    check_writable(args.out, "--out", directory=True)  # before the documents are made
    settings = {}
    for key in ("train_max_m", "eval_max_m", "m_weights"):
        if getattr(args, key) is not None:
            if args.task != "polyarith":
                raise MTPError(f"--{key.replace('_', '-')} is an option of polyarith, not of {args.task}")
            settings[key] = getattr(args, key)
    summary = make_corpus(args.task, args.out, n_train=args.n_train, seed=args.seed, n_eval=args.n_eval,
                          overwrite=args.overwrite, **settings)
    lines = [f"wrote the {args.task} task to {summary['out']}"]
    lines.append(f"  train.jsonl  {summary['n_train']} documents, {summary['train_characters']:,} characters "
                 f"(seed {summary['seed']})")
    lines.append(f"  eval.jsonl   {summary['n_eval']} held-out examples, {summary['eval_characters']:,} characters "
                 f"(seed {summary['eval_seed']})")
    lines.append("  task.json")
    lines.append(f"train: mtp train {summary['files']['train.jsonl']} --out RUN ...   "
                 f"eval: mtp eval RUN --task {args.task} --data {summary['out']}")
    emit(summary, args.json, "\n".join(lines))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tasks", help="synthetic tasks of the paper (induction, polynomial arithmetic)")
    tsub = p.add_subparsers(dest="tasks_command", required=True, parser_class=Parser)
    mp = tsub.add_parser("make", help="write a task's training corpus and held-out set")
    mp.add_argument("task", choices=TASK_NAMES)
    mp.add_argument("--out", required=True, help="directory for train.jsonl, eval.jsonl, task.json")
    mp.add_argument("--n-train", type=int, default=None,
                    help="training documents (default: induction 20000 stories, polyarith 100000 examples)")
    mp.add_argument("--n-eval", type=int, default=None,
                    help="held-out stories (induction, default 200) or examples per m (polyarith, default 200)")
    mp.add_argument("--train-max-m", type=int, default=None,
                    help="polyarith: training expressions have 1..M operations (default 5); held-out ones above M "
                         "are out of domain")
    mp.add_argument("--eval-max-m", type=int, default=None, help="polyarith: held-out m up to this (default 10)")
    mp.add_argument("--m-weights", choices=("inverse", "uniform"), default=None,
                    help="polyarith: m drawn in proportion to 1/m (default) or uniformly")
    mp.add_argument("--seed", type=int, default=0, help="training seed (the held-out set has its own)")
    mp.add_argument("--overwrite", action="store_true", help="replace the task files in a non-empty --out")
    mp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    mp.set_defaults(func=cmd_tasks_make)
