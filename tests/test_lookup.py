"""Prompt-lookup drafts (mtp.decode.lookup): the search itself, and decoding with them is plain
greedy decoding token for token (alone, beside the heads, ragged batches, end-of-text, compiled)."""

from __future__ import annotations

import pytest
import torch

from mtp.decode.lookup import lookup_draft
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate
from tests.test_generate import RAGGED, prompts_for, reference_greedy, trained, trained_copy


def test_lookup_draft_finds_the_most_recent_longest_match():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    toks = [5, 6, 7, 1, 2, 9, 6, 7, 3, 4, 6, 7]
    # the last 2-gram (6, 7) occurred at 1 and 6: the most recent (6) is followed by 3, 4, 6, 7
    assert lookup_draft(toks, 3) == [3, 4, 6]
    assert lookup_draft(toks, 10) == [3, 4, 6, 7]
    # a longer n-gram wins over a more recent shorter one: (5, 6, 7) ... -> 1, 2
    toks = [5, 6, 7, 1, 2, 8, 6, 7, 0, 5, 6, 7]
    assert lookup_draft(toks, 2, max_ngram=3) == [1, 2]
    assert lookup_draft(toks, 2, max_ngram=2) == [0, 5]
    # no earlier occurrence of the last 2 tokens: nothing (a single repeated token is not enough)
    assert lookup_draft([1, 2, 3, 4, 3], 4) == []
    assert lookup_draft([1, 3, 1, 3], 4) == [1, 3]  # overlapping occurrences are fine
    assert lookup_draft([7, 7, 7], 5) == [7]
    assert lookup_draft([4], 3) == [] and lookup_draft([], 3) == []
    assert lookup_draft(torch.tensor([1, 2, 9, 1, 2]).numpy(), 1) == [9]


def test_lookup_decoding_is_plain_greedy():
    """k = 1 (plain prompt lookup) and k = 4 (lookup beside the heads), ragged batch: the tokens of
    greedy decoding, in fewer forward passes (the markov text repeats, so lookups hit)."""
    model = trained("parallel")
    prompts = prompts_for(RAGGED) + [prompts_for([20], seed=3)[0]]
    refs = [reference_greedy(model, p, 24) for p in prompts]
    for k in (1, 4):
        for lookup in (1, 5):
            out = generate(model, prompts, GenerationConfig(max_new_tokens=24, speculative=k, lookup=lookup))
            assert out.tokens == refs, (k, lookup)
            assert out.stats.forward_passes < 24, (k, lookup)  # a step committed several tokens
    single = [generate(model, [p], GenerationConfig(max_new_tokens=24, speculative=4, lookup=6)).tokens[0]
              for p in prompts]
    assert single == refs
    # more than plain chain steps commit per forward here: the lookup drafted past the heads' k - 1
    chain = generate(model, prompts[-1:], GenerationConfig(max_new_tokens=24, speculative=4))
    both = generate(model, prompts[-1:], GenerationConfig(max_new_tokens=24, speculative=4, lookup=8))
    assert both.stats.forward_passes < chain.stats.forward_passes


def test_lookup_stops_at_end_of_text_and_budget():
    model = trained("parallel")
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 24) for p in prompts]
    eot = refs[0][5]  # a token the first row produces early
    out = generate(model, prompts, GenerationConfig(max_new_tokens=24, speculative=3, lookup=6, eot_id=eot))
    for toks, ref, why in zip(out.tokens, refs, out.stop_reasons):
        cut = ref[: ref.index(eot) + 1] if eot in ref else ref
        assert toks == cut and why == ("eot" if eot in ref else "length")
    for n in (1, 2, 7):
        assert generate(model, prompts, GenerationConfig(max_new_tokens=n, speculative=3, lookup=6)).tokens == \
            [r[:n] for r in refs]


def test_lookup_wrong_drafts_are_rejected(monkeypatch):
    """Drafts that are always wrong (every lookup returns tokens the model never picks next) leave
    the output as it was: the verifier decides, not the lookup."""
    import mtp.decode.lookup as lk

    model = trained("parallel")
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 16) for p in prompts]
    monkeypatch.setattr(lk, "lookup_draft", lambda toks, n, *a, **kw: [(int(toks[-1]) + 1) % 32] * n)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=1, lookup=4))
    assert out.tokens == refs


def test_compiled_lookup_equals_eager():
    model = trained_copy("parallel")  # keeps compiled decoders
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 20) for p in prompts]
    cfg = dict(max_new_tokens=20, speculative=3, lookup=5)
    eager = generate(model, prompts, GenerationConfig(**cfg))
    comp = generate(model, prompts, GenerationConfig(**cfg, compile=True))
    assert eager.tokens == comp.tokens == refs
    assert comp.stats.forward_passes < 20


def test_lookup_refuses_what_it_cannot_do():
    model = trained("parallel")
    p = prompts_for([4])
    for cfg, needle in [(dict(lookup=-1), "at least 0"), (dict(lookup=3, lookup_ngram=1), "lookup-ngram"),
                        (dict(lookup=3, temperature=0.7), "greedy"), (dict(lookup=3, tree="0;1"), "--tree")]:
        with pytest.raises(MTPError, match=needle):
            generate(model, p, GenerationConfig(max_new_tokens=4, **cfg))
    with pytest.raises(MTPError, match="parallel-type heads"):
        generate(trained("sequential"), p, GenerationConfig(max_new_tokens=4, speculative=3, lookup=3))
