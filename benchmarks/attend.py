"""Attention of a decode step's queries over a static KV cache, on the CPU: what a layer costs with
scaled_dot_product_attention (eager decoding), inductor's code for it written out (compiled
decoding where the kernel does not apply) and mtp's attend kernel (compiled decoding in float32).

    OMP_NUM_THREADS=2 python benchmarks/attend.py --threads 2

The default shape is SmolLM2-135M's (9 query heads over 3 key-value groups of 64), a compiled
step's cache of 256 positions with the queries at position 110, batch 1; T queries: 1 (greedy),
4 (k = 4), 16 (a tree). Prints a table (microseconds per layer, the fastest of the rounds).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mtp.decode import attend, rowdot
from mtp.decode.cache import written_out_attention
from mtp.decode.compile import CPU_COMPILE


def timed(fn, calls: int, rounds: int) -> float:
    """The fastest of `rounds` timings of `calls` calls, in microseconds a call."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default="1,4,16")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cache", type=int, default=256, help="cache length a step reads (compiled: all of it)")
    ap.add_argument("--position", type=int, default=110, help="where the step's first query sits")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not rowdot.available():
        raise SystemExit("mtp's kernels do not build here (mtp.decode.rowdot.unavailable_reason())")
    compiled = torch.compile(written_out_attention, dynamic=False, options=CPU_COMPILE)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.heads} heads over {args.groups} "
          f"groups of {args.head_dim}, a cache of {args.cache}, queries from position {args.position}; "
          f"us per layer, fastest of {args.rounds}")
    print("| queries | SDPA (eager) | inductor, written out (compiled) | mtp attend | attend x SDPA | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for T in (int(t) for t in args.queries.split(",")):
        q = torch.randn(1, args.heads, T, args.head_dim, generator=g)
        k, v = (torch.randn(1, args.groups, args.cache, args.head_dim, generator=g) for _ in range(2))
        pos = args.position + torch.arange(T)
        mask = (torch.arange(args.cache)[None, :] <= pos[:, None])[None, None]  # (1, 1, T, S)
        gqa = args.groups != args.heads
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # noqa: E731
        ours = lambda: attend.attend(q, k, v, mask)  # noqa: E731
        diff = (ours() - sdpa()).abs().max().item()
        t_sdpa, t_ind = timed(sdpa, args.calls, args.rounds), timed(lambda: compiled(q, k, v, mask), args.calls,
                                                                     args.rounds)
        t_ours = timed(ours, args.calls, args.rounds)
        print(f"| {T} | {t_sdpa:.1f} | {t_ind:.1f} | {t_ours:.1f} | {t_ours / t_sdpa:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
