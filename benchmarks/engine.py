"""The serving engine's decode loop against `generate`, in one process, without HTTP.

`mtp serve`'s speed at one client is the engine's step plus the HTTP path. This script isolates
the first: for each k it decodes the same prompts one at a time with `generate` (batch 1) and
with an `Engine` fed one request at a time (the request's events collected in-process), with the
same number of new tokens, the two taking turns, best of `--repeats`; it checks that both give the
same tokens and prints tokens per second of each and their ratio.

    python benchmarks/engine.py CKPT --k 1,4 [--max-tokens 64] [--prompts 3] [--max-context 512]
    python benchmarks/engine.py CKPT --add-heads 4 --k 1,4    # a one-head model (e.g. SmolLM2
        imported with `mtp convert hf`) with 3 heads added as `mtp finetune` initialises them:
        a step's cost is what is measured, whatever the heads accept

--profile: where the engine's time goes for one request at the largest k (torch.profiler, by
operator, top 15 by self CPU time).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from mtp.checkpoint import load_checkpoint
from mtp.finetune import add_heads
from mtp.generate import GenerationConfig, generate
from mtp.serve.engine import Engine, Request
from serve import prompts as stdlib_prompts  # benchmarks/serve.py's prompts, cut from the standard library


def engine_run(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[str, int, float]:
    """One request through the engine, alone: (its text, completion tokens, seconds)."""
    done, parts, result = threading.Event(), [], {}

    def emit(ev):
        if ev.kind == "delta":
            parts.append(ev.text)
        elif ev.kind == "done":
            result["n"] = ev.completion_tokens
            done.set()
        elif ev.kind == "error":
            result["error"] = ev.message
            done.set()

    t0 = time.perf_counter()
    engine.submit(Request(prompt=list(prompt), max_tokens=max_tokens, emit=emit))
    done.wait()
    if "error" in result:
        raise RuntimeError(result["error"])
    return "".join(parts), result["n"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--k", default="1,4")
    ap.add_argument("--add-heads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--chars", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    if args.add_heads:
        torch.manual_seed(0)
        model = add_heads(model, args.add_heads)
    model.eval()
    prompts = [tokenizer.encode(t) for t in stdlib_prompts(args.prompts, args.chars)]
    ks = [int(x) for x in args.k.split(",")]
    print(f"{args.checkpoint}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.config.n_future} heads, {args.prompts} prompts of {args.chars} characters, "
          f"{args.max_tokens} new tokens, {torch.get_num_threads()} threads")
    print("| k | generate tok/s | engine tok/s | engine / generate | same tokens |")
    print("|---|---:|---:|---:|---|")
    for k in ks:
        engine = Engine(model, tokenizer, speculative=k, max_batch=16, max_context=args.max_context).start()
        # the engine stops a request at end of text: so does generate, given the same token
        cfg = GenerationConfig(max_new_tokens=args.max_tokens, speculative=k,
                               eot_id=getattr(tokenizer, "eot_id", None))
        best = {"generate": 0.0, "engine": 0.0}
        same = True
        for _ in range(args.repeats):
            n_g = n_e = 0
            t_g = t_e = 0.0
            for p in prompts:
                t0 = time.perf_counter()
                out = generate(model, [p], cfg, tokenizer=tokenizer)
                t_g += time.perf_counter() - t0
                n_g += len(out.tokens[0])
                text, n, t = engine_run(engine, p, args.max_tokens)
                n_e, t_e = n_e + n, t_e + t
                same &= text == tokenizer.decode(out.tokens[0])  # token for token, as text
            best["generate"] = max(best["generate"], n_g / t_g)
            best["engine"] = max(best["engine"], n_e / t_e)
        print(f"| {k} | {best['generate']:.1f} | {best['engine']:.1f} | {best['engine'] / best['generate']:.2f}x "
              f"| {'yes' if same else 'NO'} |")
        if args.profile and k == ks[-1]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                engine_run(engine, prompts[0], args.max_tokens)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        engine.close()


if __name__ == "__main__":
    main()
