"""What compiling the decode step costs a new process, with inductor's on-disk cache cold and warm,
and what the compiled step then decodes, for each k.

Each measurement is a fresh Python process (as a user's second `mtp generate --compile` is):
it compiles generate's step for one k (batch 1), times greedy decoding with it, and checks its
tokens against eager decoding. Two processes in a row share one new TORCHINDUCTOR_CACHE_DIR: the
first compiles cold, the second finds the first one's graphs on disk (where inductor can cache
them: with oneDNN weight prepacking, `cpp.weight_prepack`, it could not). `--prepack` runs the
same with that prepacking on, as decoding compiled before 2026-12-03.

    python benchmarks/compile_cache.py CKPT --k 1,4 [--threads 1] [--prepack]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
from mtp.checkpoint import load_checkpoint
from mtp.generate import GenerationConfig, generate
import mtp.decode.compile as C
ckpt, k, threads, prepack, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
if prepack:
    C.CPU_COMPILE["cpp.weight_prepack"] = True
torch.set_num_threads(threads)
model, tok, _ = load_checkpoint(ckpt, "cpu")
model.eval()
prompt = [tok.encode("def fibonacci(n):\n    ")]
t0 = time.perf_counter()
generate(model, prompt, GenerationConfig(max_new_tokens=8, speculative=k, compile=True))
compile_s = time.perf_counter() - t0
best = float("inf")
for _ in range(3):
    t1 = time.perf_counter()
    res = generate(model, prompt, GenerationConfig(max_new_tokens=new, speculative=k, compile=True))
    best = min(best, time.perf_counter() - t1)
eager = generate(model, prompt, GenerationConfig(max_new_tokens=new, speculative=k))
from torch._dynamo.utils import counters
cache = {key.removeprefix("fxgraph_cache_"): v for key, v in counters["inductor"].items() if key.startswith("fxgraph_cache")}
print(json.dumps({"compile_s": compile_s, "tok_s": len(res.tokens[0]) / best, "same": res.tokens == eager.tokens,
                  "fx_cache": cache}))
"""


def run_child(ckpt: str, k: int, threads: int, prepack: bool, new: int, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", CHILD, ckpt, str(k), str(threads), "1" if prepack else "0", str(new)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"the child process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--k", default="1,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prepack", action="store_true", help="also with oneDNN weight prepacking (the old setting)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for prepack in (False, True) if args.prepack else (False,):
        for k in [int(x) for x in args.k.split(",")]:
            with tempfile.TemporaryDirectory(prefix="mtp-inductor-") as cache_dir:
                for cache in ("cold", "warm"):
                    r = run_child(args.checkpoint, k, args.threads, prepack, args.new_tokens, cache_dir)
                    rows.append({"prepack": prepack, "k": k, "cache": cache, **r})
                    print(f"[compile_cache] prepack {prepack}, k={k}, {cache}: {r}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.threads} thread(s), batch 1, {args.new_tokens} new tokens; a fresh process per row")
    print("| weight prepack | k | inductor cache | compile s | tok/s | same tokens as eager | FX graph cache |")
    print("|---|---|---|---:|---:|---|---|")
    for r in rows:
        cache = ", ".join(f"{k} {v}" for k, v in sorted(r["fx_cache"].items())) or "-"
        print(f"| {'on' if r['prepack'] else 'off'} | {r['k']} | {r['cache']} | {r['compile_s']:.1f} | {r['tok_s']:.0f} "
              f"| {'yes' if r['same'] else 'NO'} | {cache} |")


if __name__ == "__main__":
    main()
