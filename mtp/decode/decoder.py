"""The decoder: the device-side state of decoding B rows with k heads, and its step functions.

A step feeds each row its last committed token followed by k - 1 drafts, at that row's own
positions, through the trunk and the heads with static KV caches (`mtp.decode.cache`). The
next-token head's outputs at those k positions verify the drafts (`mtp.decode.sampling`): the
longest matching prefix is accepted plus the verifier's own next token, so a step commits 1..k
tokens per row, and the same pass leaves the heads' outputs from which the next drafts come.
With k = 1 (or a model with one head) this is plain decoding, one token per step.

Rows have prompts of different lengths and accept different numbers of tokens per step:
positions, caches and masks are per row, so rows never wait for or pad to each other. Each row's
state (its length, new tokens, budget, whether it is active) lives on the device and a step
updates it in place (`Decoder.commit`), so a step needs no host sync; the host reads each step
once, as one tensor, into a `StepResult`.

Sequential (DeepSeek-style) heads read the embedding of token t + i, which for the last
positions is a draft: they draft one depth after the other over a short window of recent
positions, rewriting the cache entries that depended on drafts (`Decoder.sequential_drafts`).

A Decoder runs eagerly; `mtp.decode.compile` compiles its step functions (the `*_fn` fields)
and keeps compiled decoders per model.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from mtp.config import TRUNK
from mtp.decode.cache import ModelCache
from mtp.decode.draft_vocab import DraftVocab, draft_vocab_of
from mtp.decode.sampling import greedy_accept, process_logits, sample
from mtp.decode.stacked import stacked_heads

if TYPE_CHECKING:
    from mtp.generate import GenerationConfig
    from mtp.model import MTPTransformer


@dataclass
class StepResult:
    """What the host learns of a step, per row: the tokens it committed, whether one of them is
    the end-of-text token, and whether the row stopped at this step.
    A step returns it packed into one tensor on the device (`pack`); the host reads that once
    (`read`: one transfer per step)."""

    tokens: list[list[int]]
    hit_eot: list[bool]
    stopped: list[bool]

    @staticmethod
    def pack(n_new: torch.Tensor, new: torch.Tensor, hit_eot: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """n_new (B,), new (B, k), hit_eot (B,), stopped (B,) -> one (B, k + 3) tensor."""
        return torch.cat([n_new[:, None], new, hit_eot[:, None].long(), stopped[:, None].long()], 1)

    @classmethod
    def read(cls, packed: torch.Tensor) -> "StepResult":
        k = packed.shape[1] - 3
        rows = packed.tolist()  # the step's one transfer to the host
        return cls(tokens=[r[1 : 1 + k][: r[0]] for r in rows],
                   hit_eot=[bool(r[k + 1]) for r in rows], stopped=[bool(r[k + 2]) for r in rows])


class Decoder:
    """Buffers and step functions for decoding B rows of up to max_len positions with k heads:
    the static KV caches, the token buffer, each row's state and (sequential heads) the
    next-token head's outputs. One per generate() call, or kept per shape when compiled
    (`mtp.decode.compile.decoder_for`)."""

    def __init__(self, model: MTPTransformer, k: int, batch: int, max_len: int, cfg: GenerationConfig):
        # the model weakly: a decoder kept for it (mtp.decode.compile) must not keep it alive
        self._model = weakref.ref(model)
        self.k, self.cfg = k, cfg
        p = model.output.weight
        self.device = p.device
        self.max_len = max_len
        graph = model.graph
        self.sequential = graph.is_sequential
        needed = {0} if self.sequential else {h for j in range(k) for h in graph.path_to(j)}
        self.run_order = [i for i in graph.order if i in needed]
        # parallel heads 0..k-1 all read the trunk: one batched block instead of k (mtp.decode.stacked)
        self.stacked = stacked_heads(model, k) if cfg.stack_heads else None
        if self.stacked is not None:
            self.run_order = []
        self.cache = ModelCache(model, batch, max_len, device=p.device, dtype=p.dtype,
                                stacked=range(k) if self.stacked is not None else ())
        # the next-token head's outputs by position: sequential heads read them one step later
        self.next_token_hidden = (torch.zeros(batch, max_len, model.config.dim, device=p.device, dtype=p.dtype)
                                  if self.sequential and k > 1 else None)
        self.seq = torch.zeros(batch, max_len + k, dtype=torch.long, device=p.device)  # tokens, then drafts
        # each row's decoding state, updated in place by commit() (on the device: no host sync)
        z = dict(dtype=torch.long, device=p.device)
        self.lengths = torch.zeros(batch, **z)  # committed tokens (prompt and new)
        self.generated = torch.zeros(batch, **z)  # new tokens
        self.budget = torch.zeros(batch, **z)  # new tokens allowed
        self.active = torch.zeros(batch, dtype=torch.bool, device=p.device)
        self.drafts = torch.zeros(batch, max(k - 1, 1), **z)  # the next step's drafts (fused greedy steps)
        self.accepted = torch.zeros(max(k - 1, 1), **z)  # accepted drafts by head, over active rows' steps
        self.row_steps = torch.zeros((), **z)  # decode steps of active rows
        # the step functions as the decode loop calls them: these methods, or their compiled graphs
        self.forward_fn = self.forward
        self.greedy_step_fn = self.greedy_step
        self.greedy_round_fn = self.greedy_round
        self.sequential_drafts_fn = self.sequential_drafts
        self.compiled = False  # compiled: attention always reads the whole cache (static shapes)
        self.weights = None  # compiled with the weights as constants: their weights_key
        self.generator: torch.Generator | None = None
        self.draft_vocab: DraftVocab | None = None  # the heads' restricted unembedding (cfg.draft_vocab)
        self.use_draft_vocab(cfg)  # built now: a compiled decoder (mtp.decode.compile) takes it as constants

    @property
    def model(self) -> MTPTransformer:
        model = self._model()
        assert model is not None, "a decoder outlived its model"
        return model

    def state_buffers(self) -> list[torch.Tensor]:
        """The tensors the step functions update in place (the caches aside)."""
        state = [self.seq, self.lengths, self.generated, self.budget, self.active, self.drafts, self.accepted,
                 self.row_steps]
        return state + ([self.next_token_hidden] if self.next_token_hidden is not None else [])

    def reset(self, cfg: GenerationConfig) -> "Decoder":
        """Start a generate() call: its settings and its random generator."""
        self.cfg, self.generator = cfg, None
        self.use_draft_vocab(cfg)
        if self.stacked is not None:
            self.stacked.refresh()  # the weights may have changed since this decoder was built
        if not cfg.greedy:
            self.generator = torch.Generator(device=self.device)
            # without a seed, draw one from torch's global generator (so torch.manual_seed applies)
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)
        return self

    def use_draft_vocab(self, cfg: GenerationConfig) -> None:
        """The draft vocabulary of cfg (or the model's own), its unembedding rows up to date."""
        ids = draft_vocab_of(cfg.draft_vocab, self.model)
        if ids is None:
            self.draft_vocab = None
            return
        if self.draft_vocab is None or self.draft_vocab.ids_list != tuple(ids):
            self.draft_vocab = DraftVocab(ids, self.model.config.vocab_size)
        self.draft_vocab.refresh(self.model)

    def kv_len(self, last_pos: int) -> int:
        """How much of the cache attention reads when the last position is last_pos."""
        if self.compiled:
            return self.max_len
        b = self.cfg.kv_bucket
        return min(self.max_len, b * math.ceil((last_pos + 1) / b))

    def start(self, prompts: Sequence[Sequence[int]], budgets: list[int]) -> None:
        """The state of a new generate() call: the prompts in seq, nothing committed yet."""
        self.seq.zero_()
        for b, p in enumerate(prompts):
            self.seq[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        self.lengths.copy_(torch.tensor([len(p) for p in prompts]))
        self.generated.zero_()
        self.budget.copy_(torch.tensor(budgets))
        self.active.fill_(True)
        self.accepted.zero_()
        self.row_steps.zero_()

    # ---- the forward pass -----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """One forward pass of the trunk and the heads the step needs, over tokens (B, T) at
        positions (B, T) -> the next-token head's hidden (B, T, D), and what parallel_drafts
        reads: the other heads' outputs (k - 1, B, T, D) or (stacked heads) their state."""
        model, cache = self.model, self.cache
        step = cache.at(positions, kv_len, slots, mask)  # slots, mask: a token tree's (mtp.decode.tree)
        outs = {TRUNK: model.trunk(tokens, cache)}
        if self.stacked is not None:
            return self.stacked.verify(outs[TRUNK], cache.stacked, step)  # the drafters run in parallel_drafts
        for i in self.run_order:
            outs[i] = model.run_head(i, outs[model.graph.parents[i]], cache=cache)
        if self.next_token_hidden is not None:
            idx = positions[:, :, None].expand(-1, -1, outs[0].shape[-1])
            self.next_token_hidden.scatter_(1, idx, outs[0])
        extra = None if self.sequential or self.k == 1 else torch.stack([outs[i] for i in range(1, self.k)])
        return outs[0], extra

    # ---- committing -----------------------------------------------------------------------
    def commit(self, new: torch.Tensor, n_new: torch.Tensor, eot_id: int | None) -> torch.Tensor:
        """Commit each row's first n_new (B,) tokens of new (B, k): at most its remaining budget,
        up to and including an end-of-text token, none for a row that has stopped. Updates the
        state in place -> the step's result for the host, packed (StepResult.pack)."""
        ar_k = torch.arange(new.shape[1], device=new.device)
        n_new = torch.minimum(n_new, self.budget - self.generated)
        hit_eot = torch.zeros_like(self.active)
        if eot_id is not None:
            is_eot = (new == eot_id) & (ar_k[None, :] < n_new[:, None])
            hit_eot = is_eot.any(1)
            n_new = torch.where(hit_eot, is_eot.int().argmax(1) + 1, n_new)
        n_new = torch.where(self.active, n_new, 0)
        rows = torch.arange(new.shape[0], device=new.device)[:, None]
        self.seq[rows, self.lengths[:, None] + ar_k] = new
        self.lengths.add_(n_new)
        self.generated.add_(n_new)
        stopped = self.active & (hit_eot | (self.generated >= self.budget))
        self.active.logical_and_(~stopped)
        return StepResult.pack(n_new, new, hit_eot, stopped)

    def count(self, n_accepted: torch.Tensor) -> None:
        """Statistics of a step that accepted n_accepted (B,) drafts per row (before its commit)."""
        self.row_steps.add_(self.active.sum())
        if self.k > 1:
            ar = torch.arange(self.k - 1, device=n_accepted.device)
            self.accepted.add_(((n_accepted[:, None] > ar) & self.active[:, None]).sum(0))

    def fed(self, drafts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What a step feeds: each row's last committed token followed by its drafts (B, k - 1;
        None where k = 1), (B, k), at the row's own positions (B, k)."""
        root = (self.lengths - 1)[:, None]  # (B, 1) each row's last committed position
        fed = self.seq.gather(1, root)
        if drafts is not None:
            fed = torch.cat([fed, drafts], 1)
        return fed, root + torch.arange(fed.shape[1], device=fed.device)

    # ---- the fused greedy step (parallel-type heads) --------------------------------------
    def greedy_step(self, fed: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """A whole greedy step of parallel-type heads in one function (one graph when compiled):
        fed (B, T) = each row's last token and its T - 1 drafts (the heads' k - 1, or a prompt
        lookup's: mtp.decode.lookup) -> the tokens to commit (B, T; the first n_accepted + 1 of
        each row), n_accepted (B,), and the heads' next drafts (B, k - 1; None where k = 1 or
        the heads are sequential: they draft before the step)."""
        h, extra = self.forward(fed, positions, kv_len)
        new, n_accepted = greedy_accept(self.model.logits(h).argmax(-1), fed[:, 1:])
        drafts = self.parallel_drafts(extra, n_accepted)[0] if self.k > 1 and not self.sequential else None
        return new, n_accepted, drafts

    def greedy_round(self, kv_len: int, eot_id: int | None) -> torch.Tensor:
        """A whole greedy decode step of parallel-type heads, one graph when compiled: feed each
        row's last token and its drafts, verify, draft again, commit -> commit()'s result."""
        new, n_accepted, drafts = self.greedy_step(*self.fed(self.drafts if self.k > 1 else None), kv_len)
        self.count(n_accepted)
        if drafts is not None:
            self.drafts.copy_(drafts)
        return self.commit(new, n_accepted + 1, eot_id)

    # ---- drafts ---------------------------------------------------------------------------
    def choose(self, logits: torch.Tensor):
        """Greedy: (argmax, None). Sampling: (a sample, the distribution it came from)."""
        if self.cfg.greedy:
            return logits.argmax(-1), None
        probs = process_logits(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        return sample(probs, self.generator), probs

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """A drafting head's logits (..., V) from its hidden output (..., D): over the draft
        vocabulary where there is one (-inf elsewhere), else the model's own."""
        if self.draft_vocab is None:
            return self.model.logits(hidden)
        return self.draft_vocab.logits(self.model, hidden)

    def parallel_drafts(self, extra, idx: torch.Tensor):
        """Drafts of heads 1..k-1 at index idx (B,) of the step: (B, k-1) tokens and proposals.
        extra is what forward returned for them: their outputs, or (stacked) their state."""
        tokens, probs = self.choose(self.head_logits(self.draft_hidden(extra, idx)))  # (k-1, B), (k-1, B, V)
        return tokens.T, (None if probs is None else probs.transpose(0, 1))

    def draft_hidden(self, extra, idx: torch.Tensor) -> torch.Tensor:
        """Heads 1..k-1's outputs (k-1, B, D) at index idx (B,) of the step (see parallel_drafts)."""
        if self.stacked is not None:
            return self.stacked.draft(extra, idx, self.cache.stacked)
        return extra[:, torch.arange(idx.shape[0], device=idx.device), idx]

    def sequential_drafts(self, seq: torch.Tensor, last: torch.Tensor, window: int, kv_len: int):
        """Sequential heads draft depth by depth at position `last` (B,), the last position the
        verifier has read; each depth re-runs a window of recent positions whose cache entries
        read tokens that were drafts when they were written. Drafts are written into seq."""
        model, hidden = self.model, self.next_token_hidden
        pos = (last[:, None] - window + 1 + torch.arange(window, device=last.device)).clamp(min=0)  # (B, w)
        self.cache.at(pos, kv_len)
        x = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, w, D)
        picks = []
        for i in range(1, self.k):
            x = model.run_head(i, x, cache=self.cache, future_tokens=seq.gather(1, pos + i))
            tok, probs = self.choose(self.head_logits(x[:, -1]))  # head i at `last` predicts last + 1 + i
            seq.scatter_(1, (last + 1 + i)[:, None], tok[:, None])
            picks.append((tok, probs))
        tokens = torch.stack([t for t, _ in picks], 1)  # (B, k-1)
        probs = None if self.cfg.greedy else torch.stack([p for _, p in picks], 1)  # (B, k-1, V)
        return tokens, probs
