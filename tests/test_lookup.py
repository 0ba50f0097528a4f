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


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_lookup_decoding_is_plain_greedy(head_type):
    """k = 1 (plain prompt lookup) and k = 4 (lookup beside the heads), ragged batch: the tokens of
    greedy decoding, in fewer forward passes (the markov text repeats, so lookups hit). Sequential
    heads draft only for steps where some row has no lookup draft, over a longer window after."""
    model = trained(head_type)
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


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_compiled_lookup_equals_eager(head_type):
    model = trained_copy(head_type)  # keeps compiled decoders
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


def test_sequential_heads_draft_from_caches_that_saw_every_position(monkeypatch):
    """After steps the lookup drafted (sequential heads did not run), the heads' caches miss the
    positions committed since: the next window must re-run them (from position 0 if the heads
    have not drafted yet). Head 2's logits at the last position the verifier read depend on
    committed tokens only, so they must equal an uncached forward pass over the committed
    sequence; a window too short leaves stale cache entries and other logits."""
    from mtp.decode.lookup import LookupSteps

    model = trained("sequential")
    # prompts that contain the first 8 tokens greedy decoding will write: lookups hit for a while
    prompts = [p + reference_greedy(model, p, 8) + p for p in prompts_for((5, 8, 2, 6))]
    seen = []  # (history, last, head 2's logits there, how far each row's last moved since the heads drafted)
    plain = LookupSteps.sequential_drafts

    def recording(self, last, longest):
        dec, logits = self.dec, []
        head_logits = dec.head_logits
        monkeypatch.setattr(dec, "head_logits", lambda x: logits.append(head_logits(x)) or logits[-1])
        gaps = None if self.drafted_at is None else [a - b for a, b in zip(last, self.drafted_at)]
        drafts = plain(self, last, longest)
        monkeypatch.setattr(dec, "head_logits", head_logits)
        seen.extend((list(self.history(b)), last[b], logits[0][b], gaps) for b in range(len(last)) if dec.active[b])
        return drafts

    monkeypatch.setattr(LookupSteps, "sequential_drafts", recording)
    # the model's output cycles, so lookups would soon hit at every step: every third finds nothing
    import mtp.decode.lookup as lk

    calls, real = [0], lk.lookup_draft

    def sometimes(*args):
        calls[0] += 1
        return [] if calls[0] % 3 == 0 else real(*args)

    monkeypatch.setattr(lk, "lookup_draft", sometimes)
    for batch in [[p] for p in prompts] + [prompts]:  # batch 1: a lookup step skips the heads entirely
        out = generate(model, batch, GenerationConfig(max_new_tokens=24, speculative=4, lookup=5))
        assert out.tokens == [reference_greedy(model, p, 24) for p in batch]
    with torch.no_grad():
        for history, last, logits, _ in seen:
            # head 2 at `last` reads the token after it; what follows (padding here) it does not see
            ref = model(torch.tensor([history[: last + 2] + [0] * 4]), return_all_heads=True)[0, last, 1]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    # some drafts came after lookup steps had committed more than a chain step can: a longer window
    assert len(seen) > 10 and any(g and max(g) > 4 for *_, g in seen)
