"""What HumanEval and MBPP share: sampling completions, running them in the sandbox, pass@k.

A code task is a list of problems, each a dict ``{"task_id": str, "prompt": str,
"program_for": completion -> source}``. :func:`evaluate_code_task` samples ``opts.n_samples``
completions per problem with :func:`mtp.generate.generate` (greedy when ``opts.temperature`` is 0,
else temperature / top-p sampling), cuts each at the task's stop sequences, runs
``program_for(completion)`` in :mod:`mtp.evals.sandbox`, and reports the unbiased pass@k of
Chen et al. 2021 for every k <= n_samples.

Choices, documented:
- Completions end at the first stop sequence (Codex's "\\nclass", "\\ndef", "\\n#", "\\nif",
  "\\nprint" for HumanEval; the task passes its own list), or at the end-of-text token, or after
  ``max_new_tokens``. Stop sequences rather than "the first non-indented line" so that both tasks
  and the published numbers we compare with use the same rule.
- Sampling: each ``generate`` call (a batch of up to ``opts.batch_size`` samples; the samples of
  one problem are next to each other) gets its own seed, ``opts.seed`` + the batch's index, so a
  run is reproducible for a given seed and batch size. Greedy decoding with more than one sample
  would repeat one completion n times: that is refused (set a temperature).
- A prompt with no room left in the model's context (prompt tokens >= max_seq_len) is not
  generated for: its problem counts as unsolved (0 of n correct, status ``prompt_too_long``), the
  count is reported as ``prompts_too_long`` and a warning goes to stderr, so pass@k stays over
  every problem and comparable between models. If no prompt fits at all, that is an MTPError.
- The sandbox gets the program in two pieces, compiled separately: what comes up to and
  including the completion, and the tests after it (found by calling ``program_for`` with a
  marker in place of the completion), so a completion cannot swallow the tests (an unclosed
  string, say) and a sample passes only when the tests' code ran to its end. The result's
  ``isolation`` counts the sandbox layer that ran the programs (``bwrap``, ``uid`` or
  ``audit-hook``; see :mod:`mtp.evals.sandbox`).
"""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from mtp.errors import MTPError
from mtp.evals import EvalOptions, check_encodable
from mtp.evals.sandbox import run_program

_MARKER = "\x00mtp-completion-goes-here\x00"

# Codex (Chen et al. 2021): a HumanEval completion ends where the function body does
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

DEFAULT_KS = EvalOptions().ks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k), computed
    as in Chen et al. 2021 as 1 - prod_{i = n-c+1..n} (1 - k / i) (no huge binomials)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise MTPError(f"pass@k needs k >= 1, got {k}")
    if k > n:
        raise MTPError(f"pass@k with k={k} needs at least k samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def resolve_ks(ks: Sequence[int], n: int) -> list[int]:
    """The k to report for n samples per problem: from the default (1, 10, 100) the ones <= n,
    silently; a k the user asked for that needs more samples is an MTPError."""
    ks = sorted(set(int(k) for k in ks))
    if tuple(ks) == tuple(sorted(DEFAULT_KS)):
        return [k for k in ks if k <= n]
    for k in ks:
        if k > n:
            raise MTPError(f"pass@k with k={k} needs at least k samples per problem, got n={n} "
                           f"(raise --n-samples or lower --ks)")
        if k < 1:
            raise MTPError(f"pass@k needs k >= 1, got {k}")
    return ks


def truncate_completion(text: str, stops: Sequence[str]) -> str:
    """The text up to (not including) the earliest stop sequence; all of it when none occurs."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def split_program(program_for, completion: str) -> tuple[str, str | None]:
    """(the program up to and including the completion, the tests after it) for the sandbox;
    (the whole program, None) when program_for does not place the completion exactly once."""
    shape = program_for(_MARKER)
    if shape.count(_MARKER) != 1:
        return program_for(completion), None
    head, tail = shape.split(_MARKER)
    return head + completion, tail


def evaluate_code_task(model, tokenizer, problems: Sequence[dict], opts: EvalOptions, progress: bool = True,
                       *, task: str = "code", stops: Sequence[str] = HUMANEVAL_STOPS) -> dict:
    """Sample, execute and score; see the module's docstring. Returns the task's result dict:
    metrics (pass@k), n_problems, n_samples, prompts_too_long, statuses (sandbox outcomes of all
    samples), isolation (sandbox layer -> programs it ran), generation (decoding figures) and details (one entry per problem)."""
    from mtp.generate import GenerationConfig, generate

    opts.validate()
    n = opts.n_samples
    ks = resolve_ks(opts.ks, n)
    if opts.temperature == 0 and n > 1:
        raise MTPError(f"--n-samples {n} with greedy decoding (--temperature 0) repeats one completion "
                       f"{n} times: set a temperature (e.g. 0.8) to sample")
    if not problems:
        raise MTPError(f"the {task} task has no problems to run")
    prompts = [p["prompt"] for p in problems]
    check_encodable(tokenizer, prompts, task)
    encoded = [tokenizer.encode_prompt(p) for p in prompts]
    ctx = model.config.max_seq_len
    fits = [0 < len(ids) < ctx for ids in encoded]
    too_long = fits.count(False)
    if too_long == len(problems):
        raise MTPError(f"every {task} prompt is too long for the model's context of {ctx} tokens "
                       f"(shortest: {min(len(e) for e in encoded)} tokens)")
    if too_long:
        print(f"warning: {too_long} of {len(problems)} {task} prompts do not fit the model's context of "
              f"{ctx} tokens: counted as unsolved", file=sys.stderr)

    items = [(i, j) for i in range(len(problems)) if fits[i] for j in range(n)]  # (problem, sample)
    completions: dict[tuple[int, int], str] = {}
    futures = {}
    new_tokens = forwards = 0
    gen_seconds = 0.0
    bars = []
    if progress:
        from tqdm import tqdm
        bars = [tqdm(total=len(items), desc=f"{task} generate", unit="sample", file=sys.stderr,
                     dynamic_ncols=True, position=0),
                tqdm(total=len(items), desc=f"{task} execute", unit="prog", file=sys.stderr,
                     dynamic_ncols=True, position=1)]

    def executed(_fut):
        if bars:
            bars[1].update(1)

    # programs run in the sandbox (worker threads) while the model generates the next batches
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        try:
            for b, start in enumerate(range(0, len(items), opts.batch_size)):
                batch = items[start:start + opts.batch_size]
                cfg = GenerationConfig(
                    max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                    seed=None if opts.temperature == 0 else opts.seed + b, speculative=opts.speculative,
                    eot_id=tokenizer.eot_id, stop=tuple(stops), compile=opts.compile)
                out = generate(model, [encoded[i] for i, _ in batch], cfg, tokenizer)
                new_tokens += out.stats.new_tokens
                forwards += out.stats.new_tokens / max(out.stats.tokens_per_forward, 1e-9)
                gen_seconds += out.stats.seconds
                for (i, j), text in zip(batch, out.texts):
                    completion = truncate_completion(text, stops)
                    completions[i, j] = completion
                    program, tests = split_program(problems[i]["program_for"], completion)
                    fut = pool.submit(run_program, program, opts.timeout, tests=tests)
                    fut.add_done_callback(executed)
                    futures[i, j] = fut
                if bars:
                    bars[0].update(len(batch))
            results = {key: fut.result() for key, fut in futures.items()}
        finally:
            for fut in futures.values():
                fut.cancel()
            for bar in bars:
                bar.close()

    details, statuses, isolation = [], Counter(), Counter(r.isolation for r in results.values())
    per_k = {k: [] for k in ks}
    for i, problem in enumerate(problems):
        if not fits[i]:
            c, first_failure, sample = 0, {"status": "prompt_too_long",
                                           "detail": f"{len(encoded[i])} prompt tokens, context {ctx}"}, None
            statuses["prompt_too_long"] += n
        else:
            runs = [results[i, j] for j in range(n)]
            statuses.update(r.status for r in runs)
            c = sum(r.passed for r in runs)
            bad = next((r for r in runs if not r.passed), None)
            first_failure = None if bad is None else {"status": bad.status, "detail": bad.detail}
            sample = completions[i, 0]
        for k in ks:
            per_k[k].append(pass_at_k(n, c, k))
        details.append({"task_id": problem["task_id"], "n": n, "correct": c, "first_failure": first_failure,
                        "completion": sample})
    metrics = {f"pass@{k}": float(np.mean(v)) for k, v in per_k.items()}
    return {
        "metrics": metrics,
        "n_problems": len(problems),
        "n_samples": n,
        "prompts_too_long": too_long,
        "statuses": dict(sorted(statuses.items())),
        "isolation": dict(sorted(isolation.items())),
        "generation": {"new_tokens": new_tokens, "seconds": round(gen_seconds, 3),
                       "tokens_per_forward": round(new_tokens / max(forwards, 1e-9), 4) if new_tokens else 0.0},
        "details": details,
    }

