"""`mtp sweep`: parameter-matched models for several n (or loss variants) trained with the same
budget on one task or corpus, each evaluated, with a Markdown report and plots.

Layout of the sweep directory:
  data/                   the task's training and evaluation files (induction, polyarith)
  <variant>_s<seed>/      one full training run each (checkpoint, metrics.jsonl, run.json)
  <variant>_s<seed>/eval.json, decode.json
                          its evaluation and its speculative-decoding statistics
  results.json, report.md, head_losses.png, metrics.png, tokens_per_forward.png (+ by_<x>.png)

Nothing is lost on a crash: a run whose checkpoint reached the asked-for number of steps is not
trained again, a run stopped part way resumes from its last checkpoint, and an evaluation already
written is not run again (pass overwrite to redo all). Each finished run also writes
`<variant>_s<seed>/run.summary.json` (its row of results.json): with it and `metrics.jsonl` a run
counts as done even without its checkpoint, so a sweep's small files can be kept (in git, say)
and the sweep resumed on another machine without the checkpoints.

Variants are written `n=4`, `n=4;loss=nth`, `n=4;offsets=1,2,4,8`, `n=4;head=causal`: the number
of heads, the loss weights (`mtp train --loss-weights`), the offsets the heads predict, and the
head type. All share one ModelConfig otherwise, so the total number of blocks stays the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mtp.config import HEAD_TYPES, ModelConfig, TrainConfig
from mtp.errors import MTPError
from mtp.plots import read_metrics

SYNTHETIC = ("induction", "polyarith")
SWEEP_TASKS = ("loss", *SYNTHETIC, "humaneval", "mbpp")


@dataclass
class Variant:
    n_future: int
    loss_weights: str = "uniform"
    offsets: list[int] | None = None
    head_type: str = "parallel"

    @property
    def name(self) -> str:
        parts = [f"n{self.n_future}"]
        if self.loss_weights != "uniform":
            parts.append(self.loss_weights.replace(":", "").replace(",", "-"))
        if self.offsets is not None:
            parts.append("off" + "-".join(map(str, self.offsets)))
        if self.head_type != "parallel":
            parts.append(self.head_type)
        return "_".join(parts)

    @property
    def label(self) -> str:
        parts = [f"n={self.n_future}"]
        if self.loss_weights != "uniform":
            parts.append(f"loss {self.loss_weights}")
        if self.offsets is not None:
            parts.append("offsets " + ",".join(map(str, self.offsets)))
        if self.head_type != "parallel":
            parts.append(self.head_type)
        return ", ".join(parts)


def parse_variant(spec: str) -> Variant:
    """`n=4;loss=nth;offsets=1,2,4,8;head=causal` (only n= is required)."""
    fields: dict = {}
    for part in spec.split(";"):
        key, eq, value = part.strip().partition("=")
        if not eq or not value:
            raise MTPError(f"bad variant {spec!r}: expected key=value parts such as n=4;loss=nth")
        try:
            if key == "n":
                fields["n_future"] = int(value)
            elif key == "loss":
                fields["loss_weights"] = value
            elif key == "offsets":
                fields["offsets"] = [int(x) for x in value.split(",")]
            elif key == "head":
                if value not in HEAD_TYPES:
                    raise MTPError(f"bad variant {spec!r}: head must be one of {', '.join(HEAD_TYPES)}")
                fields["head_type"] = value
            else:
                raise MTPError(f"bad variant {spec!r}: unknown key {key!r} (use n, loss, offsets, head)")
        except ValueError:
            raise MTPError(f"bad variant {spec!r}: {key} needs integers") from None
    if "n_future" not in fields:
        raise MTPError(f"bad variant {spec!r}: it must give the number of heads, e.g. n=4")
    if fields["n_future"] < 1:
        raise MTPError(f"bad variant {spec!r}: n must be at least 1")
    return Variant(**fields)


def _task_corpus(task: str, data_dir: Path, n_train: int | None, seed: int, progress: bool) -> list[str]:
    """Write the synthetic task's files once; returns the training corpus spec."""
    from mtp.evals.taskdata import make_corpus

    if not (data_dir / "task.json").exists():
        if progress:
            print(f"[sweep] writing the {task} task's data into {data_dir}", file=sys.stderr)
        make_corpus(task, data_dir, n_train=n_train, seed=seed, overwrite=True)
    return [str(data_dir / "train.jsonl")]


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint (None: there is none)."""
    try:
        meta = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(meta.get("step", -1))


SUMMARY = "run.summary.json"


def _recorded(run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> dict | None:
    """A finished run's row of results.json, written when it was evaluated, if it was trained
    with this model config and this many steps (and its metrics.jsonl is there for the plots)."""
    try:
        row = json.loads((run_dir / SUMMARY).read_text())
        recorded = ModelConfig.from_dict(row["model"])  # fields added since then take their defaults
    except (OSError, ValueError, KeyError, TypeError, MTPError):
        return None
    if recorded != mcfg or row.get("steps") != tcfg.steps or not (run_dir / "metrics.jsonl").exists():
        return None
    row["run_dir"] = str(run_dir)  # where the sweep is now
    return row


def _decode_stats(model, tokenizer, corpus: list[str], val_fraction: float, n: int, seed: int) -> dict:
    """Tokens per forward of greedy self-speculative decoding with k = 2..n on held-out text."""
    from mtp.data import build_token_data, default_cache_dir, eval_batches
    from mtp.generate import GenerationConfig, generate, usable_heads

    k_max = usable_heads(model)
    if k_max < 2:
        return {"k": [], "tokens_per_forward": [], "acceptance_by_head": []}
    data = build_token_data(corpus, tokenizer, default_cache_dir(), val_fraction, progress=False)
    prompt_len, new = 32, 64
    rows = next(eval_batches(data.val, 8, prompt_len - 1, 1))  # 8 held-out prompts of 32 tokens
    prompts = rows.tolist()
    out = {"k": [], "tokens_per_forward": [], "acceptance_by_head": []}
    for k in range(2, k_max + 1):
        res = generate(model, prompts, GenerationConfig(max_new_tokens=new, speculative=k, seed=seed))
        out["k"].append(k)
        out["tokens_per_forward"].append(res.stats.tokens_per_forward)
        out["acceptance_by_head"].append(list(res.stats.acceptance_by_head))
    return out


def _cosine_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, mean pairwise cosine of the heads' gradients at the trunk output) from a run that
    logged it (TrainConfig.log_grad_cosine); heads that do not read the trunk are left out."""
    steps, vals = [], []
    for r in rows:
        if r.get("kind") != "train" or r.get("grad_cosine") is None:
            continue
        c = np.asarray([[np.nan if x is None else x for x in row] for row in r["grad_cosine"]], dtype=np.float64)
        if c.ndim != 2 or c.shape[0] < 2:
            continue
        c = c[np.triu_indices(c.shape[0], 1)]
        c = c[np.isfinite(c)]
        if c.size:
            steps.append(int(r["step"]))
            vals.append(float(c.mean()))
    return steps, vals


def _grad_cosine(rows: list[dict]) -> float | None:
    """The mean pairwise gradient cosine over the second half of training (None if not logged)."""
    _, vals = _cosine_curve(rows)
    vals = vals[len(vals) // 2:]
    return float(np.mean(vals)) if vals else None


def run_sweep(task: str, out: Path, variants: Sequence[Variant], *, base: ModelConfig, train_args: dict,
              seeds: Sequence[int] = (0,), corpus: list[str] | None = None, n_train: int | None = None,
              eval_opts=None, overwrite: bool = False, progress: bool = True) -> dict:
    """Train every (variant, seed), evaluate it, and write the report. Returns results.json's content."""
    from mtp.checkpoint import load_checkpoint
    from mtp.evals import EvalOptions, json_meta, run_task
    from mtp.train import train

    if task not in SWEEP_TASKS:
        raise MTPError(f"unknown sweep task {task!r}; choose from {', '.join(SWEEP_TASKS)}")
    if not variants:
        raise MTPError("a sweep needs at least one variant")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise MTPError(f"the sweep lists a variant twice: {names}")
    out.mkdir(parents=True, exist_ok=True)
    eval_opts = eval_opts or EvalOptions()
    if task in SYNTHETIC:
        corpus = _task_corpus(task, out / "data", n_train, 1000 + seeds[0], progress)
        eval_opts.data = str(out / "data")
    elif not corpus:
        corpus = ["stdlib"]
    if task == "loss":
        eval_opts.corpus = None  # each run's own held-out split of the sweep corpus
    runs = []
    total = len(variants) * len(seeds)
    for v in variants:
        for seed in seeds:
            run_dir = out / f"{v.name}_s{seed}"
            idx = len(runs) + 1
            mcfg = dataclasses.replace(base, n_future=v.n_future, offsets=v.offsets, head_type=v.head_type)
            mcfg = ModelConfig.from_dict(mcfg.to_dict())  # validate the combination
            tcfg = TrainConfig(corpus=list(corpus), out=str(run_dir), seed=seed, loss_weights=v.loss_weights,
                               log_grad_cosine=v.n_future > 1, **train_args)
            if progress:
                print(f"[sweep] {idx}/{total}: {v.label}, seed {seed} -> {run_dir}", file=sys.stderr)
            if not overwrite and (row := _recorded(run_dir, mcfg, tcfg)) is not None:
                runs.append(row)
                continue
            t0 = time.perf_counter()
            step = None if overwrite else _checkpoint_step(run_dir)
            if step is None or step < tcfg.steps:
                for stale in ("eval.json", "decode.json", "train_seconds.json", SUMMARY):  # from an older model
                    (run_dir / stale).unlink(missing_ok=True)
                resumed = step is not None and 0 < step < tcfg.steps
                try:
                    train(tcfg, None if resumed else mcfg, resume=resumed, overwrite=not resumed, progress=progress)
                except MTPError:
                    if not resumed:
                        raise
                    resumed = False  # a checkpoint of another config: train this run afresh
                    train(tcfg, mcfg, overwrite=True, progress=progress)
                train_seconds = time.perf_counter() - t0
                (run_dir / "train_seconds.json").write_text(
                    json.dumps({"seconds": train_seconds, "resumed_from": step if resumed else None}) + "\n")
            else:
                try:
                    train_seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"]
                except (OSError, ValueError, KeyError):
                    train_seconds = None
            model, tok, meta = load_checkpoint(run_dir, "cpu")
            model.eval()
            meta = json_meta(meta)
            eval_path = run_dir / "eval.json"
            if eval_path.exists() and not overwrite:
                result = json.loads(eval_path.read_text())
            else:
                result = run_task(task, model, tok, dataclasses.replace(eval_opts), meta, progress=progress)
                eval_path.write_text(json.dumps(result, indent=2) + "\n")
            decode_path = run_dir / "decode.json"
            if decode_path.exists() and not overwrite:
                decode = json.loads(decode_path.read_text())
            else:
                decode = _decode_stats(model, tok, list(corpus), tcfg.val_fraction, v.n_future, seed)
                decode_path.write_text(json.dumps(decode, indent=2) + "\n")
            logged = read_metrics(run_dir / "metrics.jsonl")
            final = [r for r in logged if r.get("kind") == "eval"][-1]
            runs.append({
                "variant": v.name, "label": v.label, "n_future": v.n_future, "loss_weights": v.loss_weights,
                "offsets": mcfg.head_offsets, "head_type": v.head_type, "seed": seed,
                "params": sum(p.numel() for p in model.parameters()), "run_dir": str(run_dir),
                "metrics": result["metrics"], "by": result.get("by"), "by_name": result.get("by_name"),
                "heldout_loss": final["loss"], "heldout_top1": final["acc"],
                "decode": decode, "grad_cosine": _grad_cosine(logged),
                "train_seconds": train_seconds,
            })
            (run_dir / SUMMARY).write_text(json.dumps(runs[-1] | {"model": mcfg.to_dict(), "steps": tcfg.steps},
                                                      indent=2) + "\n")
    summary = {"task": task, "corpus": corpus, "model": base.to_dict(), "train": train_args,
               "seeds": list(seeds), "variants": [dataclasses.asdict(v) | {"name": v.name} for v in variants],
               "runs": runs}
    summary["plots"] = _plots(summary, out)
    summary["report"] = str(_report(summary, out))
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _breakdown(runs: list[dict]) -> tuple[list[dict], str, str]:
    """(runs with a breakdown, its key e.g. "m", the metric shown: accuracy when there is one)."""
    by_runs = [r for r in runs if r.get("by")]
    if not by_runs:
        return [], "", ""
    metrics = sorted({c for r in by_runs for row in r["by"].values() for c in row})
    return by_runs, by_runs[0].get("by_name") or "group", "accuracy" if "accuracy" in metrics else metrics[0]


def _by_variant(summary: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in summary["runs"]:
        groups.setdefault(r["label"], []).append(r)
    return groups


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs)) if len(xs) > 1 else 0.0


def _plots(summary: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtp.plots import plot_head_losses

    plots = {}
    first_seed = summary["seeds"][0]
    curves = {r["label"]: Path(r["run_dir"]) / "metrics.jsonl" for r in summary["runs"] if r["seed"] == first_seed}
    plots["head_losses"] = str(plot_head_losses(curves, out / "head_losses.png",
                                                title=f"{summary['task']}: per-head loss (seed {first_seed})"))
    groups = _by_variant(summary)
    labels = list(groups)
    metric_names = [m for m in summary["runs"][0]["metrics"]  # counts (all integers) are not plotted
                    if not all(isinstance(r["metrics"].get(m), int) for r in summary["runs"])]
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metric_names):
        for j, label in enumerate(labels):
            vals = [r["metrics"].get(m) for r in groups[label]]
            ax.scatter([j] * len(vals), vals, color=f"C{j}", s=18, alpha=0.6)
            mean, std = _mean_std(vals)
            ax.errorbar([j], [mean], yerr=[std], fmt="D", color=f"C{j}", ms=7, capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8, ha="right")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['task']}: metrics by variant (dots: seeds, diamonds: mean ± std)")
    plots["metrics"] = _save(fig, out / "metrics.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for j, label in enumerate(labels):
        rs = [r for r in groups[label] if r["decode"]["k"]]
        if not rs:
            continue
        ks = rs[0]["decode"]["k"]
        tpf = np.mean([r["decode"]["tokens_per_forward"] for r in rs], axis=0)
        ax.plot(ks, tpf, "o-", color=f"C{j}", label=label)
    ax.plot([1, max([1] + [max(r["decode"]["k"] or [1]) for r in summary["runs"]])], [1, 1], ":", color="0.5")
    ax.set_xlabel("heads used for speculation (k)")
    ax.set_ylabel("tokens per forward (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plots["tokens_per_forward"] = _save(fig, out / "tokens_per_forward.png")

    curves = {r["label"]: _cosine_curve(read_metrics(Path(r["run_dir"]) / "metrics.jsonl"))
              for r in summary["runs"] if r["seed"] == first_seed}
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for j, label in enumerate(labels):
            if label in curves:
                ax.plot(*curves[label], color=f"C{j}", lw=1, label=label)
        ax.axhline(0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean pairwise cosine")
        ax.set_title("heads' gradients at the trunk output")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots["grad_cosine"] = _save(fig, out / "grad_cosine.png")

    by_runs, key, metric = _breakdown(summary["runs"])
    if by_runs:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for j, label in enumerate(labels):
            rs = [r for r in groups[label] if r.get("by")]
            if not rs:
                continue
            xs = list(rs[0]["by"])
            ys = [np.mean([r["by"][x].get(metric, np.nan) for r in rs]) for x in xs]
            ax.plot([float(x) for x in xs], ys, "o-", color=f"C{j}", label=label)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{summary['task']}: {metric} by {key} (mean over seeds)")
        plots["by"] = _save(fig, out / f"by_{key}.png")
    return plots


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _report(summary: dict, out: Path) -> Path:
    groups = _by_variant(summary)
    metric_names = list(summary["runs"][0]["metrics"])
    m = summary["model"]
    tr = summary["train"]
    lines = [f"# Sweep: {summary['task']}", "",
             f"Model: dim {m['dim']}, {m['n_layers']} blocks in all (trunk + heads, parameter-matched), "
             f"{m['n_heads']} attention heads, vocabulary {m['vocab_size']}. Training: {tr.get('steps')} steps of "
             f"{tr.get('batch_size')} x {tr.get('seq_len')} tokens, lr {tr.get('lr')}, on {summary['corpus']}. "
             f"Seeds: {', '.join(map(str, summary['seeds']))}. Figures are mean ± std over seeds.", "",
             "| variant | params | " + " | ".join(metric_names)
             + " | held-out next-token loss | tokens/forward (k = n) | grad cosine | train s |",
             "|---" * (len(metric_names) + 6) + "|"]
    for label, rs in groups.items():
        cells = []
        for name in metric_names:
            vals = [r["metrics"].get(name) for r in rs]
            if all(isinstance(v, int) for v in vals):  # counts: the same for every run
                cells.append(" / ".join(sorted({str(v) for v in vals})))
                continue
            mean, std = _mean_std(vals)
            cells.append(f"{_fmt(mean)} ± {std:.4f}" if len(rs) > 1 else _fmt(mean))
        loss, _ = _mean_std([r["heldout_loss"][0] for r in rs])
        tpf = [r["decode"]["tokens_per_forward"][-1] for r in rs if r["decode"]["k"]]
        cos = [r["grad_cosine"] for r in rs if r["grad_cosine"] is not None]
        secs = [r["train_seconds"] for r in rs if r["train_seconds"]]
        lines.append(f"| {label} | {rs[0]['params'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {_fmt(loss)} | {_fmt(float(np.mean(tpf))) if tpf else '–'}"
                     + f" | {_fmt(float(np.mean(cos))) if cos else '–'} | {f'{np.mean(secs):.0f}' if secs else '–'} |")
    by_runs, key, metric = _breakdown(summary["runs"])
    if by_runs:
        xs = list(by_runs[0]["by"])
        lines += ["", f"{metric} by {key}:", "", "| variant | " + " | ".join(f"{key}={x}" for x in xs) + " |",
                  "|---" * (len(xs) + 1) + "|"]
        for label, rs in groups.items():
            rs = [r for r in rs if r.get("by")]
            vals = [_mean_std([r["by"].get(x, {}).get(metric) for r in rs])[0] for x in xs]
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", "Held-out loss of every head (mean over seeds):", "", "| variant | offsets | loss per head | top-1 per head |",
              "|---|---|---|---|"]
    for label, rs in groups.items():
        loss = np.mean([r["heldout_loss"] for r in rs], axis=0)
        top1 = np.mean([r["heldout_top1"] for r in rs], axis=0)
        lines.append(f"| {label} | {','.join(map(str, rs[0]['offsets']))} | "
                     + " / ".join(f"{x:.3f}" for x in loss) + " | " + " / ".join(f"{x:.3f}" for x in top1) + " |")
    lines += [""] + [f"![{name}]({Path(p).name})" for name, p in summary["plots"].items()] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
