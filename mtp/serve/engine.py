"""The serving engine: continuous batching with self-speculative decoding over one pool of rows.

One thread owns the model. It keeps a fixed pool of `max_batch` decoding rows (one static
`ModelCache` for all of them) and runs the requests that hold a row as one ragged batch: each row
has its own prompt length, positions and accepted length per step, exactly as in
`mtp.generate.generate`. The rows in use are always the leading ones, 0..n-1, so a step runs on
views of the first n rows of every cache (no copy, no padding, and no work for idle rows):

- a joining request is prefilled alone into row n (a one-row view), which gives its first token
  and its first drafts; from the next step on it decodes with the others;
- a request that finishes, or whose client went away, leaves between two steps: the last row in
  use moves into its row (one row's cache entries and state copied), so the rows in use stay 0..n-1.

Each row's decoding state (its tokens, length, budget, drafts) lives in the pool decoder's
buffers, and a step runs on a decoder whose buffers are views of the first n rows: when every
row decodes greedily the step is the decoder's fused `greedy_round` (verify, accept, draft,
commit in one function, as `generate` runs it), else the same step in parts with each sampled
row's acceptance and drafts from its own generator. The host reads each step once
(`StepResult`) and applies stop strings and streams the text.

The parallel heads' shared cache (`mtp.decode.stacked`: head h's rows at h * B .. h * B + B - 1) cannot
be viewed as "the first n rows of every head" for every n at once, so it is kept laid out for the
current n and re-laid (the used positions of the rows in use copied) when n changes. A hook in
mtp.decode.stacked that read that cache as (heads, rows, ...) would make this a view too.

What is guaranteed: a greedy request's tokens are the ones `generate` gives for its prompt alone
(the same forward pass per row, the same acceptance and drafts; rows never read each other's cache
entries); a sampled request draws from its own generator (seeded by its `seed`, else at random) in
the same order as `generate` does for one prompt, so with a seed its output is reproducible and
equals `mtp generate --seed S` for that prompt, whatever else is running. Both hold up to floating
point: a row's products computed in a batch of n may round differently from the same row alone
(tested equal on float32 CPU models; a near-tie of two logits could still break differently).

Everything this module takes from the decoder's internals (`Decoder`'s buffers, `ModelCache`'s
fields) is used here and nowhere else in mtp.serve.
"""

from __future__ import annotations

import copy
import itertools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from mtp.errors import MTPError
from mtp.decode.cache import KVCache, ModelCache
from mtp.decode.decoder import Decoder, StepResult
from mtp.decode.packed import packing
from mtp.decode.sampling import accept, greedy_accept, process_logits, sample
from mtp.decode.stops import cut_at_stop, hit_stop, strip_stop
from mtp.generate import GenerationConfig, resolve_k
from mtp.model import MTPTransformer


# ---- what the API layer hands in and gets back ----------------------------------------------
@dataclass
class Request:
    """One completion to decode. `emit` is called from the engine's thread with each Event."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[["Event"], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    id: str = ""
    cancelled: bool = False  # set by Engine.cancel (any thread); the row is freed before the next step
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class Event:
    """`delta`: new text (and how many tokens it came from); `done`: the request finished
    (finish: "stop" or "length"; the final text is the concatenation of the deltas); `error`."""

    kind: str
    text: str = ""
    n_tokens: int = 0
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


class _Row:
    """A request holding a row, as the host sees it: its committed length, new tokens, the
    proposal distributions of its drafts (sampling), its generator. The row's device state
    (tokens, length, budget, drafts) lives in the pool decoder's buffers, at its row index."""

    def __init__(self, req: Request, budget: int, k: int, device):
        self.req, self.budget = req, budget
        self.L = len(req.prompt)  # committed tokens (prompt and new)
        self.tokens: list[int] = []  # new tokens
        self.qs: torch.Tensor | None = None  # its drafts' proposal distributions (sampling), (1, k - 1, V)
        self.reason: str | None = None  # "eot", "stop", "length", "context"
        self.sent = ""  # text emitted so far
        self.cfg = GenerationConfig(max_new_tokens=max(budget, 1), temperature=req.temperature, top_k=req.top_k,
                                    top_p=req.top_p, speculative=k)
        self.generator = None
        if not self.cfg.greedy:
            self.generator = torch.Generator(device=device)
            # as generate(): without a seed, one drawn from torch's global generator
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)


def _choose(row: _Row, logits: torch.Tensor):
    """As Decoder.choose, with this row's settings and generator."""
    if row.cfg.greedy:
        return logits.argmax(-1), None
    probs = process_logits(logits, row.cfg.temperature, row.cfg.top_k, row.cfg.top_p)
    return sample(probs, row.generator), probs


# ---- views of the pool's caches ---------------------------------------------------------------
def _kv(k: torch.Tensor, v: torch.Tensor) -> KVCache:
    """A KVCache over given (viewed) key and value tensors (as KVCache.rows_of builds one)."""
    cache = KVCache.__new__(KVCache)
    nn.Module.__init__(cache)
    cache.register_buffer("k", k, persistent=False)
    cache.register_buffer("v", v, persistent=False)
    return cache


class _CacheView:
    """What the model's cached forward pass reads of a ModelCache (`trunk`, `heads`, `step`,
    `at`), over some rows of the pool's caches."""

    at = ModelCache.at  # positions, rotary tables and mask of the next call, as ModelCache sets them

    def __init__(self, pool: ModelCache, start: int, count: int, stacked: KVCache | None, n_stacked: int):
        self.rope_cos, self.rope_sin, self.max_len = pool.rope_cos, pool.rope_sin, pool.max_len
        self.batch, self.step, self.stacked = count, None, stacked
        self.trunk = [KVCache.rows_of(c, start, count) for c in pool.trunk]
        self.heads = []
        for i, c in enumerate(pool.heads):
            if i < n_stacked:
                self.heads.append(KVCache.rows_of(stacked, i * count, count))
            elif isinstance(c, KVCache):
                self.heads.append(KVCache.rows_of(c, start, count))
            else:
                self.heads.append(c)


# the pool decoder's per-row state (Decoder.state_buffers less the statistics): a view decoder
# reads rows of them, and a row that moves takes its entries along
_ROW_STATE = ("seq", "lengths", "generated", "budget", "active", "drafts")


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    """Continuous batching over `max_batch` rows; `submit` from any thread, results via `emit`."""

    def __init__(self, model: MTPTransformer, tokenizer, *, speculative: int | None = None, max_batch: int = 16,
                 max_context: int | None = None, kv_bucket: int = 128, pack_weights: bool | None = None,
                 draft_vocab: Sequence[int] | None = None):
        if max_batch < 1:
            raise MTPError(f"--max-batch must be at least 1, got {max_batch}")
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.k = resolve_k(model, speculative)
        ctx = model.config.max_seq_len
        if max_context is not None and not 2 <= max_context:
            raise MTPError(f"--max-context must be at least 2, got {max_context}")
        self.context = min(ctx, max_context or ctx)
        self.max_batch = max_batch
        self.eot_id = getattr(tokenizer, "eot_id", None)
        cfg = GenerationConfig(speculative=self.k, kv_bucket=kv_bucket, draft_vocab=draft_vocab)
        cfg.validate()
        # the pool: one decoder of max_batch rows, room for the last step's drafts past the context
        self.dec = Decoder(model, self.k, max_batch, self.context + self.k, cfg).reset(cfg)
        if self.dec.sequential and self.k > 1:
            raise MTPError("mtp serve: speculative decoding with sequential heads is not supported yet; "
                           "use --speculative 1")
        self.pool: ModelCache = self.dec.cache
        self.n_stacked = self.k if self.pool.stacked is not None else 0
        # caches indexed by row directly (the trunk's and the heads' own), moved row by row
        used_heads = range(self.k) if self.n_stacked else self.dec.run_order
        self._row_caches = [*self.pool.trunk,
                            *(self.pool.heads[i] for i in used_heads
                              if i >= self.n_stacked and isinstance(self.pool.heads[i], KVCache))]
        self.device = self.dec.device
        self.packing = packing(model, pack_weights)  # entered by the loop; refuses `on` here, where it cannot apply
        self._views: dict[int, Decoder] = {}
        self.layout = 0  # the stacked cache is laid out for this many rows
        self.rows: list[_Row] = []
        self.pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        # statistics (read by /metrics from another thread: plain numbers)
        self.requests_done = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.forward_passes = 0  # prefills and decode steps
        self.row_steps = 0  # rows in decode steps
        self.step_tokens = 0  # tokens committed by decode steps (tokens per forward: / row_steps)
        self.accepted = [0] * max(self.k - 1, 0)  # drafts committed from head 2..k, over row_steps
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, generated_tokens)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtp-serve-engine", daemon=True)
            self._thread.start()
            self.ready.wait()
        return self

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """MTPError (a 400 for the API) for a prompt this server cannot decode."""
        if len(prompt) == 0:
            raise MTPError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context:
            raise MTPError(f"the prompt has {len(prompt)} tokens, which leaves no room in this model's context "
                           f"of {self.context} tokens")
        if min(prompt) < 0 or max(prompt) >= self.model.config.vocab_size:
            raise MTPError(f"the prompt has token ids outside the model's vocabulary of {self.model.config.vocab_size}")

    def submit(self, req: Request) -> None:
        self.check_prompt(req.prompt)
        if req.max_tokens < 1:
            raise MTPError(f"max_tokens must be at least 1, got {req.max_tokens}")
        with self._cv:
            if self._closing:
                raise MTPError("the server is shutting down")
            self.pending.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: drop the request (its row is freed before the next step)."""
        req.cancelled = True
        with self._cv:
            try:
                self.pending.remove(req)
                self.requests_done["cancelled"] += 1
            except ValueError:  # already decoding (or done): the loop drops it
                pass
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        return len(self.pending)

    @property
    def running(self) -> int:
        return len(self.rows)

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if not recent:
            return 0.0
        t0, n0 = recent[0]
        return (self.generated_tokens - n0) / max(now - t0, 1e-3) if now - t0 > 0.05 else 0.0

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad(), self.packing:
            self.ready.set()
            while True:
                with self._cv:
                    while not self._closing and not self.rows and not self.pending:
                        self._cv.wait()
                    if self._closing:
                        break
                    joining = []
                    while self.pending and len(self.rows) + len(joining) < self.max_batch:
                        joining.append(self.pending.popleft())
                try:
                    self._leave([i for i, r in enumerate(self.rows) if r.req.cancelled], cancelled=True)
                    for req in joining:
                        if req.cancelled:
                            self.requests_done["cancelled"] += 1
                        else:
                            self._join(req)
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug must not kill the server: fail what was running
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all(joining, f"internal error while decoding: {type(e).__name__}: {e}")
        self._fail_all([], "the server is shutting down")

    def _fail_all(self, joining: list[Request], message: str) -> None:
        reqs = [r.req for r in self.rows] + [r for r in joining if not any(r is x.req for x in self.rows)]
        with self._cv:
            if self._closing:
                reqs += list(self.pending)
                self.pending.clear()
        for req in reqs:
            self.requests_done["error"] += 1
            _safe_emit(req, Event("error", message=message))
        self.rows, self.layout = [], 0

    # -- rows joining and leaving -------------------------------------------------------------
    def _decoder(self, start: int, count: int, stacked: KVCache | None) -> Decoder:
        """A decoder over rows start..start+count-1 of the pool: views of its caches and of its
        rows' state (so its steps update the pool in place)."""
        vd = copy.copy(self.dec)
        vd.cache = _CacheView(self.pool, start, count, stacked, self.n_stacked)
        for name in _ROW_STATE:
            setattr(vd, name, getattr(self.dec, name)[start : start + count])
        return vd

    def _view(self, n: int) -> Decoder:
        """A decoder over rows 0..n-1 (the stacked cache laid out for n rows)."""
        if n not in self._views:
            self._views[n] = self._decoder(0, n, self._stacked_rows(n))
        return self._views[n]

    def _stacked_rows(self, n: int, row: int | None = None) -> KVCache | None:
        """The stacked cache laid out for n rows (as StackedHeads reads a cache of n rows), or
        only row `row` of each head (a strided view)."""
        st = self.pool.stacked
        if st is None:
            return None
        H = self.n_stacked
        if row is None:
            return KVCache.rows_of(st, 0, H * n)
        k, v = (t[: H * n].view(H, n, *t.shape[1:])[:, row] for t in (st.k, st.v))
        return _kv(k, v)

    def _relayout(self, order: list[int], n_new: int) -> None:
        """Rows 0..len(order)-1 take the entries of rows `order` (old indices); the stacked cache
        goes from the layout for self.layout rows to the layout for n_new."""
        used = min(self.pool.max_len, max((self.rows[i].L + self.k for i in order), default=0))
        st, n_old, m = self.pool.stacked, self.layout, len(order)
        if st is not None and m and used and (n_old != n_new or order != list(range(m))):
            H = self.n_stacked
            for t in (st.k, st.v):
                kept = t[: H * n_old].view(H, n_old, *t.shape[1:])[:, order, :, :used]  # a copy
                t[: H * n_new].view(H, n_new, *t.shape[1:])[:, :m, :, :used] = kept
        moves = [(dst, src) for dst, src in enumerate(order) if dst != src]
        if moves and used:
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            for c in self._row_caches:
                c.k[dst, :, :used] = c.k[src, :, :used]
                c.v[dst, :, :used] = c.v[src, :, :used]
            for name in _ROW_STATE:
                t = getattr(self.dec, name)
                t[dst] = t[src]
        self.layout = n_new

    def _join(self, req: Request) -> None:
        """Prefill a request alone into row n; commit its first token; draft."""
        n, model, dev, k = len(self.rows), self.model, self.device, self.k
        self._relayout(list(range(n)), n + 1)
        vd = self._decoder(n, 1, self._stacked_rows(n + 1, n))
        row = _Row(req, min(req.max_tokens, self.context - len(req.prompt)), k, dev)
        self.rows.append(row)
        self.prompt_tokens += len(req.prompt)
        vd.start([req.prompt], [row.budget])
        T0 = len(req.prompt)
        h, extra = vd.forward(vd.seq[:, :T0], torch.arange(T0, device=dev)[None], self.dec.kv_len(T0 - 1))
        self.forward_passes += 1
        first, _ = _choose(row, model.logits(h[:, T0 - 1]))  # (1,)
        if k > 1:
            vd.drafts.copy_(self._drafts(vd, extra, torch.tensor([T0 - 1], device=dev), [row]))
        result = vd.commit(first[:, None].expand(1, k), torch.ones(1, dtype=torch.long, device=dev), self.eot_id)
        self._read(StepResult.read(result), [row], counted=False)
        if row.reason is not None:
            self._leave([n])

    def _leave(self, idx: list[int], cancelled: bool = False) -> None:
        """Rows idx leave; the last rows move into their places."""
        if not idx:
            return
        order = list(range(len(self.rows)))
        for j in sorted(set(idx), reverse=True):
            order[j] = order[-1]
            order.pop()
        if cancelled:
            self.requests_done["cancelled"] += len(set(idx))
        self._relayout(order, len(order))
        self.rows = [self.rows[i] for i in order]

    # -- a decode step ------------------------------------------------------------------------
    def _drafts(self, vd: Decoder, extra, idx: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Heads 2..k's drafts (B, k - 1) at index idx (B,) of the last forward pass: argmax for
        greedy rows; a sampled row draws from its own generator and keeps the proposals in qs."""
        logits = vd.head_logits(vd.draft_hidden(extra, idx))  # (k - 1, B, V), over the draft vocabulary if any
        tokens = logits.argmax(-1).T  # (B, k - 1)
        for i, r in enumerate(rows):
            if not r.cfg.greedy:
                tok, probs = _choose(r, logits[:, i : i + 1])  # (k - 1, 1), (k - 1, 1, V)
                tokens[i] = tok[:, 0]
                r.qs = probs.transpose(0, 1)
        return tokens

    def _step(self) -> None:
        """One decode step of every row: the decoder's fused greedy round when all rows decode
        greedily (one function, as generate's), else the step in parts with each sampled row's
        acceptance and drafts drawn from its own generator."""
        rows, k = self.rows, self.k
        vd = self._view(len(rows))
        kv_len = self.dec.kv_len(max(r.L for r in rows) + k - 2)
        if all(r.cfg.greedy for r in rows):
            result = vd.greedy_round(kv_len, self.eot_id)  # (the *_fn fields are the pool decoder's)
        else:
            drafts = vd.drafts if k > 1 else None
            h, extra = vd.forward(*vd.fed(drafts), kv_len)
            logits = self.model.logits(h)  # (n, k, V)
            new, a = greedy_accept(logits.argmax(-1), drafts)
            for i, r in enumerate(rows):
                if not r.cfg.greedy:  # speculative sampling, as generate's, with the row's own generator
                    ni, ai = accept(r, logits[i : i + 1], None if drafts is None else drafts[i : i + 1], r.qs)
                    new[i], a[i] = ni[0], ai[0]
            if k > 1:
                next_drafts = self._drafts(vd, extra, a, rows)
                vd.drafts.copy_(next_drafts)
            result = vd.commit(new, a + 1, self.eot_id)
        self._read(StepResult.read(result), rows, counted=True)
        self._leave([i for i, r in enumerate(rows) if r.reason is not None])
        self._recent.append((time.perf_counter(), self.generated_tokens))

    def _read(self, step: StepResult, rows: list[_Row], counted: bool) -> None:
        """The host's side of a step (as generate's): each row's committed tokens (its budget and
        end of text applied on the device), then stop strings; emits the new text. counted: a
        decode step (its tokens and committed drafts go into the statistics)."""
        for r, toks, eot, stopped in zip(rows, step.tokens, step.hit_eot, step.stopped):
            before = len(r.tokens)
            r.tokens.extend(toks)
            r.L += len(toks)
            if stopped:
                r.reason = "eot" if eot else ("length" if r.budget == r.req.max_tokens else "context")
            stop = r.req.stop
            if stop and toks and r.reason != "eot" and hit_stop(r.tokens, self.tokenizer, stop):
                r.tokens = cut_at_stop(r.tokens, before, self.tokenizer, stop)
                r.reason = "stop"  # the row leaves after this step
            if counted:
                self.row_steps += 1
                self.step_tokens += len(toks)
                for j in range(len(toks) - 1):
                    self.accepted[j] += 1
            self.generated_tokens += len(r.tokens) - before
            self._emit_text(r, len(r.tokens) - before)

    def _emit_text(self, row: _Row, n_tokens: int) -> None:
        text = self.tokenizer.decode(row.tokens)
        if row.reason is not None:
            final = strip_stop(text, row.req.stop)
            delta = final[len(row.sent):] if final.startswith(row.sent) else ""
            if delta or n_tokens:
                _safe_emit(row.req, Event("delta", text=delta, n_tokens=n_tokens))
            finish = "length" if row.reason in ("length", "context") else "stop"
            self.requests_done[finish] += 1
            _safe_emit(row.req, Event("done", finish=finish, prompt_tokens=len(row.req.prompt),
                                      completion_tokens=len(row.tokens)))
            return
        safe = _safe_prefix(text, row.req.stop)
        if safe.startswith(row.sent) and len(safe) > len(row.sent):
            _safe_emit(row.req, Event("delta", text=safe[len(row.sent):], n_tokens=n_tokens))
            row.sent = safe


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """What of a running row's text can be sent: not a trailing incomplete character (U+FFFD
    from a partial UTF-8 sequence) nor a tail that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for m in range(min(len(s) - 1, end), 0, -1):
            if text[end - m : end] == s[:m]:
                hold = max(hold, m)
                break
    return text[: end - hold]


def _safe_emit(req: Request, ev: Event) -> None:
    try:
        req.emit(ev)
    except Exception:  # the client's event loop is gone: nothing to tell
        pass


_ids = itertools.count()


def next_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04x}"


__all__ = ["Engine", "Event", "Request", "next_id"]
