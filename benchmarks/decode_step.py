"""What one decode step costs: a plain greedy step against a speculative step with k heads, with
the heads run as one batched block (`stack_heads`, the default) or each as its own block, and
with the linear layers' weights as they are, prepacked for the CPU (`pack_weights` on,
mtp.decode.packed) or packed from the rows where the packed product was measured faster on this
machine (`pack_weights` auto on a big model: "measured").

A speculative step pays off only when it yields more tokens than it costs greedy steps, so the
`x greedy` column is the tokens per forward a model's heads must reach for a speedup at that k.
Each step is the fused greedy step of `mtp.generate` (forward, acceptance, next drafts) at fixed
positions, timed in a loop; the settings take turns and each figure is the best of the rounds.

    python benchmarks/decode_step.py runs/demo/n4 --batch-sizes 1,4 --threads 1
    python benchmarks/decode_step.py runs/smollm2/heads --steps 5
    python benchmarks/decode_step.py runs/smollm2_distill/heads --profile --k 4
    python benchmarks/decode_step.py runs/smollm2_distill/heads --k 4 --draft-vocab 8192

--draft-vocab N: also the k-head steps with the heads drafting among the N most frequent tokens
of the checkpoint's training corpus (mtp.decode.draft_vocab): the drafts' unembedding shrinks by
V / N (rows "stacked, dv N").

--compile: the same steps compiled as `--compile` decodes (mtp.decode.compile: on a CPU inductor's
C++ kernels on frozen weights, prepacked for oneDNN on a big model; attention over the whole cache
of 256 * ceil(positions / 256) slots, as compiled decoding reads it); one graph per setting,
compiled before the timing (the compile time of each is printed).

--dtype bfloat16: the weights (and so the products) in bfloat16 (not the same output as float32).
On the Intel Xeon of 2026-12-07 (AMX), oneDNN's packed bfloat16 product of 576 x 49152, timed
alone with its weight in cache, took 1.45 ms for 1 row and 1.64 ms for 16, against 2.46 and 8.04
ms for F.linear in float32; in SmolLM2's eager decode step a k = 4 step then cost 1.20 greedy
steps with packed weights (1.60 in float32), docs/benchmarks.md.

--profile: where a step's time goes (torch.profiler, packed weights where they apply), by kind of
operator, for the greedy step and the k-head step: the matrix products, attention, the rest of
the operators, and the time no operator accounts for (Python and dispatch between them), with
the weight bytes a step reads over its time (the memory bandwidth a step reaches).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from mtp.checkpoint import load_checkpoint
from mtp.decode.compile import compile_steps, compiled_max_len
from mtp.decode.decoder import Decoder
from mtp.decode.packed import applies, measured_kernels, packed_linears
from mtp.generate import GenerationConfig, usable_heads


def step_inputs(model, k: int, batch: int, position: int, stacked: bool = True, draft_vocab=None,
                compile: bool = False, rowdot: bool = True):
    """A decoder of k heads and one step's inputs at `position`: (decoder, fed, positions, kv_len);
    compile: compiled as --compile decodes (rowdot=False: with inductor's products, see
    mtp.decode.compile.compile_steps)."""
    cfg = GenerationConfig(speculative=k, stack_heads=stacked, draft_vocab=draft_vocab, compile=compile)
    max_len = compiled_max_len(position + 2 * k) if compile else position + 2 * k
    dec = Decoder(model, k, batch, max_len, cfg).reset(cfg)
    if compile:
        compile_steps(dec, rowdot=rowdot)
    fed = torch.randint(0, model.config.vocab_size, (batch, k))
    positions = position + torch.arange(k).expand(batch, -1)
    return dec, fed, positions, dec.kv_len(position + k)


def step_costs(model, batch: int, ks: list[int], position: int = 100, steps: int = 100, rounds: int = 7,
               weights: str = "as stored", draft_vocab=None) -> dict:
    """{(k, heads): seconds per step}; k = 1 is the plain greedy step, heads "stacked", "own
    blocks" or (with draft_vocab, the token ids) "stacked, dv N". weights: as stored, packed,
    measured, or compiled (the steps compiled as --compile decodes)."""
    compile = weights == "compiled"
    settings = [(1, "-")] + [(k, h) for k in ks for h in ("stacked", "own blocks")]
    if draft_vocab is not None:
        settings += [(k, f"stacked, dv {len(draft_vocab)}") for k in ks]
    runs = {(k, h): step_inputs(model, k, batch, position, h != "own blocks",
                                draft_vocab if "dv" in h else None, compile) for k, h in settings}
    best = {}
    packing = (contextlib.nullcontext() if weights in ("as stored", "compiled")
               else packed_linears(model, measured=weights == "measured"))
    with torch.no_grad(), packing:
        if compile:  # each graph compiles at its first call, before any timing
            for (k, h), (dec, fed, positions, kv_len) in runs.items():
                t0 = time.perf_counter()
                dec.greedy_step_fn(fed, positions, kv_len)
                print(f"compiled k = {k} ({h}) in {time.perf_counter() - t0:.0f} s", flush=True)
        for _ in range(rounds):
            for key, (dec, fed, positions, kv_len) in runs.items():
                for _ in range(2):
                    dec.greedy_step_fn(fed, positions, kv_len)
                t0 = time.perf_counter()
                for _ in range(steps):
                    dec.greedy_step_fn(fed, positions, kv_len)
                best[key] = min(best.get(key, float("inf")), (time.perf_counter() - t0) / steps)
    return best


KINDS = (  # operator name fragments -> kind, first match wins
    ("matmul", ("mkldnn_linear", "mkl_linear", "addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("norm", ("rsqrt", "rms_norm", "aten::mean", "aten::pow")),
)


def _kind(name: str) -> str:
    return next((k for k, parts in KINDS if any(p in name for p in parts)), "other ops")


def profile_steps(model, batch: int, ks: list[int], position: int, steps: int) -> None:
    """Print, per k, a step's time split by operator kind (self time of the top-level ops)."""
    from torch.profiler import ProfilerActivity, profile

    # every matrix once (a tied unembedding counted once): at most what a step reads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    print(f"\nwhere a step's time goes (batch {batch}, position {position}, {steps} steps; the model's "
          f"matrices: {weight_bytes / 2**20:.0f} MiB)")
    print("| k | ms per step | matmul | attention | norm | other ops | outside ops | weight GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad(), (packed_linears(model) if applies(model) else contextlib.nullcontext()):
        for k in [1] + ks:
            dec, fed, positions, kv_len = step_inputs(model, k, batch, position)
            for _ in range(3):
                dec.greedy_step_fn(fed, positions, kv_len)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    dec.greedy_step_fn(fed, positions, kv_len)
                wall = (time.perf_counter() - t0) / steps
            by = {"matmul": 0.0, "attention": 0.0, "norm": 0.0, "other ops": 0.0}
            for e in prof.key_averages():
                by[_kind(e.key)] += e.self_cpu_time_total / 1e6 / steps
            ops = sum(by.values())
            # the profiler's own cost inflates `wall`; the shares are read against its total
            scale = wall / max(ops, wall)
            cells = " | ".join(f"{100 * by[n] * scale / wall:.0f}%" for n in by)
            print(f"| {k} | {wall * 1e3:.2f} | {cells} | {100 * max(wall - ops, 0) / wall:.0f}% | "
                  f"{weight_bytes / wall / 1e9:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--k", default=None, help="e.g. 2,4 (default: 2..all usable heads)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--position", type=int, default=100, help="where in the context the steps sit")
    ap.add_argument("--steps", type=int, default=100, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=7, help="timings per setting; the fastest is reported")
    ap.add_argument("--profile", action="store_true", help="also split a step's time by operator kind")
    ap.add_argument("--compile", action="store_true", help="also the steps compiled as --compile decodes")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="decode with the weights in this dtype (default: as stored)")
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="also the k-head steps drafting among the N most frequent corpus tokens (0: off)")
    ap.add_argument("--corpus", nargs="*", default=None,
                    help="--draft-vocab's corpus (default: the checkpoint's training corpus, else stdlib)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, meta = load_checkpoint(args.checkpoint)
    model.eval()
    if args.dtype:
        model.to(getattr(torch, args.dtype))
    draft_vocab = None
    if args.draft_vocab:
        from mtp.decode.draft_vocab import checkpoint_draft_vocab

        draft_vocab = checkpoint_draft_vocab(meta, tok, args.draft_vocab, model.config.vocab_size, args.corpus)
    ks = [int(k) for k in args.k.split(",")] if args.k else list(range(2, usable_heads(model) + 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {next(model.parameters()).dtype}, "
          f"position {args.position}; x greedy: over the greedy step with the same weights")
    modes = ("as stored", "packed", "measured") if applies(model) else ("as stored",)
    if args.compile:
        modes += ("compiled",)
    for i, b in enumerate(int(x) for x in args.batch_sizes.split(",")):
        costs = {w: step_costs(model, b, ks, args.position, args.steps, args.rounds, w, draft_vocab) for w in modes}
        best = min(c[(1, "-")] for c in costs.values())
        if i == 0:
            if "measured" in modes:
                print(f"measured: the kernel by rows {measured_kernels(model)}")
            print("| batch | weights | k | heads | ms per step | x greedy | x best greedy |")
            print("|---|---|---|---|---|---|---|")
        for weights, c in costs.items():
            greedy = c[(1, "-")]
            for (k, heads), sec in c.items():
                print(f"| {b} | {weights} | {k} | {heads} | {sec * 1e3:.3f} | {sec / greedy:.2f} | {sec / best:.2f} |",
                      flush=True)
        if args.profile:
            profile_steps(model, b, ks, args.position, min(args.steps, 30))


if __name__ == "__main__":
    main()
