"""Batched decoding: greedy, sampling, and self-speculative decoding with the extra heads.

`generate` is the algorithm; the pieces it is made of live in `mtp.decode`:

1. prefill: every prompt position through the trunk and the heads, with static KV caches
   (`mtp.decode.cache`); each row's first token from its last prompt position;
2. draft: the heads' guesses of the tokens after it, a chain of k - 1 (`mtp.decode.chain`) or a
   tree of candidates (`mtp.decode.tree`);
3. verify: each row's last committed token and its drafts in one forward pass, at the row's own
   positions (`mtp.decode.decoder.Decoder`);
4. accept: the longest prefix of drafts the next-token head agrees with, plus its own next token
   (`mtp.decode.sampling`: token for token plain greedy's output, or exactly plain sampling's
   distribution); the same pass leaves the next drafts;
5. commit: 1..k tokens per row, on the device, up to its budget or end of text;
6. emit: the host reads each step once (`StepResult`), applies stop strings and streams.

With k = 1 (or a model with one head) this is plain decoding, one token per step. Rows of a
batch have prompts of different lengths and accept different numbers of tokens per step; they
never wait for or pad to each other.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from mtp.decode.chain import ChainSteps
from mtp.decode.compile import decoder_for
from mtp.decode.decoder import StepResult
from mtp.decode.packed import packing
from mtp.decode.stops import cut_at_stop, hit_stop, strip_stop
from mtp.errors import MTPError
from mtp.model import MTPTransformer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    speculative: int | None = None  # k heads drafting/verifying; 1 = plain decoding; None = all usable
    eot_id: int | None = None  # stop a row when it produces this token (kept in the output)
    stop: Sequence[str] = ()  # stop a row when its text contains one (cut from the text)
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    kv_bucket: int = 128  # attention reads the cache up to a multiple of this (static shapes)
    stack_heads: bool = True  # parallel heads run as one batched block (a copy of their weights)
    # CPU, eager: linear layers compute with prepacked oneDNN weights (mtp.decode.packed); None: when the
    # model is big enough for it to pay (mtp.decode.packed.worth_packing), and then each shape of
    # weight from the rows where the packed product was measured faster on this machine
    pack_weights: bool | None = None
    # a token tree verified per step instead of a chain (mtp.decode.tree.Tree or its spec, e.g.
    # "0;1;0,0"); None: the chain of `speculative` heads
    tree: object = None
    # the token ids the heads draft among (mtp.decode.draft_vocab; e.g. a corpus's most frequent
    # tokens); None: the whole vocabulary. The verifier always reads the whole vocabulary.
    draft_vocab: Sequence[int] | None = None
    # prompt lookup (greedy; mtp.decode.lookup): a row whose last lookup_ngram..2 tokens occurred
    # before is fed up to this many tokens that followed them there instead of its heads' drafts
    # (0: off; with k = 1, plain prompt lookup decoding)
    lookup: int = 0
    lookup_ngram: int = 3

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise MTPError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise MTPError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise MTPError(f"top-k must be at least 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MTPError(f"top-p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):  # "" is in every text: it would stop after one token
            raise MTPError("a stop string must not be empty")
        if self.speculative is not None and self.speculative < 1:
            raise MTPError(f"--speculative must be at least 1, got {self.speculative}")
        if self.kv_bucket < 1:
            raise MTPError(f"kv_bucket must be at least 1, got {self.kv_bucket}")
        if self.tree is not None and self.compile:
            raise MTPError("tree decoding runs eagerly: drop --compile to use --tree")
        if self.lookup < 0:
            raise MTPError(f"--lookup must be at least 0, got {self.lookup}")
        if self.lookup:
            if self.lookup_ngram < 2:
                raise MTPError(f"--lookup-ngram must be at least 2, got {self.lookup_ngram}")
            if self.tree is not None:
                raise MTPError("--lookup drafts a chain: it cannot be combined with --tree")
            if not self.greedy:
                raise MTPError("--lookup is greedy decoding: drop --temperature")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationStats:
    batch_size: int
    k: int  # heads used per step (1: plain decoding)
    prompt_tokens: int
    new_tokens: int
    forward_passes: int  # model calls: the prefill and one per decode step
    tokens_per_forward: float  # new tokens per forward pass of a row, averaged over the batch
    acceptance_by_head: list[float]  # for heads 2..k: share of a row's steps accepting its draft
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # the new tokens of each row
    stop_reasons: list[str]  # "eot", "stop", "length" (max_new_tokens) or "context" (model's max_seq_len)
    stats: GenerationStats
    texts: list[str] | None = field(default=None)  # with a tokenizer: the decoded new text


def usable_heads(model: MTPTransformer) -> int:
    """How many heads can draft consecutively: heads 1..k must predict offsets 1..k."""
    k = 0
    for off in model.config.head_offsets:
        if off != k + 1:
            break
        k += 1
    return k


def resolve_k(model: MTPTransformer, speculative: int | None) -> int:
    usable = usable_heads(model)
    if speculative is None:
        return usable
    n = model.config.n_future
    if speculative > n:
        raise MTPError(f"--speculative {speculative} is more than the model's {n} head{'s' * (n > 1)}")
    if speculative > usable:
        raise MTPError(f"--speculative {speculative}: heads 1..{speculative} must predict offsets 1..{speculative}, "
                       f"but this model's heads predict {model.config.head_offsets}")
    return speculative




def _prepare_prompts(model: MTPTransformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig):
    """Check the prompts -> their lengths and each row's budget of new tokens."""
    if len(prompts) == 0:
        raise MTPError("no prompts given")
    ctx, vocab = model.config.max_seq_len, model.config.vocab_size
    lens = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise MTPError(f"prompt {i} is empty: give at least one token")
        if len(p) >= ctx:
            raise MTPError(f"prompt {i} has {len(p)} tokens, which leaves no room in the model's context of {ctx}")
        if min(p) < 0 or max(p) >= vocab:
            raise MTPError(f"prompt {i} has token ids outside the model's vocabulary of {vocab}")
        lens.append(len(p))
    # each row stops at max_new_tokens or at the end of the model's context
    budgets = [min(cfg.max_new_tokens, ctx - n) for n in lens]
    return lens, budgets


@torch.no_grad()
def generate(model: MTPTransformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None,
             tokenizer=None, on_step: Callable[[list[list[int]]], None] | None = None) -> GenerationOutput:
    """Decode a batch of token prompts (of any lengths). on_step, if given, receives each step's
    newly committed tokens of every row (for streaming)."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    if cfg.stop and tokenizer is None:
        raise MTPError("stop strings need a tokenizer to decode the output")
    k = resolve_k(model, cfg.speculative)
    tree = None
    if cfg.tree is not None:
        from mtp.decode.tree import resolve_tree

        tree, k = resolve_tree(model, cfg, k)
    lens, budgets = _prepare_prompts(model, prompts, cfg)
    was_training = model.training
    model.eval()
    try:
        with packing(model, cfg.pack_weights, cfg.compile):
            return _generate(model, prompts, cfg, k, lens, budgets, tokenizer, on_step, tree)
    finally:
        model.train(was_training)


@dataclass
class _Row:
    """One row's output as the host sees it."""

    prompt_len: int
    budget: int
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None  # why it stopped; None while it runs


def _emit(rows: list[_Row], step: StepResult, cfg: GenerationConfig, tokenizer, dec) -> list[list[int]]:
    """The host's side of a step: each row's new tokens and why it stopped, stop strings cut
    (a row that reaches one is stopped on the device too) -> the step's tokens by row."""
    out = []
    for b, row in enumerate(rows):
        new = step.tokens[b]
        row.tokens.extend(new)
        if step.stopped[b]:
            row.reason = "eot" if step.hit_eot[b] else ("length" if row.budget == cfg.max_new_tokens else "context")
        if cfg.stop and new and row.reason != "eot" and hit_stop(row.tokens, tokenizer, cfg.stop):
            before = len(row.tokens) - len(new)
            row.tokens = cut_at_stop(row.tokens, before, tokenizer, cfg.stop)
            new = row.tokens[before:]
            row.reason = "stop"
            dec.active[b] = False
        out.append(new)
    return out


def _generate(model, prompts, cfg, k, lens, budgets, tokenizer, on_step, tree=None) -> GenerationOutput:
    B, T0 = len(prompts), max(lens)
    room = max(k, 1 + cfg.lookup) if tree is None else max(k, tree.size + 1)  # the last step's drafts (or tree)
    dec = decoder_for(model, k, B, T0 + max(budgets) + room, cfg)
    dev = dec.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    dec.start(prompts, budgets)
    if tree is not None:
        from mtp.decode.tree import TreeSteps

        steps = TreeSteps(dec, tree)
    elif cfg.lookup:
        from mtp.decode.lookup import LookupSteps

        steps = LookupSteps(dec, lambda b: [*prompts[b], *rows[b].tokens], cfg.lookup, cfg.lookup_ngram, T0)
    else:
        steps = ChainSteps(dec, prompt_window=T0)

    # prefill: every prompt position; each row's first token from its last prompt position
    h, extra = dec.forward(dec.seq[:, :T0], torch.arange(T0, device=dev).expand(B, -1), dec.kv_len(T0 - 1))
    last = dec.lengths - 1
    first, _ = dec.choose(model.logits(h[torch.arange(B, device=dev), last]))
    # draft: the heads' guesses after it, from the same pass
    steps.start(extra, last)
    # commit the first token
    result = dec.commit(first[:, None].expand(B, k), torch.ones(B, dtype=torch.long, device=dev), cfg.eot_id)
    forwards = 1
    rows = [_Row(n, budget) for n, budget in zip(lens, budgets)]
    longest = T0  # an upper bound of the rows' committed lengths, on the host (sizes attention)
    while True:
        # emit: the step's one transfer to the host
        step_tokens = _emit(rows, StepResult.read(result), cfg, tokenizer, dec)
        longest = max(longest, *(r.prompt_len + len(r.tokens) for r in rows))
        if on_step is not None:
            on_step(step_tokens)
        if all(r.reason is not None for r in rows):
            break
        # verify the drafts, accept, draft again, commit: one decode step of every row
        result = steps.advance(longest, cfg.eot_id)
        forwards += 1

    sync()
    seconds = time.perf_counter() - t0
    outputs = [r.tokens for r in rows]
    n_tokens = sum(len(o) for o in outputs)
    row_steps = int(dec.row_steps)
    row_forwards = B + row_steps  # the prefill and the decode steps of active rows
    acc = (dec.accepted.float() / max(row_steps, 1)).tolist() if k > 1 else []
    stats = GenerationStats(
        batch_size=B, k=k, prompt_tokens=sum(lens), new_tokens=n_tokens, forward_passes=forwards,
        tokens_per_forward=n_tokens / max(row_forwards, 1), acceptance_by_head=acc if forwards > 1 else [0.0] * (k - 1),
        seconds=seconds, tokens_per_s=n_tokens / max(seconds, 1e-9),
    )
    texts = None if tokenizer is None else [strip_stop(tokenizer.decode(o), cfg.stop) for o in outputs]
    return GenerationOutput(outputs, [r.reason or "length" for r in rows], stats, texts)
