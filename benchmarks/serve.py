"""Throughput and latency of `mtp serve` under concurrent streaming clients, speculative against
plain decoding.

For each k (plain decoding, k = 1, and speculative), starts `mtp serve CKPT --speculative k` in
its own process on a free port of 127.0.0.1, then for each number of concurrent clients runs that
many clients, each sending `--rounds` streamed greedy completions one after the other (prompts
cut from the Python standard library's source), and reports:

- tok_s: completion tokens (the server's `usage`) over the wall time of the whole level;
- ttft_p50_ms / ttft_p99_ms: time from sending a request to its first streamed text;
- itl_p50_ms / itl_p99_ms: inter-token latency: each gap between two streamed chunks, shared
  out over the tokens of the later chunk (a speculative step sends up to k tokens in one chunk;
  tokens counted by re-encoding the chunk's text, exact for byte-level models);
- tokens_per_forward and acceptance by head, from the server's /metrics.

    python benchmarks/serve.py runs/demo/n4 --concurrency 1,4,16 [--k 4] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    """n prompts of `chars` characters from the standard library's source, at random offsets."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        if len(text) > chars + 1:
            i = rng.randrange(len(text) - chars)
            out.append(text[i : i + chars])
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


class ServerProcess:
    def __init__(self, ckpt: str, k: int, max_batch: int, extra: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mtp", "serve", ckpt, "--port", str(self.port), "--speculative", str(k),
               "--max-batch", str(max_batch), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"mtp serve exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("mtp serve did not start")
            time.sleep(0.2)
        with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
            self.model = json.loads(r.read())["data"][0]["id"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_level(server: ServerProcess, tok, texts: list[str], clients: int, rounds: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=600)
    ttft, itl, tokens = [], [], 0

    async def one_client(c: int):
        nonlocal tokens
        for r in range(rounds):
            prompt = texts[(c * rounds + r) % len(texts)]
            t0 = time.perf_counter()
            stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True, stream_options={"include_usage": True})
            last = None
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                if last is None:
                    ttft.append(now - t0)
                else:
                    m = max(1, len(tok.encode(chunk.choices[0].text)))
                    itl.extend([(now - last) / m] * m)
                last = now

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"clients": clients, "requests": clients * rounds, "tokens": tokens, "seconds": round(wall, 3),
            "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 1),
            "itl_p50_ms": round(1e3 * pct(itl, 0.5), 2), "itl_p99_ms": round(1e3 * pct(itl, 0.99), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--k", type=int, default=None, help="speculative k (default: all the model's heads)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--server-args", default="", help="more `mtp serve` flags, e.g. '--max-context 512'")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from mtp.checkpoint import load_checkpoint
    from mtp.generate import usable_heads

    model, tok, _ = load_checkpoint(args.checkpoint)
    k_spec = args.k or usable_heads(model)
    del model
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts(max(levels) * args.rounds, args.prompt_chars)
    rows = []
    for k in sorted({1, k_spec}):
        server = ServerProcess(args.checkpoint, k, args.max_batch, args.server_args.split())
        try:
            for c in levels:
                asyncio.run(run_level(server, tok, texts[::-1], c, 1, 16))  # warm-up: this batch size's shapes
                before = scrape(server.base)
                row = {"k": k, **asyncio.run(run_level(server, tok, texts, c, args.rounds, args.max_tokens))}
                after = scrape(server.base)
                steps = after["mtp_row_steps_total"] - before["mtp_row_steps_total"]
                gen = after["mtp_generated_tokens_total"] - before["mtp_generated_tokens_total"]
                # decode-step tokens per row step (the prefill's first token excluded)
                row["tokens_per_forward"] = round((gen - row["requests"]) / steps, 3) if steps else None
                acc = [after[f'mtp_accepted_drafts_total{{head="{h}"}}'] - before[f'mtp_accepted_drafts_total{{head="{h}"}}']
                       for h in range(2, k + 1)]
                row["acceptance_by_head"] = [round(a / steps, 3) if steps else None for a in acc]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            server.stop()
    base = {r["clients"]: r["tok_s"] for r in rows if r["k"] == 1}
    for r in rows:
        r["speedup"] = round(r["tok_s"] / base[r["clients"]], 3) if base.get(r["clients"]) else None
    result = {"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars,
              "rounds": args.rounds, "max_batch": args.max_batch, "cpu_threads": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print("| k | clients | requests | tok/s | vs k=1 | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | tokens/forward |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['k']} | {r['clients']} | {r['requests']} | {r['tok_s']:,.0f} | {r['speedup']:.2f}x | "
                  f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
                  f"{r['tokens_per_forward']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
