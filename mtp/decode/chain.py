"""Chain steps: one draft per head, k - 1 drafts per row, verified in one forward pass.

`ChainSteps` is the decode step generate() runs when no token tree is asked for (the tree's is
`mtp.decode.tree.TreeSteps`; both have `start` after the prefill and `advance` once per step):

- greedy with parallel-type heads: the whole step is one function, `Decoder.greedy_round`
  (forward, acceptance, next drafts, commit; one graph when compiled);
- otherwise (sampling, sequential heads) the step in parts: sequential heads draft first, from
  the position the verifier last accepted; then verify (each row's last committed token and its
  drafts, at its own positions), accept (`mtp.decode.sampling.accept`), draft again from the
  same pass (parallel-type heads), commit.
"""

from __future__ import annotations

import torch

from mtp.decode.decoder import Decoder
from mtp.decode.sampling import accept


class ChainSteps:
    """The chain steps of one generate() call over a Decoder whose prompts are in place:
    `start` after the prefill, then `advance` once per decode step."""

    def __init__(self, dec: Decoder, prompt_window: int):
        self.dec, self.k = dec, dec.k
        self.fused = dec.cfg.greedy and not dec.sequential  # one function per step
        self.prompt_window = prompt_window  # the longest prompt: sequential heads' first drafts re-read it
        self.drafts = self.proposals = None  # (B, k - 1) the next step's drafts; their q (B, k - 1, V) when sampling
        self.last = None  # (B,) the last position the verifier has read: where the next drafts are made

    def start(self, extra, last: torch.Tensor) -> None:
        """The first drafts, from the prefill's heads' outputs at each row's last prompt position
        last (B,) (sequential heads draft at the first step instead)."""
        dec = self.dec
        self.last = last
        if self.k > 1 and not dec.sequential:
            self.drafts, self.proposals = dec.parallel_drafts(extra, last)
            dec.drafts.copy_(self.drafts)

    def advance(self, longest: int, eot_id: int | None) -> torch.Tensor:
        """One decode step of every row; longest: an upper bound of the rows' committed lengths
        (it sizes the attention window) -> commit()'s result for the host, packed."""
        dec, k = self.dec, self.k
        kv_len = dec.kv_len(longest + k - 2)
        if self.fused:
            return dec.greedy_round_fn(kv_len, eot_id)
        if k > 1 and dec.sequential:  # draft: the window ends at last = lengths - 2 <= longest
            first = self.drafts is None
            window = self.prompt_window if first else 2 * k - 2  # re-run what read drafts last time
            draft = dec.sequential_drafts if first else dec.sequential_drafts_fn
            self.drafts, self.proposals = draft(dec.seq, self.last, window, dec.kv_len(longest))
        # verify: each row's last committed token and its k - 1 drafts, at its own positions
        h, extra = dec.forward_fn(*dec.fed(self.drafts if k > 1 else None), kv_len)
        new, n_accepted = accept(dec, dec.model.logits(h), self.drafts, self.proposals)
        if k > 1 and not dec.sequential:  # the next drafts, from the position just accepted
            self.drafts, self.proposals = dec.parallel_drafts(extra, n_accepted)
        dec.count(n_accepted)
        self.last = dec.lengths - 1 + n_accepted
        return dec.commit(new, n_accepted + 1, eot_id)
