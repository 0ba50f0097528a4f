"""Sub-commands of `mtp` that live beside the feature they drive.

Each module here has ``add_parser(sub)``, which adds its sub-command(s) to the `mtp` parser and
sets ``func``. `mtp.cli.build_parser` calls them in the order of ``MODULES``; the shared
helpers (the one-line-error parser, ``emit``) stay in `mtp.cli`.
"""

from __future__ import annotations

import importlib

MODULES = ("eval", "sweep", "tasks", "convert", "finetune", "serve")


def add_all(sub) -> None:
    for name in MODULES:
        importlib.import_module(f"mtp.commands.{name}").add_parser(sub)
