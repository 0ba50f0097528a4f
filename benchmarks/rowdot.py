"""The matrix-product kernels of CPU decoding on a model's own weights: F.linear (MKL), oneDNN's
packed product and mtp's rowdot kernel (mtp.decode.rowdot) on the weights as stored and in its
packed layout (`rowdot.pack`, as compiled decoding uses it), at the 1-16 rows of a decode step.

Each figure is one pass over every linear layer of the model in order (x of M rows @ each weight),
so that the weights stream from memory as a decode step reads them (a product timed alone finds
its weight in cache); interleaved, the fastest of the rounds. The `x 1 row` columns are what a
speculative step's products cost over a greedy step's with the same kernel; `x best 1 row` over
the fastest 1-row kernel.

    python benchmarks/rowdot.py runs/smol_par4
    python benchmarks/rowdot.py runs/smol_par4 --rows 1,2,4,8,16 --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.checkpoint import load_checkpoint
from mtp.decode import packed, rowdot


def kernels(weights: list[torch.Tensor]) -> dict[str, callable]:
    """name -> fn(x, i): x @ weights[i]^T by each kernel available here."""
    out = {"F.linear": lambda x, i: F.linear(x, weights[i])}
    if packed.dtype_supported(torch.float32):
        pk = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        out["packed (oneDNN)"] = lambda x, i: packed.packed_matmul(x, pk[i], None)
    if rowdot.available():
        out["rowdot"] = lambda x, i: rowdot.rowdot(x, weights[i])
        wp = [rowdot.pack(w) for w in weights]  # the layout compiled decoding packs the weights into
        out["rowdot, packed layout"] = lambda x, i: rowdot.rowdot_packed(x, wp[i])
    return out


def call_cost(fn, x: torch.Tensor, calls: int = 2000) -> float:
    """Seconds per call of fn(x, 0) on a weight that stays in cache: what a call costs besides
    reading the weight (which a pass over a model pays once per layer)."""
    for _ in range(50):
        fn(x, 0)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x, 0)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)[0].float().eval()
    weights = [m.weight.detach().contiguous() for m in model.modules() if type(m) is nn.Linear]
    rows = [int(r) for r in args.rows.split(",")]
    mib = sum(w.numel() * 4 for w in weights) / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(weights)} weights, {mib:.0f} MiB "
          f"float32; rowdot: {'available' if rowdot.available() else rowdot.unavailable_reason()}")
    fns = kernels(weights)
    xs = {(m, k): torch.randn(m, k) for m in rows for k in {w.shape[1] for w in weights}}
    best: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for r in range(args.rounds + 1):  # round 0 warms up
            for m in rows:
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for i, w in enumerate(weights):
                        fn(xs[m, w.shape[1]], i)
                    t = time.perf_counter() - t0
                    if r:
                        best[name, m] = min(best.get((name, m), float("inf")), t)
    tiny = kernels([torch.randn(16, 16)])
    cost = {name: call_cost(fn, torch.randn(1, 16)) for name, fn in tiny.items()}
    print("a call on a 16 x 16 weight (in cache): "
          + ", ".join(f"{name} {cost[name] * 1e6:.1f} us" for name in fns) + f" ({len(weights)} calls a pass)")
    best1 = min(best[name, rows[0]] for name in fns)
    print(f"\n| kernel | rows | ms per pass | GB/s | x {rows[0]} row(s) | x best {rows[0]} row(s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in fns:
        for m in rows:
            t = best[name, m]
            print(f"| {name} | {m} | {t * 1e3:.1f} | {mib * 2**20 / t / 1e9:.1f} | {t / best[name, rows[0]]:.2f} | "
                  f"{t / best1:.2f} |")


if __name__ == "__main__":
    main()
