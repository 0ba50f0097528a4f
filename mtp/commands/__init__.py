"""The sub-commands of `mtp`, one module each.

Each module here has ``add_parser(sub)``, which adds its sub-command(s) to the `mtp` parser and
sets ``func``; `mtp.cli.build_parser` calls them in the order of ``MODULES``. What several
commands share (the one-line-error parser, ``emit``, the training and decoding options,
loading a checkpoint to decode) is in `mtp.commands.common`.
"""

from __future__ import annotations

import importlib

MODULES = ("train", "info", "generate", "bench", "tokenizer", "demo", "eval", "sweep", "tasks", "convert",
           "finetune", "selfdata", "serve")


def add_all(sub) -> None:
    for name in MODULES:
        importlib.import_module(f"mtp.commands.{name}").add_parser(sub)
