"""Prompt-lookup drafts beside the heads' (greedy decoding).

Text often repeats what came before it: code repeats its names, calls and whole lines, answers
quote their question. Prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`,
llama.cpp's lookup decoding) drafts by search, not by a model: find the most recent earlier
occurrence of the row's last n tokens (n = `lookup_ngram` down to 2) in its prompt and output,
and propose the up to `lookup` tokens that followed it there. Such a draft can be much longer
than the heads' k - 1 tokens, and where the text repeats it is right for its whole length.

`LookupSteps` combines both: each step, a row whose last n-gram occurred before is fed that
continuation; any other row is fed its heads' drafts (none with k = 1: plain prompt lookup).
One forward pass verifies either, and the same greedy acceptance commits the longest matching
prefix plus the verifier's token. Parallel-type heads' next drafts come from that same pass;
sequential heads draft before a step, and only when some row found no lookup draft. Greedy
only: the output is plain greedy decoding's, token for token.

Eagerly a step feeds each batch exactly its longest draft; compiled, it feeds a fixed width (the
heads' k, or 1 + `lookup` for a lookup step: padded drafts are verified like any other and simply
rejected where wrong), so that at most two graphs are compiled.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from mtp.decode.decoder import Decoder

MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a longer verification


def lookup_draft(tokens: Sequence[int] | np.ndarray, max_tokens: int, max_ngram: int = 3,
                 min_ngram: int = MIN_NGRAM) -> list[int]:
    """The up to max_tokens tokens that followed the most recent earlier occurrence of the last
    n tokens of `tokens`, for the largest n in max_ngram..min_ngram that occurred before; [] if
    none did (or nothing followed it)."""
    a = np.asarray(tokens)
    n_tok = a.shape[0]
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = a[n_tok - n:]
        # occurrences starting at s <= n_tok - n - 1 end before the suffix starts or overlap it;
        # the continuation of the most recent one is the likeliest
        starts = np.flatnonzero(a[: n_tok - n] == suffix[0])
        for s in starts[::-1]:
            if np.array_equal(a[s:s + n], suffix):
                return a[s + n: s + n + max_tokens].tolist()
    return []


class LookupSteps:
    """The greedy decode steps of one generate() call with prompt-lookup drafts (see the module
    docstring): `start` after the prefill, then `advance` once per decode step. history(b) gives
    row b's tokens so far (its prompt and its committed output) on the host.

    Sequential heads draft depth by depth before the verification, from the last position the
    verifier has read, and only when some row has no lookup draft. Their caches then need every
    position since they last drafted re-run: the positions committed since, and the k - 2 before
    that read drafts (`Decoder.sequential_drafts`'s window)."""

    def __init__(self, dec: Decoder, history: Callable[[int], Sequence[int]], lookup: int, max_ngram: int,
                 prompt_window: int):
        if not dec.cfg.greedy:
            raise ValueError("lookup steps are greedy steps")
        self.dec, self.k = dec, dec.k
        self.history, self.lookup, self.max_ngram = history, lookup, max_ngram
        self.sequential = dec.sequential and dec.k > 1
        self.prompt_window = prompt_window  # the longest prompt: sequential heads' first drafts re-read it
        self.head_drafts: list[list[int]] | None = None  # each row's heads' drafts for this step
        self.drafted_at: list[int] | None = None  # sequential heads: each row's `last` when they last drafted

    def start(self, extra, last: torch.Tensor) -> None:
        if self.k > 1 and not self.sequential:  # parallel-type heads' first drafts, from the prefill
            self.head_drafts = self.dec.parallel_drafts(extra, last)[0].tolist()

    def drafts(self, longest: int) -> tuple[list[list[int]], bool]:
        """Each row's drafts for this step, and whether any row's came from the lookup."""
        dec = self.dec
        active = dec.active.tolist()
        histories = [self.history(b) for b in range(len(active))]
        found = [lookup_draft(h, self.lookup, self.max_ngram) if a else [] for h, a in zip(histories, active)]
        # sequential heads draft for the active rows the lookup left without a draft (a stopped row needs none)
        if self.sequential and (dec.compiled or any(a and not f for f, a in zip(found, active))):
            self.head_drafts = self.sequential_drafts([len(h) - 2 for h in histories], longest)
        out = [f if f else (self.head_drafts[b] if self.head_drafts is not None else [])
               for b, f in enumerate(found)]
        return out, any(found)

    def sequential_drafts(self, last: list[int], longest: int) -> list[list[int]]:
        """Sequential heads' drafts at each row's last read position `last`, over a window that
        re-runs every position their caches have not seen with final tokens."""
        dec, k = self.dec, self.k
        first = self.drafted_at is None
        if first:  # every position from 0: the prompt's, and those lookup steps committed before
            window = max(self.prompt_window, max(last) + 1)
        elif dec.compiled:  # one window for every step (one graph): the most a lookup step can commit
            window = self.lookup + 1 + k - 2
        else:
            window = max(l - d for l, d in zip(last, self.drafted_at)) + k - 2
        self.drafted_at = last
        draft = dec.sequential_drafts if first or not dec.compiled else dec.sequential_drafts_fn
        pos = torch.tensor(last, dtype=torch.long, device=dec.device)
        tokens, _ = draft(dec.seq, pos, max(window, 1), dec.kv_len(longest))
        return tokens.tolist()

    def advance(self, longest: int, eot_id: int | None) -> torch.Tensor:
        dec = self.dec
        rows, found = self.drafts(longest)
        if dec.compiled:  # a fixed width per kind of step: one graph each
            width = self.lookup if found else self.k - 1
        else:
            width = max(len(d) for d in rows)
        drafts = None
        if width > 0:  # pad every row to the width with its last token (a pad is verified, and rejected if wrong)
            pad = [d[:width] + [d[-1] if d else 0] * (width - len(d)) for d in rows]
            drafts = torch.tensor(pad, dtype=torch.long, device=dec.device)
        fed, positions = dec.fed(drafts)
        new, n_accepted, head_drafts = dec.greedy_step_fn(fed, positions, dec.kv_len(longest + width - 1))
        if head_drafts is not None:
            self.head_drafts = head_drafts.tolist()
        dec.count(n_accepted)
        return dec.commit(new, n_accepted + 1, eot_id)
