"""Peak memory and step time of one training step, naive vs memory-efficient multi-token loss.

For n_future = 1, 2, 4, 8 (parameter-matched: the same n_layers for every n, so the trunk has
n_layers - n blocks) this times forward + backward (grads zeroed first, no optimizer) with
    naive      mtp.losses.naive_loss(...).loss.backward()   all heads' logits (B, T, n, V) at once
    efficient  mtp.losses.mtp_loss_backward(...)             one head and one logit chunk at a time
and checks the targets: n=4 efficient peak memory <= 1.1x and step time <= 1.25x those of n=1.

CPU (default without CUDA): every (n, mode) runs in a fresh subprocess (`--worker`); memory is
peak RSS (ru_maxrss) minus the RSS after building the model, its gradient buffers and the batch.
GPU (`--device cuda`, default with CUDA): in-process, bf16 autocast; memory is
max_memory_allocated minus memory allocated before the step (model + grads, after warm-up).

    python benchmarks/loss_memory.py --quick             # smoke test, seconds
    python benchmarks/loss_memory.py                     # CPU: d=512, 8 layers, V=32000, 4 x 512
    python benchmarks/loss_memory.py --device cuda       # GPU: d=768, 12 layers, V=32000, 16 x 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

from mtp.config import HEAD_TYPES, ModelConfig
from mtp.errors import MTPError
from mtp.losses import mtp_loss_backward, naive_loss, parse_loss_weights
from mtp.model import MTPTransformer

MODES = ("naive", "efficient")
# (dim, layers, attention heads, vocab, batch, seq, warm-up steps, timed steps) per device
DEFAULTS = {
    "cpu": dict(dim=512, layers=8, heads=8, vocab=32000, batch=4, seq=512, warmup=1, steps=3),
    "cuda": dict(dim=768, layers=12, heads=12, vocab=32000, batch=16, seq=1024, warmup=2, steps=10),
    "quick": dict(dim=64, layers=8, heads=4, vocab=512, batch=2, seq=64, warmup=1, steps=2),
}
MIB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_config(args: argparse.Namespace, n: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        max_seq_len=args.seq, n_future=n, head_type=args.head_type,
    )


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so earlier peaks (imports, init)
    cannot hide the step's own; harmless where unsupported."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def train_step(model: MTPTransformer, window: torch.Tensor, weights: list[float], mode: str,
               chunk: int | None = None, compile_ce: bool = False) -> None:
    """Zero grads, forward, backward; under bf16 autocast on CUDA."""
    cuda = window.device.type == "cuda"
    model.zero_grad(set_to_none=False)  # keep the grad buffers: they are part of the baseline
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        if mode == "naive":
            loss = naive_loss(model, window, weights).loss
        else:
            mtp_loss_backward(model, window, weights, compute_dtype=torch.bfloat16 if cuda else None,
                              chunk=chunk, compile_ce=compile_ce)
    if mode == "naive":
        loss.backward()


def measure(args: argparse.Namespace, n: int, mode: str) -> dict:
    """Build the model for n heads, warm up, then time --steps steps; memory in bytes."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = MTPTransformer(model_config(args, n)).to(device)
    if args.compile:
        for block in list(model.layers) + list(model.extra_heads):
            block.compile()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    window = torch.randint(args.vocab, (args.batch, args.seq + 1), device=device)  # (B, T + 1)
    weights = parse_loss_weights("uniform", n)
    if cuda:
        for _ in range(args.warmup):
            train_step(model, window, weights, mode, args.chunk, args.compile)
        sync()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = current_rss()
        reset_peak_rss()
        for _ in range(args.warmup):
            train_step(model, window, weights, mode, args.chunk, args.compile)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, window, weights, mode, args.chunk, args.compile)
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return {"n": n, "mode": mode, "extra_bytes": peak - base, "base_bytes": base, "step_s": step_s,
            "params": sum(p.numel() for p in model.parameters())}


def run_worker(args: argparse.Namespace, n: int, mode: str) -> dict:
    """One measurement in a fresh interpreter, so each peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--device", "cpu", "--ns", str(n),
           "--head-type", args.head_type, "--threads", str(args.threads), "--warmup", str(args.warmup)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("dim", "layers", "heads", "vocab", "batch", "seq", "steps")]
    cmd += ["--modes", mode] + ([f"--chunk={args.chunk}"] if args.chunk else []) + (["--compile"] if args.compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        log(f"  n={n} {mode} failed: {last}")
        return {"n": n, "mode": mode, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(results: list[dict]) -> None:
    """mem_ratio: extra memory / n=1 efficient; time_ratio: step time / n=1 of the same mode."""
    ok = [r for r in results if "error" not in r]
    ones = {r["mode"]: r for r in ok if r["n"] == 1}
    for r in ok:
        eff1, same1 = ones.get("efficient"), ones.get(r["mode"])
        r["mem_ratio"] = r["extra_bytes"] / eff1["extra_bytes"] if eff1 and eff1["extra_bytes"] > 0 else None
        r["time_ratio"] = r["step_s"] / same1["step_s"] if same1 else None


def targets(results: list[dict]) -> list[dict]:
    eff4 = next((r for r in results if r["n"] == 4 and r["mode"] == "efficient" and "error" not in r), None)
    checks = []
    for what, key, limit in (("peak memory", "mem_ratio", 1.1), ("step time", "time_ratio", 1.25)):
        value = eff4.get(key) if eff4 else None
        status = "N/A" if value is None else "PASS" if value <= limit else "FAIL"
        checks.append({"check": f"n=4 efficient {what} / n=1 <= {limit}", "value": value, "status": status})
    return checks


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(args: argparse.Namespace, results: list[dict], checks: list[dict], out) -> None:
    print(f"device {args.device} | dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab "
          f"{args.vocab}, batch {args.batch} x {args.seq}, {args.head_type} heads, uniform weights, "
          f"CE chunk {args.chunk or 'auto'}{', compiled' if args.compile else ''} | "
          f"{args.warmup} warm-up + {args.steps} timed steps", file=out)
    head = f"{'n':>2}  {'mode':<9}  {'extra peak MiB':>14}  {'/ n=1 eff':>9}  {'step ms':>9}  {'/ n=1':>6}"
    print(head + "\n" + "-" * len(head), file=out)
    for r in results:
        if "error" in r:
            print(f"{r['n']:>2}  {r['mode']:<9}  error: {r['error']}", file=out)
            continue
        print(f"{r['n']:>2}  {r['mode']:<9}  {r['extra_bytes'] / MIB:>14.1f}  {fmt(r['mem_ratio'], '>9.2f')}"
              f"  {r['step_s'] * 1e3:>9.1f}  {fmt(r['time_ratio'], '>6.2f')}", file=out)
    print(file=out)
    for c in checks:
        print(f"{c['check']}: {fmt(c['value'], '.3f')}  {c['status']}", file=out)


def fail(msg: str) -> None:
    log(f"loss_memory.py: error: {msg}")  # one line, exit code 2 (DESIGN.md contract)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = fail  # type: ignore[method-assign]
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--head-type", choices=HEAD_TYPES, default="parallel")
    p.add_argument("--ns", default="1,2,4,8", help="comma-separated n_future values (default 1,2,4,8)")
    p.add_argument("--modes", default=",".join(MODES), help=argparse.SUPPRESS)
    p.add_argument("--only-efficient", action="store_true", help="skip the naive loss")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    for k in ("dim", "layers", "heads", "vocab", "batch", "seq", "warmup", "steps"):
        p.add_argument(f"--{k}", type=int, default=None, help="default depends on the device")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--chunk", type=int, default=None, help="tokens per cross-entropy chunk (default: automatic)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks and the cross-entropy chunk")
    p.add_argument("--json", metavar="PATH", help="write all figures to PATH as JSON ('-' = stdout)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k, v in DEFAULTS["quick" if args.quick else args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.ns = [int(s) for s in args.ns.split(",")]
    except ValueError:
        p.error(f"--ns must be comma-separated integers, got {args.ns!r}")
    args.modes = ["efficient"] if args.only_efficient else args.modes.split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if min(args.steps, args.threads) < 1 or args.warmup < 0:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    try:
        for n in args.ns:
            model_config(args, n)
    except MTPError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args, args.ns[0], args.modes[0])))
        return
    results = []
    for n in args.ns:
        for mode in args.modes:
            log(f"n={n} {mode} ...")
            r = run_worker(args, n, mode) if args.device == "cpu" else measure(args, n, mode)
            results.append(r)
            if "error" not in r:
                log(f"  extra peak {r['extra_bytes'] / MIB:.1f} MiB, step {r['step_s'] * 1e3:.1f} ms")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    add_ratios(results)
    checks = targets(results)
    print_report(args, results, checks, sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        config = {k: getattr(args, k) for k in ("device", "dim", "layers", "heads", "vocab", "batch", "seq",
                                                "head_type", "warmup", "steps", "threads", "chunk", "compile")}
        config["torch"] = torch.__version__
        blob = json.dumps({"config": config, "results": results, "checks": checks}, indent=2)
        if args.json == "-":
            print(blob)
        else:
            with open(args.json, "w") as f:
                f.write(blob + "\n")


if __name__ == "__main__":
    main()
