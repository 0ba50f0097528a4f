"""Prompt-lookup drafts beside the heads' (greedy decoding).

Text often repeats what came before it: code repeats its names, calls and whole lines, answers
quote their question. Prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`,
llama.cpp's lookup decoding) drafts by search, not by a model: find the most recent earlier
occurrence of the row's last n tokens (n = `lookup_ngram` down to 2) in its prompt and output,
and propose the up to `lookup` tokens that followed it there. Such a draft can be much longer
than the heads' k - 1 tokens, and where the text repeats it is right for its whole length.

`LookupSteps` combines both: each step, a row whose last n-gram occurred before is fed that
continuation; any other row is fed its heads' drafts from the previous step (none with k = 1:
plain prompt lookup). One forward pass verifies either, the same greedy acceptance commits the
longest matching prefix plus the verifier's token, and the same pass leaves the heads' next
drafts. Greedy only: the output is plain greedy decoding's, token for token.

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
    row b's tokens so far (its prompt and its committed output) on the host."""

    def __init__(self, dec: Decoder, history: Callable[[int], Sequence[int]], lookup: int, max_ngram: int):
        if not dec.cfg.greedy or dec.sequential:
            raise ValueError("lookup steps are greedy steps of parallel-type heads")
        self.dec, self.k = dec, dec.k
        self.history, self.lookup, self.max_ngram = history, lookup, max_ngram
        self.head_drafts: list[list[int]] | None = None  # each row's heads' drafts from the last pass
        self.lookup_steps = 0  # row-steps fed a lookup draft (the others: the heads' drafts, or none)

    def start(self, extra, last: torch.Tensor) -> None:
        if self.k > 1:
            self.head_drafts = self.dec.parallel_drafts(extra, last)[0].tolist()

    def drafts(self) -> tuple[list[list[int]], bool]:
        """Each row's drafts for this step, and whether any row's came from the lookup."""
        dec, out, found = self.dec, [], False
        active = dec.active.tolist()
        for b in range(len(active)):
            d = lookup_draft(self.history(b), self.lookup, self.max_ngram) if active[b] else []
            if d:
                found = True
                self.lookup_steps += 1
            elif self.head_drafts is not None:
                d = self.head_drafts[b]
            out.append(d)
        return out, found

    def advance(self, longest: int, eot_id: int | None) -> torch.Tensor:
        dec = self.dec
        rows, found = self.drafts()
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
