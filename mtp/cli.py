"""The `mtp` command (also `python -m mtp`, so `torchrun -m mtp train ...` works): the parser,
assembled from the sub-commands in `mtp.commands`, and the entry point.

Every command that measures something takes --json: one JSON object on stdout, nothing else
there; progress and logs go to stderr. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from mtp.commands import add_all
from mtp.commands.common import Parser
from mtp.errors import MTPError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mtp", description="Multi-token prediction language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_all(sub)  # train, info, generate, bench, tokenizer, demo, eval, sweep, tasks, convert, finetune, serve
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
