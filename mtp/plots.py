"""Plots from a run's metrics.jsonl (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def _offsets(run_json: Path, n: int) -> list[int]:
    """The offset each head predicts, from the run's config (1..n when it is not there)."""
    try:
        offsets = json.loads(run_json.read_text())["model"]["offsets"]
    except (OSError, ValueError, KeyError, TypeError):
        offsets = None
    return offsets if offsets and len(offsets) == n else list(range(1, n + 1))


def plot_head_losses(runs: dict[str, Path], out_png: Path, title: str = "per-head loss") -> Path:
    """One panel per run: training loss of every head against training tokens (lines) and the
    held-out loss at each evaluation (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False)
    for ax, (label, metrics_path) in zip(axes[0], runs.items()):
        rows = read_metrics(metrics_path)
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else 1
        n = len(train[-1]["per_head"]) if train else 0
        offsets = _offsets(Path(metrics_path).parent / "run.json", n)
        for i in range(n):
            color = f"C{i}"
            ax.plot([r["tokens"] for r in train], [r["per_head"][i] for r in train], color=color,
                    alpha=0.8, lw=1.2, label=f"head {i + 1} (t+{offsets[i]}) train")
            if evals:
                ax.plot([r["step"] * tokens_per_step for r in evals], [r["loss"][i] for r in evals], "o",
                        color=color, ms=4, label=f"head {i + 1} held-out")
        ax.set_title(label)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("cross-entropy (nats)")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_decoding(report: dict, out_png: Path, title: str = "decoding speed") -> Path:
    """From an `mtp bench` report: tokens/s of greedy and of speculative decoding with each k, one
    group of bars per batch size, each speculative bar labelled with its tokens per forward. Rows
    may say `"compiled": true` (reports merged from a compiled and an eager run): they get groups
    of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    compiled = lambda r: bool(r.get("compiled", report.get("compile", False)))  # noqa: E731
    groups = sorted({(compiled(r), r["batch_size"]) for r in rows})
    ks = sorted({r["k"] for r in rows})
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups) * (len(ks) + 1), 4))
    width = 0.8 / (len(ks) + 1)
    labelled = set()  # each legend entry once, where its bars first appear

    def label(name):
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for g, (comp, b) in enumerate(groups):
        mine = {r["k"]: r for r in rows if r["batch_size"] == b and compiled(r) == comp}
        greedy = next(iter(mine.values()))["greedy_tok_s"]
        ax.bar(g, greedy, width, color="0.55", label=label("greedy"))
        for j, k in enumerate(ks, start=1):
            if k not in mine:
                continue
            r = mine[k]
            bar = ax.bar(g + j * width, r["spec_tok_s"], width, color=f"C{j - 1}",
                         label=label(f"speculative, k = {k}"))
            ax.bar_label(bar, [f"{r['tokens_per_forward']:.2f} tok/fwd\n{r['speedup']:.2f}x"], fontsize=7)
    mixed = len({c for c, _ in groups}) > 1
    ax.set_xticks([g + width * len(ks) / 2 for g in range(len(groups))],
                  [f"batch {b}" + (", compiled" if c and mixed else "") for c, b in groups])
    ax.set_ylabel("new tokens / s")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
