"""The paper's Fig. 7 on a CPU: induction success against model size, n = 1 against n = 2 (and
n = 4 at the largest size), several seeds each, one fixed token budget, with 95% intervals and
the step at which each run formed the copying mechanism.

    OMP_NUM_THREADS=1 nice python experiments/induction_by_size.py            # train what is missing
    python experiments/induction_by_size.py --report-only                      # tables and plot only

Each size is one `mtp sweep` (resumable) into results/induction_by_size/d<dim>/. The runs' small
files (run.summary.json, metrics.jsonl, eval.json, decode.json) are kept in git, checkpoints are
not: a finished run counts as done from its summary alone, so the experiment resumes on another
machine or in another session; a run stopped part way resumes from its checkpoint where the
machine still has it. The report goes to results/induction_by_size/summary.{json,md} and the plot
to docs/figures/induction_by_size.png.

Formation step: the first evaluation step at which the held-out next-token loss has fallen below
the midpoint between its plateau (its value where the first descent flattens: the first evaluation
after the warm-up from which it falls by less than 3% to the next) and its final value, for a run
that formed the mechanism: final induction accuracy at least 0.5, i.e. more than half of the
repeated names' later tokens copied (the first-occurrence baseline, where copying cannot help, is
about 0.14); otherwise the run did not form it within the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "induction_by_size"
FIGURE = ROOT / "docs" / "figures" / "induction_by_size.png"

DIMS = (64, 96, 128, 256)  # 6 blocks, 4 attention heads: about 0.34M, 0.74M, 1.29M and 4.9M parameters
SEEDS = {64: tuple(range(12))}  # seeds per size (default 0, 1, 2): more where the outcome varies most
N4_DIM = 128  # n = 4 is trained at this size as well (the largest one that fits a session)
FLAT = 0.03  # the first descent has flattened where the loss falls by less than this share per evaluation
FORMED = 0.5  # induction accuracy from which a run counts as having formed the copying mechanism
TRAIN = ["--n-layers", "6", "--n-heads", "4", "--max-seq-len", "256", "--seq-len", "256", "--batch-size", "8",
         "--steps", "2500", "--lr", "2e-3", "--warmup", "100", "--eval-every", "100", "--save-every", "250",
         "--log-every", "25"]


def seeds_of(dim: int) -> tuple[int, ...]:
    return SEEDS.get(dim, (0, 1, 2))


def sweep_argv(dim: int, ns: str) -> list[str]:
    # the task's data is written with seed 1000 + the first seed: every list starts at 0
    return ["sweep", "--task", "induction", "--out", str(OUT / f"d{dim}"), "--n", ns, "--dim", str(dim),
            "--seeds", ",".join(map(str, seeds_of(dim))), *TRAIN]


def plan() -> list[tuple[int, str]]:
    return [(d, "1,2,4" if d in (N4_DIM, DIMS[-1]) else "1,2") for d in DIMS]


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: bisection on its CDF,
    the density integrated by Simpson's rule (no scipy needed)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # P(T <= x) for x >= 0
        k = 2000
        h = x / k
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(k + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval of the mean over seeds."""
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size < 2:
        return m, math.nan, math.nan
    h = float(t_quantile(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - h, m + h


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean of b - mean of a, low, high): a 95% Welch interval of the difference of two means
    (unequal variances; Welch-Satterthwaite degrees of freedom)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2:
        return d, math.nan, math.nan
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    h = float(t_quantile(0.975, df) * math.sqrt(vx + vy))
    return d, d - h, d + h


def interval_text(ci: list[float], signed: bool = True) -> str:
    """A 95% interval [low, high] for a table ("–" where there is none: fewer than two seeds)."""
    if math.isnan(ci[0]):
        return "–"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def formation_step(run_dir: Path, formed: bool, warmup: int = 100) -> int | None:
    if not formed:
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ev = [(r["step"], r["loss"][0]) for r in rows if r.get("kind") == "eval" and r["step"] > warmup]
    if len(ev) < 2:
        return None
    # the plateau: where the first descent (from the untrained model's loss) flattens
    start = next((i for i in range(len(ev) - 1) if ev[i][1] - ev[i + 1][1] < FLAT * ev[i][1]), None)
    if start is None:
        return None
    plateau, final = ev[start][1], ev[-1][1]
    mid = (plateau + final) / 2
    return next((s for s, v in ev[start:] if v < mid), None)


def collect() -> list[dict]:
    rows = []
    for dim, _ in plan():
        for path in sorted((OUT / f"d{dim}").glob("*/run.summary.json")):
            r = json.loads(path.read_text())
            m = r["metrics"]
            formed = m["induction_accuracy"] >= FORMED
            rows.append({"dim": dim, "n": r["n_future"], "seed": r["seed"], "params": r["params"],
                         "induction": m["induction_accuracy"], "baseline": m["first_occurrence_accuracy"],
                         "heldout_loss": r["heldout_loss"][0], "formed": formed,
                         "formation_step": formation_step(path.parent, formed),
                         "train_seconds": r["train_seconds"]})
    return rows


def report(rows: list[dict]) -> dict:
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dim"], r["n"]), []).append(r)
    table = []
    for (dim, n), rs in sorted(groups.items()):
        mean, lo, hi = t_interval([r["induction"] for r in rs])
        steps = [r["formation_step"] for r in rs]
        table.append({"dim": dim, "n": n, "params": rs[0]["params"], "seeds": sorted(r["seed"] for r in rs),
                      "induction": [r["induction"] for r in sorted(rs, key=lambda r: r["seed"])],
                      "mean": mean, "ci95": [lo, hi], "formed": sum(r["formed"] for r in rs),
                      "formation_steps": [steps[i] for i in np.argsort([r["seed"] for r in rs])],
                      "baseline": float(np.mean([r["baseline"] for r in rs])),
                      "train_minutes": float(np.mean([r["train_seconds"] or math.nan for r in rs])) / 60})
    diffs = []  # n = 2 against n = 1 at each size: the paper's claim is about this difference
    for dim in sorted({t["dim"] for t in table}):
        by_n = {t["n"]: t["induction"] for t in table if t["dim"] == dim}
        if 1 in by_n and 2 in by_n:
            d, lo, hi = welch_interval(by_n[1], by_n[2])
            diffs.append({"dim": dim, "params": next(t["params"] for t in table if t["dim"] == dim),
                          "n2_minus_n1": d, "ci95": [lo, hi], "seeds": [len(by_n[1]), len(by_n[2])]})
    summary = {"table": table, "differences": diffs, "runs": rows, "argv": [["mtp", *sweep_argv(d, ns)] for d, ns in plan()],
               "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
               "written": time.strftime("%Y-%m-%d %H:%M")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| dim | n | params | seeds | induction accuracy per seed | mean [95% interval] | formed | "
             "formation step per seed | minutes per run |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        ci = "" if math.isnan(t["ci95"][0]) else f" [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]"
        lines.append(f"| {t['dim']} | {t['n']} | {t['params'] / 1e6:.2f}M | {len(t['seeds'])} | "
                     + " / ".join(f"{x:.3f}" for x in t["induction"]) + f" | {t['mean']:.3f}{ci} | "
                     + f"{t['formed']}/{len(t['seeds'])} | "
                     + " / ".join("–" if s is None else str(s) for s in t["formation_steps"])
                     + f" | {t['train_minutes']:.0f} |")
    lines += ["", "| dim | params | n = 2 minus n = 1 | 95% Welch interval | seeds (n = 1, n = 2) |", "|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['dim']} | {d['params'] / 1e6:.2f}M | {d['n2_minus_n1']:+.3f} | {interval_text(d['ci95'])} | "
                     f"{d['seeds'][0]}, {d['seeds'][1]} |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    if table:
        plot(table)
    return summary


@contextlib.contextmanager
def two_panels(path: Path) -> Iterator:
    """A figure of two panels side by side (matplotlib, Agg): yields its axes, written to path
    (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        yield axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot(table: list[dict]) -> None:
    with two_panels(FIGURE) as axes:
        _plot(table, axes)


def _plot(table: list[dict], axes) -> None:
    for j, n in enumerate(sorted({t["n"] for t in table})):
        ts = [t for t in table if t["n"] == n]
        x = np.array([t["params"] for t in ts]) * (1 + 0.04 * (j - 1))  # side by side
        mean = np.array([t["mean"] for t in ts])
        lo = np.array([t["ci95"][0] for t in ts])
        hi = np.array([t["ci95"][1] for t in ts])
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))
        axes[0].errorbar(x, mean, yerr=err, fmt="o-", capsize=4, color=f"C{j}", label=f"n = {n}")
        for t, xi in zip(ts, x):
            axes[0].scatter([xi] * len(t["induction"]), t["induction"], color=f"C{j}", s=10, alpha=0.5)
            steps = [s for s in t["formation_steps"] if s is not None]
            axes[1].scatter([xi] * len(steps), steps, color=f"C{j}", s=18, alpha=0.7,
                            label=f"n = {n}" if t is ts[0] else None)
    axes[0].axhline(float(np.mean([t["baseline"] for t in table])), color="0.5", ls=":", lw=1,
                    label="first-occurrence baseline")
    sizes = sorted({t["params"] for t in table})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{p / 1e6:.2f}M" for p in sizes])
        ax.minorticks_off()
        ax.set_xlim(sizes[0] / 1.6, sizes[-1] * 1.6)
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 1.02)  # intervals of 2-3 seeds reach past [0, 1]: drawn cut
    axes[0].set_ylabel("induction accuracy")
    axes[0].set_title("induction success (mean, 95% interval; dots: seeds)")
    axes[1].set_ylabel("training step")
    axes[1].set_title("when the mechanism formed (held-out loss drop)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", action="store_true", help="tables and plot from what is recorded")
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="only these sizes (model dims)")
    args = ap.parse_args(argv)
    if not args.report_only:
        import torch

        from mtp.cli import main as mtp_main

        torch.set_num_threads(1)
        for dim, ns in plan():
            if str(dim) not in args.dims.split(","):
                continue
            t0 = time.perf_counter()
            code = mtp_main(sweep_argv(dim, ns))
            print(f"[induction_by_size] d{dim}: rc {code}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if code:
                return code
            report(collect())
    summary = report(collect())
    print((OUT / "summary.md").read_text())
    return 0 if summary["table"] else 1


if __name__ == "__main__":
    sys.exit(main())
