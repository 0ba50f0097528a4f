"""One-call GPU check and benchmark (needs only torch + mtp; the H200 machine has torch 2.11).

Sections, each independent (a failure is recorded and the next section runs):
  1. correctness on CUDA: memory-efficient loss = naive loss (float32, every head type), the bf16
     path stays close, and blocks compiled with inductor give the same loss and gradients;
  2. peak memory and step time, naive vs memory-efficient, n = 1, 2, 4, 8 (benchmarks/loss_memory.py
     at the GPU size: dim 768, 12 layers, vocab 32000, batch 16 x 1024, bf16), eager and compiled;
  3. real training throughput: `mtp.train` on the standard-library corpus, gpt2-124m layout,
     n = 1 and n = 4, bf16 autocast, compiled blocks.
Prints a table last; writes every figure as JSON to --out.

    python benchmarks/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_memory  # noqa: E402

from mtp.config import HEAD_TYPES, ModelConfig, TrainConfig, preset  # noqa: E402
from mtp.losses import mtp_loss_backward, naive_loss, parse_loss_weights  # noqa: E402
from mtp.model import MTPTransformer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def grads(model) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}


def max_rel_err(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max() / (b[k].float().abs().max() + 1e-12)) for k in a)


DRY = False  # --dry-run: the same code on CPU at toy sizes, to check the script before a GPU run


def check_correctness() -> dict:
    dev = torch.device("cpu" if DRY else "cuda")
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for ht in HEAD_TYPES:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=256,
                          n_future=4, head_type=ht)
        model = MTPTransformer(cfg).to(dev)
        win = torch.randint(0, 1000, (4, 257), device=dev)
        w = parse_loss_weights("uniform", 4)
        ref = naive_loss(model, win, w)
        ref.loss.backward()
        g_ref = grads(model)
        model.zero_grad(set_to_none=True)
        eff = mtp_loss_backward(model, win, w, chunk=300)
        out[f"fp32_{ht}_grad_rel_err"] = max_rel_err(grads(model), g_ref)
        out[f"fp32_{ht}_loss_diff"] = abs(float(eff.loss) - float(ref.loss))
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            bf = mtp_loss_backward(model, win, w, compute_dtype=torch.bfloat16)
        out[f"bf16_{ht}_loss_diff"] = abs(float(bf.loss) - float(ref.loss))
        log(f"  {ht}: fp32 grad rel err {out[f'fp32_{ht}_grad_rel_err']:.2e}, bf16 loss diff "
            f"{out[f'bf16_{ht}_loss_diff']:.2e}")
    # compiled blocks and cross-entropy chunk against eager, same weights
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, dim=128, n_layers=6, n_heads=4, max_seq_len=256, n_future=4)
    model = MTPTransformer(cfg).to(dev)
    win = torch.randint(0, 1000, (4, 257), device=dev)
    w = parse_loss_weights("uniform", 4)
    eager = mtp_loss_backward(model, win, w)
    g_eager = grads(model)
    model.zero_grad(set_to_none=True)
    for b in list(model.layers) + list(model.extra_heads):
        b.compile(backend="aot_eager" if DRY else "inductor")
    comp = mtp_loss_backward(model, win, w, compile_ce=True)
    out["compiled_grad_rel_err"] = max_rel_err(grads(model), g_eager)
    out["compiled_loss_diff"] = abs(float(comp.loss) - float(eager.loss))
    log(f"  compiled vs eager: grad rel err {out['compiled_grad_rel_err']:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def bench_memory(compiled_ns: list[int], chunks: list[int]) -> dict:
    base = ["--device", "cpu", "--quick"] if DRY else ["--device", "cuda"]
    args = loss_memory.parse_args(base)
    results = []
    for n in args.ns:
        for mode in args.modes:
            log(f"  n={n} {mode}")
            results.append(loss_memory.measure(args, n, mode))
    loss_memory.add_ratios(results)
    checks = loss_memory.targets(results)
    # memory-efficient loss with the blocks and the cross-entropy chunk compiled, per chunk size
    compiled = []
    for chunk in chunks:
        cargs = loss_memory.parse_args(base + ["--compile", f"--chunk={chunk}"])
        for n in compiled_ns:
            log(f"  n={n} efficient, compiled, chunk {chunk}")
            compiled.append({**loss_memory.measure(cargs, n, "efficient"), "chunk": chunk})
    return {"config": {k: getattr(args, k) for k in ("dim", "layers", "heads", "vocab", "batch", "seq", "steps")},
            "results": results, "checks": checks, "compiled": compiled, "_args": args}


def bench_training(steps: int) -> dict:
    from mtp.tokenizers import ByteTokenizer
    from mtp.train import pad_vocab, train

    out = {}
    vocab = pad_vocab(ByteTokenizer().vocab_size)
    for n in (1, 4):
        tmp = tempfile.mkdtemp(prefix=f"mtp-gpu-n{n}-")
        mcfg = preset("tiny" if DRY else "gpt2-124m", vocab_size=vocab, n_future=n)
        tcfg = TrainConfig(corpus=["stdlib"], out=tmp, steps=steps, batch_size=2 if DRY else 16,
                           seq_len=mcfg.max_seq_len, lr=1e-3, warmup=2, eval_every=0, eval_batches=4, save_every=0,
                           log_every=10, compile=not DRY, device="cpu" if DRY else "cuda")
        t0 = time.perf_counter()
        res = train(tcfg, mcfg, progress=False)
        rows = [json.loads(ln) for ln in open(os.path.join(tmp, "metrics.jsonl"))]
        tok_s = [r["tokens_per_s"] for r in rows if r["kind"] == "train"]
        out[f"n{n}"] = {"steps": steps, "seconds": time.perf_counter() - t0, "tokens_per_s_last": res.tokens_per_s,
                        "tokens_per_s_windows": tok_s, "heldout_loss": res.final_eval["loss"],
                        "heldout_acc": res.final_eval["acc"], "params": res.model.param_counts()["total"]}
        log(f"  n={n}: {res.tokens_per_s:,.0f} tokens/s, held-out next-token loss {res.final_eval['loss'][0]:.3f}")
        del res
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,memory,training")
    p.add_argument("--dry-run", action="store_true", help="run everything on CPU at toy sizes")
    args = p.parse_args()
    global DRY
    DRY = args.dry_run
    if DRY:
        args.train_steps = min(args.train_steps, 10)
    else:
        assert torch.cuda.is_available(), "this script needs a GPU (or --dry-run)"
    gpu = "CPU (dry run)" if DRY else torch.cuda.get_device_name(0)
    report = {"torch": torch.__version__, "gpu": gpu, "errors": {}}
    skip = set(args.skip.split(","))

    def section(name, fn, *a):
        if name in skip:
            return
        log(f"== {name}")
        if not DRY:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception:
            report["errors"][name] = traceback.format_exc()
            log(report["errors"][name])
        report[f"{name}_seconds"] = time.perf_counter() - t0
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in report.items() if k != "memory"} | (
                {"memory": {k: v for k, v in report["memory"].items() if k != "_args"}} if "memory" in report else {}),
                f, indent=2, default=str)

    section("correctness", check_correctness)
    section("memory", bench_memory, [1, 2, 4, 8], [2048, 8192])
    section("training", bench_training, args.train_steps)

    print(f"\n{report['gpu']}, torch {report['torch']}")
    if "correctness" in report:
        c = report["correctness"]
        worst = max(v for k, v in c.items() if k.startswith("fp32_") and k.endswith("grad_rel_err"))
        print(f"correctness: efficient vs naive fp32, worst grad rel err over head types {worst:.2e}; "
              f"compiled vs eager {c['compiled_grad_rel_err']:.2e}")
    if "memory" in report:
        m = report["memory"]
        loss_memory.print_report(m["_args"], m["results"], m["checks"], sys.stdout)
        for r in m["compiled"]:
            one = next(o for o in m["compiled"] if o["n"] == 1 and o["chunk"] == r["chunk"])
            print(f"compiled, chunk {r['chunk']}: n={r['n']} efficient: extra peak {r['extra_bytes'] / 2**20:.0f} MiB "
                  f"({r['extra_bytes'] / one['extra_bytes']:.2f}x n=1), step {r['step_s'] * 1e3:.1f} ms "
                  f"({r['step_s'] / one['step_s']:.2f}x n=1)")
    if "training" in report:
        for k, r in report["training"].items():
            print(f"training {k}: {r['tokens_per_s_last']:,.0f} tokens/s, held-out loss per head "
                  + ", ".join(f"{x:.3f}" for x in r["heldout_loss"]))
    for name, err in report["errors"].items():
        print(f"section {name} FAILED: {err.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
