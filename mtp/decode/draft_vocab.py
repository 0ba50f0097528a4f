"""A draft vocabulary: the heads draft among the tokens a corpus uses most (FR-Spec's idea).

When drafting, each head's unembedding is a (V, D) matrix-vector product over the whole
vocabulary: for SmolLM2-135M, 49152 x 576 float32 (113 MB) per head per step, a fifth of what a
greedy step reads, so three drafting heads cost more than the step they speed up. Most of the
vocabulary is never the verifier's pick on a given kind of text: restricting the *drafts* to the
N most frequent tokens of the training corpus shrinks that product by V / N and changes nothing
about the output. The verifier keeps the full vocabulary, so greedy output stays token for token
greedy's, and sampling stays exact (a draft distribution that is zero outside the draft
vocabulary is still a proposal distribution of the acceptance rule). What it can cost is
acceptance, where the verifier picks a token outside the draft vocabulary.

`frequent_tokens(tokens, n)` picks the ids (`checkpoint_draft_vocab` from a checkpoint's corpus); `GenerationConfig.draft_vocab` takes them
(by default the model's own, `ModelConfig.draft_vocab`, where its heads were trained over one);
`DraftVocab` holds the restricted unembedding for a decoder and gives full-vocabulary logits,
-inf outside the draft vocabulary, so that every acceptance rule and the token tree use them
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtp.config import draft_vocab_problem
from mtp.decode import rowdot
from mtp.decode.packed import kernel_of
from mtp.errors import MTPError


def frequent_tokens(tokens: np.ndarray | Sequence[int], n: int, vocab_size: int) -> list[int]:
    """The n most frequent token ids of `tokens` (ties: the lower id first), sorted by id. Fewer
    when fewer distinct tokens occur."""
    if n < 1:
        raise MTPError(f"a draft vocabulary needs at least 1 token, got {n}")
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # most frequent first, then by id
    picked = order[: min(n, int((counts > 0).sum()))]
    return sorted(int(i) for i in picked)


def corpus_draft_vocab(corpus: Sequence[str], tokenizer, n: int, vocab_size: int, val_fraction: float = 0.005,
                       progress: bool = False, max_tokens: int = 4_000_000) -> list[int]:
    """frequent_tokens over (the first max_tokens of) a corpus's training split, tokenised and
    cached as training does (mtp.data.build_token_data)."""
    from mtp.data import build_token_data, default_cache_dir

    data = build_token_data(corpus, tokenizer, default_cache_dir(), val_fraction, progress=progress)
    return frequent_tokens(np.asarray(data.train[:max_tokens]), n, vocab_size)


def checkpoint_draft_vocab(meta: dict, tokenizer, n: int, vocab_size: int, corpus: Sequence[str] | None = None,
                           progress: bool = False) -> list[int]:
    """corpus_draft_vocab for a loaded checkpoint (`meta` from load_checkpoint): over `corpus`, by
    default the checkpoint's training corpus (the standard library where it names none), split as
    its training split it."""
    train = meta.get("train") or {}
    return corpus_draft_vocab(corpus or train.get("corpus") or ["stdlib"], tokenizer, n, vocab_size,
                              train.get("val_fraction", 0.005), progress=progress)


def draft_vocab_of(ids: Sequence[int] | None, model) -> Sequence[int] | None:
    """The draft vocabulary a decoding call uses: its own `ids` (GenerationConfig.draft_vocab),
    else the one the model's heads were trained over (ModelConfig.draft_vocab), else None."""
    return ids if ids is not None else model.config.draft_vocab


def check_draft_vocab(ids: Sequence[int], vocab_size: int) -> None:
    if problem := draft_vocab_problem(ids, vocab_size):
        raise MTPError(f"the draft vocabulary {problem}")


class DraftVocab:
    """The unembedding restricted to the draft vocabulary, for a decoder: rebuilt when the
    model's output weight changes (its tensor or its in-place version). Bad ids are refused here,
    the one place every decoder (generate's, the serving engine's) builds it."""

    def __init__(self, ids: Sequence[int], vocab_size: int):
        check_draft_vocab(ids, vocab_size)
        self.ids_list = tuple(int(i) for i in ids)
        self.ids: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self._of: tuple | None = None

    @torch.no_grad()
    def refresh(self, model) -> None:
        """Copy the draft vocabulary's rows of the model's unembedding in if it changed. The
        tensors keep their storage where they can: a compiled step reads them as static (frozen
        into a CPU graph's constants, by address in a CUDA graph; `static_tensors`)."""
        w = model.output.weight
        key = (id(w), w._version, w.device, w.dtype)
        if key == self._of:
            return
        ids = torch.tensor(self.ids_list, dtype=torch.long, device=w.device)
        rows = w.detach().index_select(0, ids)  # (N, D)
        if self.weight is not None and self.weight.shape == rows.shape and self.weight.dtype == rows.dtype \
                and self.weight.device == rows.device:
            self.weight.copy_(rows)
        else:
            self.ids, self.weight = ids, rows.contiguous()
        self._of = key

    def static_tensors(self) -> list[torch.Tensor]:
        """What a compiled step may take as constants: the ids and the restricted unembedding."""
        return [self.ids, self.weight]

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The heads' logits over the full vocabulary (..., V) from hidden (..., D): the draft
        vocabulary's from one (N, D) product, -inf elsewhere."""
        x = model.norm(hidden)
        # the kernel the unembedding itself computes with at this many rows (mtp.decode.packed)
        if kernel_of(model.output, x.numel() // x.shape[-1]) == "rowdot":
            small = rowdot.rowdot(x, self.weight)
        else:
            small = F.linear(x, self.weight)  # (..., N)
        full = small.new_full((*small.shape[:-1], model.config.vocab_size), float("-inf"))
        return full.index_copy_(full.dim() - 1, self.ids, small)
