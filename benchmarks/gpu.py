"""One-call GPU check and benchmark (needs only torch + mtp; the H200 machine has torch 2.11;
the baseline needs transformers, skipped with a message where it is missing).

Sections, each independent (a failure is recorded and the next section runs; --skip NAME,...):
  correctness  on CUDA: memory-efficient loss = naive loss (float32, every head type), the bf16
               path stays close, and blocks compiled with inductor give the same loss and gradients;
  memory       peak memory and step time, naive vs memory-efficient, n = 1, 2, 4, 8
               (benchmarks/loss_memory.py at the GPU size: dim 768, 12 layers, vocab 32000,
               batch 16 x 1024, bf16), eager; memory-efficient compiled for n = 1, 4, 8;
  throughput   full training steps (memory-efficient loss, clipping, fused AdamW) on random tokens,
               compiled, bf16, batch 16 x 1024, vocab 32000: tokens/s, peak memory and MFU for
               n = 1 and n = 4 at the gpt2-124m and 350m layouts, and the same 124M shape (the
               very weights of our n = 1 model) trained by transformers' LlamaForCausalLM
               (compiled, bf16 autocast, fused AdamW). MFU = model FLOPs / the bf16 matmul rate
               measured here on one large matmul;
  training     real end-to-end `mtp.train` on the standard-library corpus (byte vocabulary),
               gpt2-124m layout, n = 1 and n = 4;
  decode       decoding speed, greedy vs self-speculative (benchmarks/decode.py, the decoding
               work's own benchmark, run with its defaults).
Prints a table last; writes every figure as JSON to --out. --dry-run runs the same code on CPU at
toy sizes (float32, no compilation) to check the script without a GPU.

    python benchmarks/gpu.py --out $OUT/gpu.json
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.json --skip decode
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import sysconfig
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


# ---- throughput and MFU -------------------------------------------------------------------
def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def matmul_rate() -> dict:
    """Achieved matmul FLOP/s on one large square matmul (bf16 on the GPU, float32 in a dry run):
    the denominator of MFU, measured rather than taken from a datasheet."""
    n, dtype, iters = (512, torch.float32, 5) if DRY else (8192, torch.bfloat16, 50)
    dev = "cpu" if DRY else "cuda"
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    rate = 2 * n**3 * iters / (time.perf_counter() - t0)
    log(f"  {n}^3 {str(dtype).removeprefix('torch.')} matmul: {rate / 1e12:.1f} TFLOP/s")
    return {"n": n, "dtype": str(dtype), "flops_per_s": rate}


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 per weight of every matmul
    a token passes (trunk and head blocks, and the unembedding once per head: the memory-
    efficient loss computes every head's logits), plus attention scores and values,
    12 * blocks * dim * seq (PaLM's count; causality not halved). The embedding is a lookup."""
    with torch.device("meta"):  # shapes only
        model = MTPTransformer(cfg)
    blocks = list(model.layers) + list(model.extra_heads)
    block_weights = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    unembed = cfg.n_future * cfg.vocab_size * cfg.dim
    attn_blocks = sum(1 for b in blocks if not isinstance(b, torch.nn.Linear))
    return 6 * (block_weights + unembed) + 12 * attn_blocks * cfg.n_heads * cfg.head_dim * seq


def _time_steps(step, warmup: int, steps: int) -> tuple[float, int, list[float]]:
    """(seconds per step, peak bytes during the timed steps, losses of the warm-up steps)."""
    losses = [step() for _ in range(warmup)]  # the first one compiles
    sync()
    if not DRY:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    return sec, (0 if DRY else torch.cuda.max_memory_allocated()), losses


def bench_throughput(layouts: list[str], ns: list[int], vocab: int, batch: int, seq: int,
                     warmup: int, steps: int, hf: bool) -> dict:
    from mtp.parallel import apply_compile

    dev = torch.device("cpu" if DRY else "cuda")
    cdt = None if DRY else torch.bfloat16
    rate = matmul_rate()
    g = torch.Generator(device=dev).manual_seed(0)
    window = torch.randint(0, vocab, (batch, seq + 1), device=dev, generator=g)
    rows = []

    def finish(row: dict, sec: float, peak: int, losses: list[float], cfg: ModelConfig) -> None:
        fpt = model_flops_per_token(cfg, seq)
        tok_s = batch * seq / sec
        row.update(step_ms=sec * 1e3, tokens_per_s=tok_s, peak_gib=peak / 2**30, flops_per_token=fpt,
                   mfu=fpt * tok_s / rate["flops_per_s"], first_losses=losses)
        rows.append(row)
        log(f"  {row['impl']} {row['layout']} n={row['n']}: {row['step_ms']:.1f} ms/step, {tok_s:,.0f} tokens/s, "
            f"MFU {row['mfu']:.1%}, peak {row['peak_gib']:.2f} GiB")

    def release():
        if not DRY:
            torch._dynamo.reset()
            torch.cuda.empty_cache()

    for layout in layouts:
        for n in ns:
            torch.manual_seed(0)
            over = dict(dim=64, n_layers=4 + 2 * layouts.index(layout), n_heads=4, multiple_of=16) if DRY else {}
            cfg = preset(layout, vocab_size=vocab, n_future=n, max_seq_len=seq, **over)
            model = MTPTransformer(cfg)
            hf_model = None
            if hf and n == 1 and layout == layouts[0]:  # the baseline starts from these very weights
                hf_model = _hf_copy(model)  # on the CPU until its turn
            model.to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not DRY)
            weights = parse_loss_weights("uniform", n)
            if not DRY:
                apply_compile(model)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if not DRY else contextlib.nullcontext()

            def step():
                with ctx:
                    res = mtp_loss_backward(model, window, weights, compute_dtype=cdt, compile_ce=not DRY)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(res.loss)

            sec, peak, losses = _time_steps(step, warmup, steps)
            finish({"impl": "mtp", "layout": layout, "n": n, "params": sum(p.numel() for p in model.parameters())},
                   sec, peak, losses, cfg)
            del model, opt
            release()
            if hf_model is not None:
                rows_hf = _bench_hf(hf_model, window, warmup, steps)
                finish({"impl": "transformers", "layout": layout, "n": 1,
                        "params": sum(p.numel() for p in hf_model.parameters())}, *rows_hf, cfg)
                del hf_model
                release()
    out = {"matmul": rate, "batch": batch, "seq": seq, "vocab": vocab, "rows": rows,
           "dtype": "float32" if DRY else "bfloat16 autocast", "compiled": not DRY}
    out["checks"] = throughput_targets(rows)
    return out


def _hf_copy(model: MTPTransformer):
    """Our n = 1 model as a transformers LlamaForCausalLM (same weights), or None without it."""
    try:
        from mtp.interop.hf import to_hf_llama

        return to_hf_llama(model).train()
    except Exception as e:  # transformers missing or too old: the rest still runs
        log(f"  transformers baseline skipped: {str(e).splitlines()[0]}")
        return None


def _bench_hf(hf_model, window: torch.Tensor, warmup: int, steps: int):
    """transformers' own training step: compiled model, bf16 autocast, loss from labels (its
    float32 cross-entropy over the full logits), fused AdamW."""
    x = window[:, :-1].contiguous()
    hf_model.to(x.device)
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, fused=not DRY)
    fwd = hf_model if DRY else torch.compile(hf_model)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if not DRY else contextlib.nullcontext()

    def step():
        with ctx:
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return _time_steps(step, warmup, steps)


def throughput_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets at the first layout: MFU >= 50% for n = 1 and n = 4, n = 4 step time
    <= 1.07x and peak memory <= 1.1x n = 1's."""
    mine = {(r["layout"], r["n"]): r for r in rows if r["impl"] == "mtp"}
    first = rows[0]["layout"] if rows else None
    one, four = mine.get((first, 1)), mine.get((first, 4))
    checks = []
    for name, value, limit, below in [
        ("MFU n=1 >= 0.50", one and one["mfu"], 0.50, False),
        ("MFU n=4 >= 0.50", four and four["mfu"], 0.50, False),
        ("step time n=4 / n=1 <= 1.07", one and four and four["step_ms"] / one["step_ms"], 1.07, True),
        ("peak memory n=4 / n=1 <= 1.1", one and four and one["peak_gib"] and four["peak_gib"] / one["peak_gib"],
         1.1, True),
    ]:
        ok = None if not value else (value <= limit if below else value >= limit)
        checks.append({"target": name, "value": value or None, "pass": ok})
    return checks


def bench_decode() -> dict:
    """Greedy vs self-speculative decoding: benchmarks/decode.py (the decoding work's benchmark)
    with its own defaults (batch 1 and 16 on the GPU; a toy run on CPU)."""
    try:
        import decode  # benchmarks/decode.py
    except ImportError as e:  # mtp.generate not there yet
        log(f"  decode skipped: {e}")
        return {"skipped": str(e)}
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # its table is printed at the end, with the others
            decode.main(["--out", os.path.join(tmp, "decode.json")] + (["--dry-run"] if DRY else []))
        with open(os.path.join(tmp, "decode.json")) as f:
            return json.load(f)


def bench_training(steps: int) -> dict:
    from mtp.tokenizers import ByteTokenizer, pad_vocab
    from mtp.train import train

    out = {}
    vocab = pad_vocab(ByteTokenizer().vocab_size)
    for n in (1, 4):
        tmp = tempfile.mkdtemp(prefix=f"mtp-gpu-n{n}-")
        mcfg = preset("tiny" if DRY else "gpt2-124m", vocab_size=vocab, n_future=n)
        # a dry run reads one stdlib package, not the whole library
        corpus = [os.path.join(sysconfig.get_paths()["stdlib"], "json")] if DRY else ["stdlib"]
        tcfg = TrainConfig(corpus=corpus, out=tmp, steps=steps, batch_size=2 if DRY else 16,
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
    p.add_argument("--skip", default="",
                   help="comma-separated sections to skip: correctness,memory,throughput,training,decode")
    p.add_argument("--layouts", default="gpt2-124m,350m", help="throughput: model layouts")
    p.add_argument("--vocab", type=int, default=32000, help="throughput: vocabulary size")
    p.add_argument("--no-hf", action="store_true", help="throughput: skip the transformers baseline")
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
    section("memory", bench_memory, [1, 4, 8], [8192])  # compiled: the faster chunk of 2026-11-28
    if DRY:
        tp = (["tiny", "small"], [1, 4], 512, 2, 64, 1, 2)
    else:
        tp = (args.layouts.split(","), [1, 4], args.vocab, 16, 1024, 3, 10)
    section("throughput", bench_throughput, *tp, not args.no_hf)
    section("training", bench_training, args.train_steps)
    section("decode", bench_decode)

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
    if "decode" in report and "rows" in report["decode"]:
        import decode

        print(decode.table(report["decode"]))
    if "throughput" in report:
        t = report["throughput"]
        print(f"\ntraining steps, batch {t['batch']} x {t['seq']}, vocab {t['vocab']}, {t['dtype']}, "
              f"compiled {t['compiled']}; MFU against a measured matmul rate of "
              f"{t['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")
        print("| impl | layout | n | params | ms/step | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|---|")
        for r in t["rows"]:
            print(f"| {r['impl']} | {r['layout']} | {r['n']} | {r['params'] / 1e6:.1f}M | {r['step_ms']:.1f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_gib']:.2f} |")
        for c in t["checks"]:
            value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
            print(f"target {c['target']}: {value} {({True: 'PASS', False: 'FAIL'}).get(c['pass'], 'N/A')}")
    if "training" in report:
        for k, r in report["training"].items():
            print(f"training {k}: {r['tokens_per_s_last']:,.0f} tokens/s, held-out loss per head "
                  + ", ".join(f"{x:.3f}" for x in r["heldout_loss"]))
    print("section seconds: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f}" for k, v in report.items()
                                          if k.endswith("_seconds")))
    for name, err in report["errors"].items():
        print(f"section {name} FAILED: {err.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
