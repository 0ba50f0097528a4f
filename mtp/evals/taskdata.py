"""The paper's synthetic tasks as corpora: task directories written and read back.

A task directory holds
  train.jsonl  training documents, one ``{"text": ...}`` per line (``mtp train DIR/train.jsonl``)
  eval.jsonl   held-out examples (``text`` plus the task's fields), drawn with another seed
  task.json    the task's name, format version, sizes, seeds and settings
and ``mtp eval CKPT --task NAME --data DIR`` reads it back (:func:`load_task_data`). Pass the
train.jsonl file itself to `mtp train`, not the directory (which would also train on eval.jsonl).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from mtp.errors import MTPError
from mtp.fileio import atomic_write

TASK_NAMES = ("induction", "polyarith")
FORMAT_VERSION = 1
FILES = ("train.jsonl", "eval.jsonl", "task.json")


def _task_module(task: str):
    if task not in TASK_NAMES:
        raise MTPError(f"unknown synthetic task {task!r}; choose from {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"mtp.evals.{task}")


def make_corpus(task: str, out_dir: str | Path, n_train: int | None = None, seed: int = 0,
                n_eval: int | None = None, overwrite: bool = False, **settings) -> dict:
    """Write train.jsonl, eval.jsonl and task.json for `task` into out_dir; returns a summary.

    n_train: training documents (default: the task's N_TRAIN); seed: the training seed (the
    held-out set uses the task's EVAL_SEED); n_eval: held-out stories (induction) or examples per
    m (polyarith); settings go to the task's make_documents (e.g. train_max_m for polyarith)."""
    mod = _task_module(task)
    n_train = mod.N_TRAIN if n_train is None else n_train
    if n_train < 1:
        raise MTPError(f"--n-train must be at least 1, got {n_train}")
    if n_eval is not None and n_eval < 1:
        raise MTPError(f"--n-eval must be at least 1, got {n_eval}")
    if seed == mod.EVAL_SEED:
        raise MTPError(f"--seed {seed} is the {task} task's held-out seed: choose another")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MTPError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MTPError(f"--out {out} is not empty: pass --overwrite to replace its task files")
    train, held_out, task_settings = mod.make_documents(n_train, seed, n_eval=n_eval, **settings)
    out.mkdir(parents=True, exist_ok=True)
    info = {"task": task, "format_version": FORMAT_VERSION, "n_train": len(train), "n_eval": len(held_out),
            "seed": seed, "eval_seed": mod.EVAL_SEED, "settings": task_settings}
    chars = {
        "train.jsonl": atomic_write(out / "train.jsonl", (json.dumps({"text": t}) + "\n" for t in train)),
        "eval.jsonl": atomic_write(out / "eval.jsonl", (json.dumps(r) + "\n" for r in held_out)),
    }
    atomic_write(out / "task.json", [json.dumps(info, indent=2) + "\n"])
    return {
        **info,
        "out": str(out),
        "files": {name: str(out / name) for name in FILES},
        "train_characters": sum(len(t) for t in train),
        "eval_characters": sum(len(r["text"]) for r in held_out),
        "train_file_bytes": chars["train.jsonl"],
    }


def load_task_data(directory: str | Path, task: str) -> tuple[dict, list[dict]]:
    """(task.json, the held-out records of eval.jsonl) of a directory written by make_corpus."""
    d = Path(directory)
    if not d.is_dir():
        raise MTPError(f"--data {d}: no such directory (write one with `mtp tasks make {task} --out DIR`)")
    try:
        info = json.loads((d / "task.json").read_text())
    except FileNotFoundError:
        raise MTPError(f"--data {d} has no task.json: write it with `mtp tasks make {task} --out DIR`") from None
    except (OSError, ValueError) as e:
        raise MTPError(f"--data {d}: cannot read task.json: {e}") from None
    if not isinstance(info, dict) or info.get("task") != task:
        got = info.get("task") if isinstance(info, dict) else None
        raise MTPError(f"--data {d} holds the {got!r} task, not {task!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise MTPError(f"--data {d}: format version {info.get('format_version')!r}, expected {FORMAT_VERSION}")
    records = []
    try:
        with open(d / "eval.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                    raise MTPError(f"--data {d}: eval.jsonl line {i} is not an object with a text field")
                records.append(r)
    except FileNotFoundError:
        raise MTPError(f"--data {d} has no eval.jsonl") from None
    except (OSError, ValueError) as e:
        raise MTPError(f"--data {d}: cannot read eval.jsonl: {str(e).splitlines()[0]}") from None
    if not records:
        raise MTPError(f"--data {d}: eval.jsonl is empty")
    return info, records
