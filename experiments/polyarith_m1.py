"""The paper's Fig. 8 on a CPU, in the one setting where an n = 1 model learns polynomial arithmetic
at this scale: n = 1 against n = 2 and n = 4, two seeds each, in domain (one operation) and out
of domain (two and three operations), with 95% intervals.

    mtp tasks make polyarith --out results/polyarith_m1/data --train-max-m 1 --eval-max-m 3 \\
        --m-weights uniform --n-train 100000
    OMP_NUM_THREADS=1 mtp sweep --task polyarith --out results/polyarith_m1 --n 1,2,4 --seeds 0,1 \\
        --dim 128 --n-layers 6 --n-heads 4 --max-seq-len 256 --seq-len 128 --batch-size 16 \\
        --steps 6000 --lr 2e-3 --warmup 100 --eval-every 500 --save-every 500 --log-every 50 --limit 200
    python experiments/polyarith_m1.py            # the report: tables, intervals, plot

The sweep scores each run on 200 held-out expressions per number of operations m (1, 2, 3). This
report adds, per run, the in-domain score by outermost operation (`mtp eval RUN --task polyarith
--max-m 1`, kept in RUN/eval_m1.json, which needs the run's checkpoint once) and writes
results/polyarith_m1/summary.{json,md} and docs/figures/polyarith_m1.png.

Intervals: over seeds, a Student-t interval of the mean and a Welch interval of each difference
from n = 1 (with two seeds they are wide: the seed is the unit that varies); per run, a Wilson
interval over its 200 expressions (what one run's figure can be trusted to).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from induction_by_size import interval_text, t_interval, two_panels, welch_interval  # noqa: E402

OUT = ROOT / "results" / "polyarith_m1"
FIGURE = ROOT / "docs" / "figures" / "polyarith_m1.png"
OPS = ("neg", "add", "mul", "comp")


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """A 95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def by_operation(run_dir: Path, limit: int) -> dict:
    """The in-domain (m = 1) score by outermost operation, from RUN/eval_m1.json, evaluated now
    if missing (needs the run's checkpoint)."""
    path = run_dir / "eval_m1.json"
    if not path.exists():
        if not (run_dir / "checkpoint").exists():
            return {}
        done = subprocess.run([sys.executable, "-m", "mtp", "eval", str(run_dir), "--task", "polyarith",
                               "--data", str(OUT / "data"), "--limit", str(limit), "--max-m", "1", "--json"],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        result.pop("details", None)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(path.read_text())


def pooled_difference(a: dict, b: dict) -> tuple[float, float, float]:
    """b's in-domain exact match minus a's, each pooled over its seeds' expressions (these seeds
    taken as given), with a 95% normal interval for a difference of two proportions."""
    na, nb = a["n_expr"] * len(a["in_domain"]), b["n_expr"] * len(b["in_domain"])
    pa, pb = float(np.mean(a["in_domain"])), float(np.mean(b["in_domain"]))
    h = 1.959964 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    return pb - pa, pb - pa - h, pb - pa + h


def collect(limit: int) -> list[dict]:
    rows = []
    for path in sorted(OUT.glob("*/run.summary.json")):
        r = json.loads(path.read_text())
        m1 = by_operation(path.parent, limit)
        by = r["by"]
        rows.append({"n": r["n_future"], "seed": r["seed"], "params": r["params"],
                     "in_domain": by["1"]["accuracy"], "n_in_domain": by["1"]["n"],
                     "out_of_domain": r["metrics"]["out_of_domain"],
                     "by_m": {m: v["accuracy"] for m, v in by.items()},
                     "digits_in_domain": m1.get("metrics", {}).get("digit_accuracy"),
                     "by_op": {op: m1["by_op"][op]["accuracy"] for op in OPS if op in m1.get("by_op", {})},
                     "heldout_loss": r["heldout_loss"][0],
                     "tokens_per_forward": ((r.get("decode") or {}).get("tokens_per_forward") or [None])[-1],
                     "train_minutes": (r.get("train_seconds") or math.nan) / 60})
    return rows


def report(rows: list[dict]) -> dict:
    ns = sorted({r["n"] for r in rows})
    table = []
    for n in ns:
        rs = sorted((r for r in rows if r["n"] == n), key=lambda r: r["seed"])
        mean, lo, hi = t_interval([r["in_domain"] for r in rs])
        table.append({"n": n, "seeds": [r["seed"] for r in rs], "n_expr": rs[0]["n_in_domain"], "in_domain": [r["in_domain"] for r in rs],
                      "wilson": [wilson(r["in_domain"] * r["n_in_domain"], r["n_in_domain"]) for r in rs],
                      "mean": mean, "ci95": [lo, hi], "out_of_domain": [r["out_of_domain"] for r in rs],
                      "by_op": [r["by_op"] for r in rs], "digits": [r["digits_in_domain"] for r in rs],
                      "heldout_loss": [r["heldout_loss"] for r in rs],
                      "tokens_per_forward": [r["tokens_per_forward"] for r in rs],
                      "train_minutes": [r["train_minutes"] for r in rs]})
    base = next((t for t in table if t["n"] == 1), None)
    diffs = []
    for t in table:
        if base is not None and t["n"] != 1:
            d, lo, hi = welch_interval(base["in_domain"], t["in_domain"])
            ood = float(np.mean(t["out_of_domain"]) - np.mean(base["out_of_domain"]))
            pooled, plo, phi = pooled_difference(base, t)
            diffs.append({"n": t["n"], "minus_n1": d, "ci95": [lo, hi], "ood_minus_n1": ood,
                          "pooled_minus_n1": pooled, "pooled_ci95": [plo, phi],
                          "seeds": [len(base["seeds"]), len(t["seeds"])]})
    summary = {"table": table, "differences": diffs, "runs": rows}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def f(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    lines = ["| n | seeds | in domain per seed [Wilson 95%, 200 expressions] | mean [95% t over seeds] | "
             "out of domain (m = 2, 3) | by operation (neg / add / mul / comp) | digits right | "
             "next-token loss | tokens/forward | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        per_seed = " / ".join(f"{x:.3f} [{w[0]:.2f}, {w[1]:.2f}]" for x, w in zip(t["in_domain"], t["wilson"]))
        ci = "" if math.isnan(t["ci95"][0]) else " " + interval_text(t["ci95"], signed=False)
        ops = " ; ".join("/".join(f"{o.get(op, math.nan):.2f}" for op in OPS) for o in t["by_op"])
        lines.append(f"| {t['n']} | {len(t['seeds'])} | {per_seed} | {t['mean']:.3f}{ci} | "
                     + " / ".join(f(x) for x in t["out_of_domain"]) + f" | {ops} | "
                     + " / ".join(f(x) for x in t["digits"]) + " | "
                     + " / ".join(f(x) for x in t["heldout_loss"]) + " | "
                     + " / ".join("–" if x is None else f"{x:.2f}" for x in t["tokens_per_forward"]) + " | "
                     + " / ".join(f"{x:.0f}" for x in t["train_minutes"]) + " |")
    lines += ["", "| comparison | in domain, difference of means | 95% Welch interval over seeds | "
              "95% interval over expressions, these seeds pooled | out of domain difference | seeds |",
              "|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| n = {d['n']} minus n = 1 | {d['minus_n1']:+.3f} | {interval_text(d['ci95'])} | "
                     f"{interval_text(d['pooled_ci95'])} | {d['ood_minus_n1']:+.3f} | "
                     f"{d['seeds'][0]}, {d['seeds'][1]} |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    if table:
        plot(table)
    return summary


def plot(table: list[dict]) -> None:
    with two_panels(FIGURE) as axes:
        _plot(table, axes)


def _plot(table: list[dict], axes) -> None:
    ax = axes[0]
    for j, t in enumerate(table):
        x = np.full(len(t["in_domain"]), j, dtype=float) + np.linspace(-0.08, 0.08, len(t["in_domain"]))
        lo = [t["in_domain"][i] - w[0] for i, w in enumerate(t["wilson"])]
        hi = [w[1] - t["in_domain"][i] for i, w in enumerate(t["wilson"])]
        ax.errorbar(x, t["in_domain"], yerr=[lo, hi], fmt="o", color=f"C{j}", capsize=3, ms=4,
                    label=f"n = {t['n']}: seeds (Wilson 95%)")
        ax.hlines(t["mean"], j - 0.25, j + 0.25, color=f"C{j}", lw=2)
        ax.scatter([j + 0.3] * len(t["out_of_domain"]), t["out_of_domain"], marker="x", color="0.3", s=20,
                   label="out of domain (m = 2, 3)" if j == 0 else None)
    ax.set_xticks(range(len(table)), [f"n = {t['n']}" for t in table])
    ax.set_ylim(-0.02, 1.0)
    ax.set_ylabel("exact match, in domain (m = 1)")
    ax.set_title("polynomial arithmetic: seeds, their mean (bar)")
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.8 / len(table)
    for j, t in enumerate(table):
        per_seed = [[o.get(op, math.nan) for op in OPS] for o in t["by_op"]]  # seeds x operations
        x = np.arange(len(OPS)) + (j - (len(table) - 1) / 2) * width
        ax.bar(x, np.nanmean(per_seed, axis=0), width, color=f"C{j}", label=f"n = {t['n']} (mean over seeds)")
        for scores in per_seed:
            ax.scatter(x, scores, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(OPS)), ["negation", "addition", "multiplication", "composition"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match, in domain")
    ax.set_title("by operation (dots: seeds)")
    ax.legend(fontsize=7)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=200, help="in-domain expressions scored by operation")
    args = ap.parse_args(argv)
    summary = report(collect(args.limit))
    print((OUT / "summary.md").read_text())
    return 0 if summary["table"] else 1


if __name__ == "__main__":
    sys.exit(main())
