"""The quickstart main job: a 4-token model and its parameter-matched next-token twin, trained
with the same budget on the Python standard library's own source, compared side by side.

Writes into the run directory: n4/ and n1/ (each a full run with its checkpoint), report.md
(the table), demo.json (all figures) and head_losses.png (per-head loss curves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mtp.bench import corpus_prompts, format_table, run_bench
from mtp.config import TrainConfig, preset
from mtp.plots import plot_decoding, plot_head_losses
from mtp.tokenizers import ByteTokenizer, pad_vocab
from mtp.train import train

# Sized so both models train in under 10 minutes on 2 CPU cores (see docs/benchmarks.md). Deep and
# narrow (16 blocks of dim 96, 1.83M parameters): the n = 4 model keeps a 12-block trunk, so its
# heads are a small share of a decoding step and draft well (on 2026-12-02 its k = 4 drafts gave
# 3.2 tokens per forward where the earlier 6-block, dim-192 model's gave 1.7).
DEMO_MODEL = dict(dim=96, n_layers=16, n_heads=3, max_seq_len=256, multiple_of=64)
DEMO_STEPS = 400
DEMO_TRAIN = dict(batch_size=8, seq_len=256, lr=2e-3, warmup=30, eval_every=100, eval_batches=16,
                  save_every=100, log_every=10, seed=1337)
DEMO_DECODE = dict(batch_sizes=(1, 4), max_new_tokens=128, prompt_len=64, n_prompts=8)
# and compiled (`--compile`, where a CPU decodes several times faster) at batch 1, each k: left out
# of the main job (ks=()), as every setting compiles for 30-90 s on 2 cores, which would take the
# main job past 10 minutes; `mtp bench CKPT --compile` measures it
DEMO_DECODE_COMPILED = dict(batch_sizes=(1,), ks=())


def decoding_comparison(model, tokenizer, progress: bool = True, compile: bool = False) -> dict:
    """Self-speculative decoding of the n = 4 model against its own greedy decoding, on prompts
    from the held-out split of the standard library: eager at every k and DEMO_DECODE's batch
    sizes, or compiled at DEMO_DECODE_COMPILED's."""
    sizes, ks = ((DEMO_DECODE_COMPILED["batch_sizes"], DEMO_DECODE_COMPILED["ks"]) if compile
                 else (DEMO_DECODE["batch_sizes"], None))
    n = max(DEMO_DECODE["n_prompts"], *sizes)  # every batch size decodes them all
    prompts = corpus_prompts(["stdlib"], tokenizer, n, DEMO_DECODE["prompt_len"])
    return run_bench(model.eval(), prompts, sizes, ks, DEMO_DECODE["max_new_tokens"], compile=compile,
                     log=None if progress else (lambda m: None))


def run_demo(out: Path, steps: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    steps = steps or DEMO_STEPS
    vocab = pad_vocab(ByteTokenizer().vocab_size)
    runs, seconds = {}, {}
    for n in (4, 1):
        mcfg = preset("small", vocab_size=vocab, n_future=n, **DEMO_MODEL)
        tcfg = TrainConfig(corpus=["stdlib"], out=str(out / f"n{n}"), steps=steps, device=device,
                           **{**DEMO_TRAIN, "warmup": min(DEMO_TRAIN["warmup"], steps // 10 + 1)})
        t0 = time.perf_counter()
        runs[n] = train(tcfg, mcfg, overwrite=True, progress=progress)
        seconds[n] = time.perf_counter() - t0

    rows = []
    for n, res in runs.items():
        counts = res.model.param_counts()
        rows.append({
            "n_future": n, "params": counts["total"], "trunk_blocks": res.model.config.n_trunk,
            "heldout_next_token_loss": res.final_eval["loss"][0],
            "heldout_loss_per_head": res.final_eval["loss"], "heldout_top1_per_head": res.final_eval["acc"],
            "train_tokens_per_s": res.tokens_per_s, "seconds": seconds[n],
        })
    top1 = lambda r: " / ".join(f"{a:.3f}" for a in r["heldout_top1_per_head"])  # noqa: E731
    header = "| model | params | next-token loss (held-out) | top-1 per head (t+1 / t+2 / ...) | train tok/s | time |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| n={r['n_future']} | {r['params'] / 1e6:.2f}M | {r['heldout_next_token_loss']:.4f} | "
                     f"{top1(r)} | {r['train_tokens_per_s']:,.0f} | {r['seconds']:.0f}s |")
    table = "\n".join(lines)
    plot = plot_head_losses({f"n = {n}": out / f"n{n}" / "metrics.jsonl" for n in runs}, out / "head_losses.png",
                            title=f"per-head loss, byte-level, Python stdlib, {steps} steps")
    tokens = steps * DEMO_TRAIN["batch_size"] * DEMO_TRAIN["seq_len"]
    decoding = decoding_comparison(runs[4].model, ByteTokenizer(), progress)
    decode_table = format_table(decoding)
    compiled = (decoding_comparison(runs[4].model, ByteTokenizer(), progress, compile=True)
                if DEMO_DECODE_COMPILED["ks"] else None)
    both = {**decoding, "results": decoding["results"] + [{**r, "compiled": True} for r in
                                                          (compiled["results"] if compiled else [])]}
    decode_plot = plot_decoding(both, out / "decoding.png", title="n = 4 model: greedy vs self-speculative decoding")
    compiled_table = format_table(compiled) if compiled else None
    compiled_part = ("" if compiled is None else
                     f"\nCompiled (`--compile`: on a CPU, C++ kernels with the weights frozen in; on a GPU, "
                     f"CUDA graphs), the same prompts:\n\n{compiled_table}\n")
    report = (f"# mtp demo\n\nTwo parameter-matched models ({DEMO_MODEL['n_layers']} blocks, dim "
              f"{DEMO_MODEL['dim']}), byte-level, trained {steps} steps ({tokens:,} tokens) each on the "
              f"Python standard library's source; held-out split by file.\n\n{table}\n\n![per-head loss]({plot.name})\n"
              f"\n## Decoding the n = 4 model\n\nPlain greedy against self-speculative decoding with k heads, "
              f"{decoding['max_new_tokens']} new tokens from {DEMO_DECODE['prompt_len']}-byte held-out prompts, "
              f"on {decoding['device']} ({decoding['threads']} threads); `identical`: the speculative output "
              f"equals greedy. Eager:\n\n{decode_table}\n{compiled_part}\n![decoding speed]({decode_plot.name})\n")
    (out / "report.md").write_text(report)
    result = {"steps": steps, "tokens_per_model": tokens, "models": rows,
              "table": "\n\n".join([table, decode_table] + ([compiled_table] if compiled else [])),
              "decoding": decoding, "decoding_compiled": compiled, "report": str(out / "report.md"), "plot": str(plot),
              "decoding_plot": str(decode_plot)}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
