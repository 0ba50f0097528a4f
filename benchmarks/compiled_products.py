"""A compiled decode step with its few-row products on mtp's rowdot kernel (packed layout, the
default plan on a big float32 model) against inductor's own kernels (its C++ GEMM template or
oneDNN, chosen by autotuning: the plan where rowdot does not build, or with MTP_ROWDOT=0), side by
side in one process: the greedy step and k-head steps, interleaved, each the fastest of the rounds
and the median, with each graph's compile time and the process's peak memory after it.

    python benchmarks/compiled_products.py runs/smol_par4 --k 4 --draft-vocab 8192

The plans trade compile time and memory for speed differently on each CPU (docs/benchmarks.md):
inductor autotunes every product shape (minutes per graph on SmolLM2) and keeps its prepacked
copy of the weights per graph.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from decode_step import step_inputs  # benchmarks/, the script's own directory, is on sys.path
from mtp.checkpoint import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--k", default="4")
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N", help="the k-head steps draft among N tokens")
    ap.add_argument("--position", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, meta = load_checkpoint(args.checkpoint)
    model.eval()
    dv = None
    if args.draft_vocab:
        from mtp.decode.draft_vocab import checkpoint_draft_vocab

        dv = checkpoint_draft_vocab(meta, tok, args.draft_vocab, model.config.vocab_size, None)
    plans = [(1, "greedy", True)] + [(int(k), products, rowdot) for k in args.k.split(",")
                                     for products, rowdot in (("rowdot", True), ("inductor", False))]
    runs = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, position {args.position}"
          + (f", drafts over {args.draft_vocab} tokens" if dv is not None else ""))
    with torch.no_grad():
        for k, products, rowdot in plans:
            dec, fed, positions, kv_len = step_inputs(model, k, 1, args.position, True, dv if k > 1 else None,
                                                      compile=True, rowdot=rowdot)
            t0 = time.perf_counter()
            dec.greedy_step_fn(fed, positions, kv_len)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
            print(f"compiled k = {k} ({products}) in {time.perf_counter() - t0:.0f} s; the process's peak "
                  f"memory so far {peak:.0f} MiB", flush=True)
            runs[k, products] = (dec, fed, positions, kv_len)
        times: dict[tuple, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, (dec, fed, positions, kv_len) in runs.items():
                for _ in range(2):
                    dec.greedy_step_fn(fed, positions, kv_len)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    dec.greedy_step_fn(fed, positions, kv_len)
                times[key].append((time.perf_counter() - t0) / args.steps)
    greedy = times[1, "greedy"]
    print("\n| k | products | best ms | x greedy (best) | median ms | x greedy (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (k, products), t in times.items():
        print(f"| {k} | {products} | {min(t) * 1e3:.2f} | {min(t) / min(greedy):.2f} | "
              f"{statistics.median(t) * 1e3:.2f} | {statistics.median(t) / statistics.median(greedy):.2f} |")


if __name__ == "__main__":
    main()
