"""Polynomial arithmetic over F_7[X]/(X^5) (the paper's section 4.2).

Ring. Elements are polynomials with coefficients in F_7 = {0..6}, truncated below X^5 (X^5 = 0).
A polynomial is held as a tuple of its 5 coefficients, constant first: ``(c0, c1, c2, c3, c4)``.
Operations: negation ``-p``, addition ``p + q``, multiplication ``p * q`` (the product truncated
below X^5) and composition ``p @ q = p(q(X))``. Composition is not well defined on the quotient
ring when q(0) != 0 (p + X^5 r gives a different p(q)), so it is defined on the canonical
representatives: p of degree < 5 is evaluated at q by Horner's rule, every step reduced mod
(7, X^5).

Text format (compact, byte-level friendly). A polynomial is its 5 coefficient digits, constant
first: ``30210`` is 3 + 2X^2 + X^3. Operators are ``-`` (unary negation), ``+``, ``*`` and ``@``
(composition); every operand that is not a plain polynomial is parenthesised, so no precedence
rules are needed. One example is one line ``EXPR=RESULT\\n`` with the result in the same
5-digit form, e.g. ``(12300+40010)@(-03000)=00000\n`` or ``12300*40010=41060\n``.
m is the number of operations in the expression (a random tree; the operator of each node is
uniform over the four, leaves are uniform random polynomials). Training data has m = 1..5, drawn
with probability proportional to 1/m by default (a small model learns the short expressions
first), evaluation m = 1..10: m > 5 is out of domain.

Evaluation: the prompt is ``EXPR=`` (after an end-of-text token, as in training, where examples
follow one another separated by it); the model decodes greedily (self-speculatively by default)
until the end of the line, and the completion must equal the result exactly. ``opts.limit`` is
the number of examples per m, ``opts.extra["max_m"]`` (default 10) and ``opts.extra["min_m"]``
(default 1) the range of m.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from mtp.errors import MTPError

TASK = "polyarith"
P = 7  # coefficients in F_7
N = 5  # X^5 = 0: polynomials have 5 coefficients
OPS = ("neg", "add", "mul", "comp")
SYMBOL = {"add": "+", "mul": "*", "comp": "@"}
TRAIN_MAX_M = 5  # training expressions have m = 1..TRAIN_MAX_M
EVAL_MAX_M = 10
EVAL_SEED = 20240  # the default held-out set (make_corpus and evaluate without --data)
N_EVAL_PER_M = 200  # default held-out examples per m
N_TRAIN = 100_000  # default training examples (about 3.5 MB)
MAX_NEW_TOKENS = 16  # a result is 5 digits and a newline

Poly = tuple  # (c0, c1, c2, c3, c4), each in 0..6


# ---- the reference ring -----------------------------------------------------------------------
def poly(*coeffs: int) -> Poly:
    """The polynomial with these coefficients (constant first), reduced mod (7, X^5)."""
    c = [x % P for x in coeffs[:N]]
    return tuple(c + [0] * (N - len(c)))


ZERO, ONE, X = poly(0), poly(1), poly(0, 1)


def neg(p: Poly) -> Poly:
    return tuple((-a) % P for a in p)


def add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % P for a, b in zip(p, q))


def mul(p: Poly, q: Poly) -> Poly:
    out = [0] * N
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            if i + j < N:
                out[i + j] = (out[i + j] + a * b) % P
    return tuple(out)


def compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) with p's canonical representative (degree < 5), by Horner's rule."""
    out = ZERO
    for a in reversed(p):
        out = add(mul(out, q), poly(a))
    return out


def to_text(p: Poly) -> str:
    return "".join(str(a) for a in p)


# ---- expressions ------------------------------------------------------------------------------
# An expression is a Poly (a leaf), ("neg", e) or (op, e1, e2) with op in add / mul / comp.


def is_leaf(e) -> bool:
    return isinstance(e, tuple) and len(e) == N and all(isinstance(a, int) for a in e)


def value(e) -> Poly:
    """The reference evaluator."""
    if is_leaf(e):
        return e
    if e[0] == "neg":
        return neg(value(e[1]))
    a, b = value(e[1]), value(e[2])
    return {"add": add, "mul": mul, "comp": compose}[e[0]](a, b)


def n_ops(e) -> int:
    return 0 if is_leaf(e) else 1 + sum(n_ops(c) for c in e[1:])


def format_expr(e) -> str:
    def operand(c) -> str:
        return format_expr(c) if is_leaf(c) else f"({format_expr(c)})"

    if is_leaf(e):
        return to_text(e)
    if e[0] == "neg":
        return "-" + operand(e[1])
    return operand(e[1]) + SYMBOL[e[0]] + operand(e[2])


def parse_expr(text: str):
    """The expression tree of a formatted expression (the inverse of format_expr)."""
    pos = 0

    def fail(msg: str):
        raise MTPError(f"cannot parse polynomial expression {text!r} at {pos}: {msg}")

    def operand():
        nonlocal pos
        if pos >= len(text):
            fail("unexpected end")
        ch = text[pos]
        if ch == "(":
            pos += 1
            e = expression()
            if pos >= len(text) or text[pos] != ")":
                fail("expected ')'")
            pos += 1
            return e
        if ch == "-":
            pos += 1
            return ("neg", operand())
        digits = text[pos:pos + N]
        if len(digits) != N or any(d not in "0123456" for d in digits):
            fail(f"expected {N} digits 0-6")
        pos += N
        return tuple(int(d) for d in digits)

    def expression():
        nonlocal pos
        left = operand()
        if pos < len(text) and text[pos] in "+*@":
            op = {"+": "add", "*": "mul", "@": "comp"}[text[pos]]
            pos += 1
            return (op, left, operand())
        return left

    e = expression()
    if pos != len(text):
        fail("trailing text")
    return e


def random_poly(rng: random.Random) -> Poly:
    return tuple(rng.randrange(P) for _ in range(N))


def random_expr(rng: random.Random, m: int):
    """A random expression with exactly m operations."""
    if m == 0:
        return random_poly(rng)
    op = rng.choice(OPS)
    if op == "neg":
        return ("neg", random_expr(rng, m - 1))
    left = rng.randrange(m)  # operations in the left operand: 0..m-1
    return (op, random_expr(rng, left), random_expr(rng, m - 1 - left))


def make_example(rng: random.Random, m: int) -> dict:
    e = random_expr(rng, m)
    expr, result = format_expr(e), to_text(value(e))
    return {"text": f"{expr}={result}\n", "expr": expr, "result": result, "m": m}


M_WEIGHTS = ("inverse", "uniform")


def train_examples(n: int, seed: int, max_m: int = TRAIN_MAX_M, m_weights: str = "inverse") -> list[dict]:
    """n training examples with m in 1..max_m drawn with probability proportional to 1/m
    ("inverse": half the examples or so have m <= 2, which a small model learns first) or
    uniformly ("uniform")."""
    if m_weights not in M_WEIGHTS:
        raise MTPError(f"polyarith m_weights must be one of {', '.join(M_WEIGHTS)}, got {m_weights!r}")
    rng = random.Random(seed)
    ms = list(range(1, max_m + 1))
    weights = [1 / m if m_weights == "inverse" else 1.0 for m in ms]
    return [make_example(rng, rng.choices(ms, weights)[0]) for _ in range(n)]


def eval_examples(n_per_m: int, seed: int = EVAL_SEED, max_m: int = EVAL_MAX_M, min_m: int = 1,
                  exclude: Iterable[str] = ()) -> list[dict]:
    """n_per_m held-out examples for each m in min_m..max_m (grouped by m), none of whose
    expressions is in `exclude`, and no expression twice."""
    seen = set(exclude)
    out = []
    for m in range(min_m, max_m + 1):
        rng = random.Random(seed * 1000 + m)  # each m its own stream: changing max_m keeps the rest
        got = tries = 0
        while got < n_per_m:
            tries += 1
            if tries > 100 * n_per_m + 1000:
                raise MTPError(f"cannot draw {n_per_m} distinct held-out polyarith examples with m={m}")
            ex = make_example(rng, m)
            if ex["expr"] in seen:
                continue
            seen.add(ex["expr"])
            out.append(ex)
            got += 1
    return out


def make_documents(n_train: int, seed: int, n_eval: int | None = None, eval_seed: int = EVAL_SEED,
                   train_max_m: int = TRAIN_MAX_M, eval_max_m: int = EVAL_MAX_M, m_weights: str = "inverse"):
    """(training texts, held-out records, settings) for `mtp tasks make polyarith`; n_eval is
    examples per m, and no held-out expression appears in the training set."""
    if train_max_m < 1 or eval_max_m < 1:
        raise MTPError(f"polyarith needs max m >= 1, got train {train_max_m} and eval {eval_max_m}")
    n_eval = N_EVAL_PER_M if n_eval is None else n_eval
    train = train_examples(n_train, seed, train_max_m, m_weights)
    held_out = eval_examples(n_eval, eval_seed, eval_max_m, exclude=(ex["expr"] for ex in train))
    settings = {"p": P, "n": N, "train_max_m": train_max_m, "train_m_weights": m_weights, "eval_max_m": eval_max_m,
                "n_eval_per_m": n_eval,
                "format": "EXPR=RESULT\\n; polynomials as 5 digits 0-6, constant first; ops - + * @ (composition)"}
    return [ex["text"] for ex in train], held_out, settings


# ---- scoring (no model needed) ----------------------------------------------------------------
def completion_answer(completion: str) -> str:
    """The answer in a completion: its first line (exact match, no normalisation)."""
    return completion.split("\n", 1)[0]


def top_op(expr: str) -> str:
    """The outermost operation of a formatted expression (neg, add, mul, comp; leaf for none)."""
    e = parse_expr(expr)
    return "leaf" if is_leaf(e) else e[0]


def score(examples: Sequence[dict], completions: Sequence[str], train_max_m: int = TRAIN_MAX_M) -> dict:
    """Exact-match results of completions (the text after "EXPR=") for the examples: metrics
    (accuracy; in_domain, m <= train_max_m; out_of_domain, m above it; digit_accuracy, the share of
    result coefficients right in place, where 1/7 is chance) and breakdowns by m and by the outermost
    operation."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    by: dict[int, list[int]] = {}
    by_op: dict[str, list[int]] = {}
    digits = []  # per example: the share of the result's coefficients given right, in place
    details = []
    for ex, c in zip(examples, completions):
        got = completion_answer(c)
        ok = got == ex["result"]
        by.setdefault(ex["m"], [0, 0])
        by[ex["m"]][0] += ok
        by[ex["m"]][1] += 1
        op = top_op(ex["expr"])
        by_op.setdefault(op, [0, 0])
        by_op[op][0] += ok
        by_op[op][1] += 1
        digits.append(sum(a == b for a, b in zip(got, ex["result"])) / len(ex["result"]))
        details.append({"m": ex["m"], "expr": ex["expr"], "expected": ex["result"], "got": got, "correct": ok})

    def mean(ms) -> float | None:
        right = sum(by[m][0] for m in ms)
        total = sum(by[m][1] for m in ms)
        return right / total if total else None

    ms = sorted(by)
    metrics = {"accuracy": mean(ms), "digit_accuracy": sum(digits) / len(digits) if digits else None}
    for name, group in (("in_domain", [m for m in ms if m <= train_max_m]),
                        ("out_of_domain", [m for m in ms if m > train_max_m])):
        if group:
            metrics[name] = mean(group)
    return {
        "metrics": metrics,
        "n_problems": len(examples),
        "by": {str(m): {"accuracy": by[m][0] / by[m][1], "n": by[m][1]} for m in ms},
        "by_name": "m",
        "by_op": {op: {"accuracy": r / n, "n": n} for op, (r, n) in sorted(by_op.items())},
        "details": details,
    }


# ---- the evaluation ---------------------------------------------------------------------------
def load_examples(opts, min_m: int, max_m: int) -> tuple[list[dict], dict]:
    """The held-out examples (at most opts.limit per m in min_m..max_m) and their settings."""
    if opts.data:
        from mtp.evals.taskdata import load_task_data

        info, records = load_task_data(opts.data, TASK)
        for i, r in enumerate(records):
            if not (isinstance(r.get("expr"), str) and isinstance(r.get("result"), str) and isinstance(r.get("m"), int)):
                raise MTPError(f"{opts.data}: held-out example {i + 1} lacks expr / result / m")
        settings = dict(info.get("settings", {}))
        counts: dict[int, int] = {}
        examples = []
        for r in records:
            if min_m <= r["m"] <= max_m and counts.get(r["m"], 0) < (opts.limit or len(records)):
                counts[r["m"]] = counts.get(r["m"], 0) + 1
                examples.append(r)
        if not examples:
            raise MTPError(f"{opts.data}: no held-out polyarith examples with m in {min_m}..{max_m}")
        return examples, settings
    n = opts.limit or N_EVAL_PER_M
    return eval_examples(n, EVAL_SEED, max_m, min_m), {"train_max_m": TRAIN_MAX_M}


def _int_option(extra: dict, key: str, default: int) -> int:
    v = extra.get(key, default)
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise MTPError(f"polyarith option {key} must be an integer, got {v!r}") from None
    if v < 1:
        raise MTPError(f"polyarith option {key} must be at least 1, got {v}")
    return v


def evaluate(model, tokenizer, opts, meta: dict, progress: bool = True) -> dict:
    from tqdm import tqdm

    from mtp.evals import check_encodable
    from mtp.generate import GenerationConfig, generate

    min_m = _int_option(opts.extra, "min_m", 1)
    max_m = _int_option(opts.extra, "max_m", EVAL_MAX_M)
    if min_m > max_m:
        raise MTPError(f"polyarith: min_m {min_m} is above max_m {max_m}")
    examples, settings = load_examples(opts, min_m, max_m)
    check_encodable(tokenizer, [ex["text"] for ex in examples[:: max(1, len(examples) // 50)]] + ["0123456-+*@()=\n"],
                    TASK)
    prompts = [[tokenizer.eot_id] + tokenizer.encode(ex["expr"] + "=") for ex in examples]
    ctx = model.config.max_seq_len
    longest = max(len(p) + len(tokenizer.encode(ex["result"] + "\n")) for p, ex in zip(prompts, examples))
    if longest > ctx:
        raise MTPError(f"polyarith examples need {longest} tokens but the model's context is {ctx}: lower max_m")
    cfg = GenerationConfig(max_new_tokens=min(opts.max_new_tokens, MAX_NEW_TOKENS), eot_id=tokenizer.eot_id,
                           stop=("\n",), speculative=opts.speculative, compile=opts.compile)
    completions: list[str] = []
    bs = opts.batch_size
    for i in tqdm(range(0, len(prompts), bs), desc="polyarith", unit="batch", disable=not progress):
        out = generate(model, prompts[i:i + bs], cfg, tokenizer)
        completions.extend(out.texts)
    result = score(examples, completions, int(settings.get("train_max_m", TRAIN_MAX_M)))
    result["details"] = result["details"][:50]
    return result
