"""`mtp demo`: the quickstart, n = 4 against n = 1 on the standard library, on CPU (`mtp.demo`)."""

from __future__ import annotations

from pathlib import Path

from mtp.commands.common import emit
from mtp.errors import MTPError


def cmd_demo(args) -> int:
    from mtp.demo import run_demo
    from mtp.fileio import check_writable

    if args.steps is not None and args.steps < 1:  # omitted: the demo's budget
        raise MTPError(f"--steps must be at least 1, got {args.steps}")
    check_writable(args.out, "--out", directory=True)
    result = run_demo(Path(args.out), steps=args.steps, device=args.device, progress=not args.no_progress)
    emit(result, args.json, result["table"])
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quickstart: n=4 vs n=1 on the standard library, on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's budget)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
