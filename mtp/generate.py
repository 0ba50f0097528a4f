"""Batched decoding: greedy, sampling, and self-speculative decoding with the extra heads.

One loop does all of it. A step feeds each row its last committed token followed by k - 1
drafts, at that row's own positions, through the trunk and the heads with static KV caches
(`mtp.model.ModelCache`). The next-token head's outputs at those k positions verify the drafts:
the longest matching prefix is accepted plus the verifier's own next token, so a step commits
1..k tokens per row, and the same pass leaves the heads' outputs from which the next drafts come.
With k = 1 (or a model with one head) this is plain decoding, one token per step.

- Greedy: a draft is accepted when it equals the verifier's argmax, so the output is token for
  token the model's greedy output.
- Sampling: speculative sampling (Leviathan et al. 2023, Chen et al. 2023) with the heads'
  distributions as the proposal q: accept draft x with probability min(1, p(x) / q(x)), else
  sample from the normalised residual max(p - q, 0); the output is distributed exactly as plain
  sampling from the next-token head (p after temperature, top-k and top-p).

Rows of a batch have prompts of different lengths and accept different numbers of tokens per
step: positions, caches and masks are per row, so rows never wait for or pad to each other.
Sequential (DeepSeek-style) heads read the embedding of token t + i, which for the last
positions is a draft: they draft one depth after the other over a short window of recent
positions, rewriting the cache entries that depended on drafts.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from mtp.errors import MTPError
from mtp.model import TRUNK, MTPTransformer, ModelCache, weights_key
from mtp.packed import packed_linears, will_pack
from mtp.stacked import stacked_heads


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
    # CPU, eager: linear layers compute with prepacked oneDNN weights (mtp.packed); None: when the
    # model is big enough for it to pay (mtp.packed.worth_packing)
    pack_weights: bool | None = None
    # a token tree verified per step instead of a chain (mtp.decode.tree.Tree or its spec, e.g.
    # "0;1;0,0"); None: the chain of `speculative` heads
    tree: object = None

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


# ---- distributions ----------------------------------------------------------------------------
def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """The sampling distribution (float32 probabilities, (..., V)) after temperature, top-k, top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (..., V): argmax of p / E with E ~ Exp(1) (no host sync)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement comes from: normalize(max(p - q, 0)). It has no mass
    only when p == q, and then no draft is ever rejected; p is returned there."""
    r = (p - q).clamp_(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


# ---- the decoder ------------------------------------------------------------------------------
class _Decoder:
    """Buffers and step functions for decoding B rows of up to max_len positions with k heads:
    the static KV caches, the token buffer and (sequential heads) the next-token head's outputs.
    One per generate() call; kept per shape on the model when compiled (see _decoder_for)."""

    def __init__(self, model: MTPTransformer, k: int, batch: int, max_len: int, cfg: GenerationConfig):
        self.model, self.k, self.cfg = model, k, cfg
        p = model.output.weight
        self.device = p.device
        self.max_len = max_len
        graph = model.graph
        self.sequential = graph.is_sequential
        needed = {0} if self.sequential else {h for j in range(k) for h in graph.path_to(j)}
        self.run_order = [i for i in graph.order if i in needed]
        # parallel heads 0..k-1 all read the trunk: one batched block instead of k (mtp.stacked)
        self.stacked = stacked_heads(model, k) if cfg.stack_heads else None
        if self.stacked is not None:
            self.run_order = []
        self.cache = ModelCache(model, batch, max_len, device=p.device, dtype=p.dtype,
                                stacked=range(k) if self.stacked is not None else ())
        # the next-token head's outputs by position: sequential heads read them one step later
        self.h0 = (torch.zeros(batch, max_len, model.config.dim, device=p.device, dtype=p.dtype)
                   if self.sequential and k > 1 else None)
        self.seq = torch.zeros(batch, max_len + k, dtype=torch.long, device=p.device)  # tokens, then drafts
        # each row's decoding state, updated in place by commit() (on the device: no host sync)
        z = dict(dtype=torch.long, device=p.device)
        self.L = torch.zeros(batch, **z)  # committed tokens (prompt and new)
        self.gen = torch.zeros(batch, **z)  # new tokens
        self.budget = torch.zeros(batch, **z)  # new tokens allowed
        self.active = torch.zeros(batch, dtype=torch.bool, device=p.device)
        self.drafts = torch.zeros(batch, max(k - 1, 1), **z)  # the next step's drafts (fused greedy steps)
        self.accepted = torch.zeros(max(k - 1, 1), **z)  # accepted drafts by head, over active rows' steps
        self.row_steps = torch.zeros((), **z)  # decode steps of active rows
        self.step_fn = self._forward
        self.greedy_fn = self._greedy_step
        self.round_fn = self._greedy_round
        self.draft_fn = self._sequential_drafts
        self.compiled = cfg.compile
        how, wrap, frozen = _compile_plan(p.device)
        # weights compiled in as constants (CPU): _decoder_for checks that they have not changed
        self.weights = weights_key(model) if cfg.compile and frozen else None
        if cfg.compile:
            # one graph per (batch, k): attention always reads the whole cache (kv_len = max_len)
            # the buffers a step writes in place keep their addresses: CUDA graphs may capture them
            state = [self.seq, self.L, self.gen, self.budget, self.active, self.drafts, self.accepted, self.row_steps]
            static = [*self.cache.buffers(), *state] + ([self.h0] if self.h0 is not None else [])
            for t in static + (list(self.stacked.buffers()) if self.stacked is not None else []):
                torch._dynamo.mark_static_address(t)
            self.step_fn = wrap(torch.compile(self._forward, dynamic=False, **how))
            self.greedy_fn = wrap(torch.compile(self._greedy_step, dynamic=False, **how))
            self.round_fn = wrap(torch.compile(self._greedy_round, dynamic=False, **how))
            self.draft_fn = wrap(torch.compile(self._sequential_drafts, dynamic=False, **how))

    def reset(self, cfg: GenerationConfig) -> "_Decoder":
        """Start a generate() call: its settings and its random generator."""
        self.cfg, self.generator = cfg, None
        if self.stacked is not None:
            self.stacked.refresh()  # the weights may have changed since this decoder was built
        if not cfg.greedy:
            self.generator = torch.Generator(device=self.device)
            # without a seed, draw one from torch's global generator (so torch.manual_seed applies)
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)
        return self

    def kv_len(self, last_pos: int) -> int:
        if self.compiled:
            return self.max_len
        b = self.cfg.kv_bucket
        return min(self.max_len, b * math.ceil((last_pos + 1) / b))

    # one forward pass of the trunk and the heads the step needs, over tokens (B, T) at positions (B, T)
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                 slots: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        model, cache = self.model, self.cache
        step = cache.at(positions, kv_len, slots, mask)  # slots, mask: a token tree's (mtp.decode.tree)
        outs = {TRUNK: model.trunk(tokens, cache)}
        if self.stacked is not None:
            return self.stacked.verify(outs[TRUNK], cache.stacked, step)  # the drafters run in parallel_drafts
        for i in self.run_order:
            outs[i] = model.run_head(i, outs[model.graph.parents[i]], cache=cache)
        if self.h0 is not None:
            idx = positions[:, :, None].expand(-1, -1, outs[0].shape[-1])
            self.h0.scatter_(1, idx, outs[0])
        extra = None if self.sequential or self.k == 1 else torch.stack([outs[i] for i in range(1, self.k)])
        # the next-token head's hidden (B, T, D); what parallel_drafts reads: the other heads' (k - 1, B, T, D)
        return outs[0], extra

    def _greedy_step(self, fed: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """A whole greedy step of parallel-type heads in one function (one graph when compiled):
        fed (B, k) = each row's last token and its k - 1 drafts -> the tokens to commit (B, k;
        the first a + 1 of each row), a (B,) accepted drafts, and the next drafts (B, k - 1)."""
        h, extra = self._forward(fed, positions, kv_len)
        new, a = greedy_accept(self.model.logits(h).argmax(-1), fed[:, 1:])
        drafts = self.parallel_drafts(extra, a)[0] if fed.shape[1] > 1 else None
        return new, a, drafts

    def start(self, prompts: Sequence[Sequence[int]], budgets: list[int]) -> None:
        """The state of a new generate() call: the prompts in seq, nothing committed yet."""
        self.seq.zero_()
        for b, p in enumerate(prompts):
            self.seq[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        self.L.copy_(torch.tensor([len(p) for p in prompts]))
        self.gen.zero_()
        self.budget.copy_(torch.tensor(budgets))
        self.active.fill_(True)
        self.accepted.zero_()
        self.row_steps.zero_()

    def commit(self, new: torch.Tensor, n_new: torch.Tensor, eot_id: int | None) -> torch.Tensor:
        """Commit each row's first n_new (B,) tokens of new (B, k): at most its remaining budget,
        up to and including an end-of-text token, none for a row that has stopped. Updates the
        state in place -> what the host needs, one (B, k + 3) tensor: each row's number of
        committed tokens, the k tokens, whether it hit end-of-text, whether it stopped now."""
        ar_k = torch.arange(new.shape[1], device=new.device)
        n_new = torch.minimum(n_new, self.budget - self.gen)
        hit_eot = torch.zeros_like(self.active)
        if eot_id is not None:
            is_eot = (new == eot_id) & (ar_k[None, :] < n_new[:, None])
            hit_eot = is_eot.any(1)
            n_new = torch.where(hit_eot, is_eot.int().argmax(1) + 1, n_new)
        n_new = torch.where(self.active, n_new, 0)
        rows = torch.arange(new.shape[0], device=new.device)[:, None]
        self.seq[rows, self.L[:, None] + ar_k] = new
        self.L.add_(n_new)
        self.gen.add_(n_new)
        stopped = self.active & (hit_eot | (self.gen >= self.budget))
        self.active.logical_and_(~stopped)
        return torch.cat([n_new[:, None], new, hit_eot[:, None].long(), stopped[:, None].long()], 1)

    def count(self, a: torch.Tensor) -> None:
        """Statistics of a step that accepted a (B,) drafts per row (before its commit)."""
        self.row_steps.add_(self.active.sum())
        if self.k > 1:
            ar = torch.arange(self.k - 1, device=a.device)
            self.accepted.add_(((a[:, None] > ar) & self.active[:, None]).sum(0))

    def _greedy_round(self, kv_len: int, eot_id: int | None) -> torch.Tensor:
        """A whole greedy decode step of parallel-type heads, one graph when compiled: feed each
        row's last token and its drafts, verify, draft again, commit -> commit()'s host tensor."""
        last = self.seq.gather(1, (self.L - 1)[:, None])
        fed = torch.cat([last, self.drafts], 1) if self.k > 1 else last  # (B, k)
        positions = (self.L - 1)[:, None] + torch.arange(self.k, device=fed.device)
        new, a, drafts = self._greedy_step(fed, positions, kv_len)
        self.count(a)
        if drafts is not None:
            self.drafts.copy_(drafts)
        return self.commit(new, a + 1, eot_id)

    def choose(self, logits: torch.Tensor):
        """Greedy: (argmax, None). Sampling: (a sample, the distribution it came from)."""
        if self.cfg.greedy:
            return logits.argmax(-1), None
        probs = process_logits(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        return sample(probs, self.generator), probs

    def parallel_drafts(self, extra, idx: torch.Tensor):
        """Drafts of heads 1..k-1 at index idx (B,) of the step: (B, k-1) tokens and proposals.
        extra is what _forward returned for them: their outputs, or (stacked) their state."""
        tokens, probs = self.choose(self.model.logits(self.draft_hidden(extra, idx)))  # (k-1, B), (k-1, B, V)
        return tokens.T, (None if probs is None else probs.transpose(0, 1))

    def draft_hidden(self, extra, idx: torch.Tensor) -> torch.Tensor:
        """Heads 1..k-1's outputs (k-1, B, D) at index idx (B,) of the step (see parallel_drafts)."""
        if self.stacked is not None:
            return self.stacked.draft(extra, idx, self.cache.stacked)
        return extra[:, torch.arange(idx.shape[0], device=idx.device), idx]

    def _sequential_drafts(self, seq: torch.Tensor, last: torch.Tensor, window: int, kv_len: int):
        """Sequential heads draft depth by depth at position `last` (B,), the last position the
        verifier has read; each depth re-runs a window of recent positions whose cache entries
        read tokens that were drafts when they were written. Drafts are written into seq."""
        model = self.model
        pos = (last[:, None] - window + 1 + torch.arange(window, device=last.device)).clamp(min=0)  # (B, w)
        self.cache.at(pos, kv_len)
        x = self.h0.gather(1, pos[:, :, None].expand(-1, -1, self.h0.shape[-1]))  # (B, w, D)
        picks = []
        for i in range(1, self.k):
            x = model.run_head(i, x, cache=self.cache, future_tokens=seq.gather(1, pos + i))
            tok, probs = self.choose(model.logits(x[:, -1]))  # head i at `last` predicts last + 1 + i
            seq.scatter_(1, (last + 1 + i)[:, None], tok[:, None])
            picks.append((tok, probs))
        return self._stack(picks)

    def _stack(self, picks):
        tokens = torch.stack([t for t, _ in picks], 1)  # (B, k-1)
        probs = None if self.cfg.greedy else torch.stack([p for _, p in picks], 1)  # (B, k-1, V)
        return tokens, probs


# Compiling for a CPU: inductor's C++ GEMM micro-kernels (picked per shape against MKL by timing
# both: at the few rows of a decode step they are several times faster), the weights frozen into
# the compiled code as constants (which those kernels need: they are packed once at compile time),
# and a C++ wrapper calling the kernels instead of Python. Frozen weights do not follow the model:
# a kept decoder is rebuilt when they change (weights_key).
CPU_COMPILE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "freezing": True, "cpp_wrapper": True,
               # quiet: no tables of autotuning timings on stderr (mtp logs what it compiles, and for how long)
               "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def _compile_plan(device: torch.device) -> tuple[dict, Callable[[Callable], Callable], bool]:
    """How a decoder's step functions are compiled on this device: torch.compile's keyword
    arguments, a wrapper around each compiled function, and whether the weights are compiled in.
    GPU: CUDA graphs, the weights graph inputs. CPU: CPU_COMPILE, the weights frozen in."""
    if device.type == "cpu":
        return dict(options=dict(CPU_COMPILE)), _frozen, True
    return dict(mode="reduce-overhead"), (lambda fn: fn), False


def _frozen(compiled: Callable) -> Callable:
    """Calls compiled (which compiles at its first call) with freezing on, where torch.compile's
    own options cannot reach: dynamo reads it while tracing, to keep parameters in the graph as
    constants instead of inputs. Scoped to these calls: elsewhere (a compiled training step's
    evaluation under no_grad) frozen weights would go stale."""
    def call(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return call


def _decoder_for(model: MTPTransformer, k: int, batch: int, max_len: int, cfg: GenerationConfig) -> _Decoder:
    if not cfg.compile:
        return _Decoder(model, k, batch, max_len, cfg).reset(cfg)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    max_len = 256 * math.ceil(max_len / 256)  # fewer distinct shapes
    p = model.output.weight
    key = (k, batch, max_len, p.dtype, p.device, cfg.stack_heads)
    # kept on the model, per shape, so that later calls reuse the compiled graphs (and on CUDA
    # the captured graphs, which point at the decoder's own cache buffers)
    per_model = model.__dict__.setdefault("_compiled_decoders", {})
    kept = per_model.get(key)
    if kept is not None and kept.weights is not None and kept.weights != weights_key(model):
        del per_model[key]  # compiled with weights that have changed since: compile again
    if key not in per_model:
        per_model[key] = _Decoder(model, k, batch, max_len, cfg)
    return per_model[key].reset(cfg)


def _prepare_prompts(model: MTPTransformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig):
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
    pack = will_pack(model, cfg.pack_weights, cfg.compile)
    packing = packed_linears(model) if pack else contextlib.nullcontext()
    try:
        with packing:
            return _generate(model, prompts, cfg, k, lens, budgets, tokenizer, on_step, tree)
    finally:
        model.train(was_training)


def _generate(model, prompts, cfg, k, lens, budgets, tokenizer, on_step, tree=None) -> GenerationOutput:
    B, T0 = len(prompts), max(lens)
    room = k if tree is None else max(k, tree.size + 1)  # room for the last step's drafts (or tree)
    dec = _decoder_for(model, k, B, T0 + max(budgets) + room, cfg)
    dev = dec.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()

    rows = torch.arange(B, device=dev)
    ar_k = torch.arange(k, device=dev)
    dec.start(prompts, budgets)
    L_max = max(lens)  # an upper bound of the rows' lengths kept on the host (sizes the attention window)

    # prefill: every prompt position, each row's first token from its last prompt position
    h, extra = dec._forward(dec.seq[:, :T0], torch.arange(T0, device=dev).expand(B, -1), dec.kv_len(T0 - 1))
    last = dec.L - 1
    first, _ = dec.choose(model.logits(h[rows, last]))  # logits at the last position only
    drafts = qs = None
    tree_steps = None
    if tree is not None:  # the tree's candidates at each row's last prompt position
        from mtp.decode.tree import TreeSteps

        tree_steps = TreeSteps(dec, tree)
        tree_steps.start(extra, last)
    elif k > 1 and not dec.sequential:  # the heads' drafts at each row's last prompt position
        drafts, qs = dec.parallel_drafts(extra, last)
        dec.drafts.copy_(drafts)
    host = dec.commit(first[:, None].expand(B, k), torch.ones(B, dtype=torch.long, device=dev), cfg.eot_id)
    forwards = 1
    fused = cfg.greedy and not dec.sequential  # one function per step: forward, acceptance, drafts, commit

    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    while True:
        # one transfer to the host per step: the committed tokens, for the output and the stop strings
        step_tokens = []
        for b, (n, *rest) in enumerate(host.tolist()):
            toks = rest[:k][:n]
            step_tokens.append(toks)
            outputs[b].extend(toks)
            L_max = max(L_max, lens[b] + len(outputs[b]))
            if rest[k + 1]:
                reasons[b] = "eot" if rest[k] else ("length" if budgets[b] == cfg.max_new_tokens else "context")
        if cfg.stop:
            for b, toks in enumerate(step_tokens):
                before = len(outputs[b]) - len(toks)
                if toks and reasons[b] != "eot" and _hit_stop(outputs[b], tokenizer, cfg.stop):
                    outputs[b] = _cut_at_stop(outputs[b], before, tokenizer, cfg.stop)
                    step_tokens[b] = outputs[b][before:]
                    reasons[b] = "stop"
                    dec.active[b] = False
        if on_step is not None:
            on_step(step_tokens)
        if not any(r is None for r in reasons):
            break

        forwards += 1
        if tree_steps is not None:  # the tree's last slot is L - 1 + its size
            host = tree_steps.step(dec.kv_len(L_max - 1 + tree.size), cfg.eot_id)
            continue
        kv_len = dec.kv_len(L_max + k - 2)
        if fused:
            host = dec.round_fn(kv_len, cfg.eot_id)
            continue
        # sampling, sequential heads: the step in parts. Sequential heads draft now, from the
        # position the verifier last accepted (other heads' drafts came out of the verify pass)
        if k > 1 and dec.sequential:
            kv = dec.kv_len(L_max)  # the window ends at last = L - 2 <= L_max
            window = T0 if drafts is None else 2 * k - 2  # re-run what read drafts last time
            fn = dec._sequential_drafts if drafts is None else dec.draft_fn
            drafts, qs = fn(dec.seq, last, window, kv)
        # verify: each row's last committed token and its k - 1 drafts, at its own positions
        fed = dec.seq.gather(1, (dec.L - 1)[:, None])
        if k > 1:
            fed = torch.cat([fed, drafts], 1)  # (B, k)
        h, extra = dec.step_fn(fed, (dec.L - 1)[:, None] + ar_k, kv_len)
        new, a = _accept(dec, model.logits(h), drafts, qs)
        if k > 1 and not dec.sequential:  # next drafts, from the position just accepted
            drafts, qs = dec.parallel_drafts(extra, a)
        dec.count(a)
        last = dec.L - 1 + a
        host = dec.commit(new, a + 1, cfg.eot_id)

    sync()
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(o) for o in outputs)
    row_steps = int(dec.row_steps)
    row_forwards = B + row_steps  # the prefill and the decode steps of active rows
    acc = (dec.accepted.float() / max(row_steps, 1)).tolist() if k > 1 else []
    stats = GenerationStats(
        batch_size=B, k=k, prompt_tokens=sum(lens), new_tokens=n_tokens, forward_passes=forwards,
        tokens_per_forward=n_tokens / max(row_forwards, 1), acceptance_by_head=acc if forwards > 1 else [0.0] * (k - 1),
        seconds=seconds, tokens_per_s=n_tokens / max(seconds, 1e-9),
    )
    out_texts = None
    if tokenizer is not None:
        out_texts = [_strip_stop(tokenizer.decode(o), cfg.stop) for o in outputs]
    return GenerationOutput(outputs, [r or "length" for r in reasons], stats, out_texts)


def _commit(drafts: torch.Tensor | None, bonus: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Tokens to commit (B, k): each row's first a accepted drafts, then its bonus token (the
    verifier's own, or the replacement of the first rejected draft); the rest is padding."""
    k = 1 if drafts is None else drafts.shape[1] + 1
    new = bonus[:, None] if drafts is None else torch.cat([drafts, bonus[:, None]], 1)
    return torch.where(torch.arange(k, device=bonus.device)[None, :] < a[:, None], new, bonus[:, None])


def greedy_accept(target: torch.Tensor, drafts: torch.Tensor | None):
    """target (B, k): the verifier's argmax after each fed token; drafts (B, k - 1) -> (tokens
    to commit (B, k), a (B,): the longest prefix of drafts equal to the verifier's choices)."""
    B, k = target.shape
    if k > 1:  # the first mismatch (a cumprod of matches would be an opaque call when compiled)
        miss = drafts != target[:, :-1]
        a = torch.where(miss.any(1), miss.int().argmax(1), k - 1)
    else:
        a = torch.zeros(B, dtype=torch.long, device=target.device)
    return _commit(drafts, target[torch.arange(B, device=target.device), a], a), a


def _accept(dec: _Decoder, logits: torch.Tensor, drafts: torch.Tensor | None, qs: torch.Tensor | None):
    """Acceptance outside the fused greedy step (sampling; sequential heads): the verifier's
    logits (B, k, V) after each fed token, the drafts (B, k - 1) and, when sampling, their
    proposal distributions (B, k - 1, V) -> (tokens to commit (B, k), accepted drafts a (B,))."""
    cfg = dec.cfg
    if cfg.greedy:
        return greedy_accept(logits.argmax(-1), drafts)
    B, k = logits.shape[:2]
    p = process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # (B, k, V)
    bonus = sample(p[:, -1], dec.generator)  # every draft accepted: a sample of p after the last
    a = torch.zeros(B, dtype=torch.long, device=logits.device)
    if k > 1:
        p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        q_d = qs.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(p_d.shape, generator=dec.generator, device=logits.device)
        a = (u * q_d < p_d).long().cumprod(1).sum(1)  # accept with probability min(1, p / q)
        fixes = sample(residual_distribution(p[:, :-1], qs), dec.generator)  # (B, k-1)
        bonus = torch.where(a == k - 1, bonus, fixes.gather(1, a.clamp(max=k - 2)[:, None])[:, 0])
    return _commit(drafts if k > 1 else None, bonus, a), a


# ---- stop strings (host side, only when asked for) ----------------------------------------
def _hit_stop(tokens: list[int], tokenizer, stops: Sequence[str]) -> bool:
    text = tokenizer.decode(tokens)
    return any(s in text for s in stops)


def _cut_at_stop(tokens: list[int], before: int, tokenizer, stops: Sequence[str]) -> list[int]:
    """The shortest prefix of tokens whose text contains a stop string (the first `before`
    tokens held none)."""
    for end in range(before + 1, len(tokens) + 1):
        if _hit_stop(tokens[:end], tokenizer, stops):
            return tokens[:end]
    return tokens


def _strip_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
