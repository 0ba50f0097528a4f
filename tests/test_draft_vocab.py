"""A draft vocabulary (mtp.decode.draft_vocab): the heads draft only among its tokens, the output
stays greedy's token for token (chain and tree, batch 1 and ragged), sampling stays exact."""

from __future__ import annotations

import pytest
import torch

from mtp.decode.draft_vocab import DraftVocab, frequent_tokens
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate
from test_generate import (RAGGED, chi_square_pvalue, exact_joint, prompts_for, reference_greedy, sample_counts,
                           sampling_model, trained, trained_copy)


def test_frequent_tokens():
    toks = [5, 5, 5, 2, 2, 7, 7, 1]
    assert frequent_tokens(toks, 2, 10) == [2, 5]  # 5 (3x), then 2 and 7 tie at 2x: the lower id
    assert frequent_tokens(toks, 3, 10) == [2, 5, 7]
    assert frequent_tokens(toks, 100, 10) == [1, 2, 5, 7]  # only the tokens that occur
    with pytest.raises(MTPError, match="at least 1"):
        frequent_tokens(toks, 0, 10)


@torch.no_grad()
def test_draft_logits_are_the_model_s_on_the_draft_vocab():
    model = trained("parallel")
    ids = [0, 3, 4, 9, 31]
    dv = DraftVocab(ids, model.config.vocab_size)
    dv.refresh(model)
    h = torch.randn(2, 3, model.config.dim)
    got, ref = dv.logits(model, h), model.logits(h)
    assert torch.allclose(got[..., ids], ref[..., ids], atol=1e-5)
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(got[..., outside]).all()
    model.output.weight.mul_(2.0)  # an in-place change of the weights: the restricted copy follows
    try:
        dv.refresh(model)
        assert torch.allclose(dv.logits(model, h)[..., ids], model.logits(h)[..., ids], atol=1e-5)
    finally:
        model.output.weight.div_(2.0)


@pytest.mark.parametrize("head_type, tree", [("parallel", None), ("sequential", None), ("parallel", "0;1;0,0;2")])
def test_greedy_with_a_draft_vocab_equals_plain_greedy(head_type, tree):
    model = trained(head_type)
    V = model.config.vocab_size
    for prompts in (prompts_for([7]), prompts_for(RAGGED)):
        refs = [reference_greedy(model, p, 24) for p in prompts]
        used = sorted({t for r in refs for t in r})
        cfg = dict(max_new_tokens=24, speculative=3, kv_bucket=8, tree=tree)
        full = generate(model, prompts, GenerationConfig(**cfg))
        assert full.tokens == refs and max(full.stats.acceptance_by_head) > 0
        # the tokens greedy decoding writes: a draft is right wherever the full vocabulary's was
        # (and sometimes where it was not: the heads' best token among these)
        same = generate(model, prompts, GenerationConfig(**cfg, draft_vocab=used))
        assert same.tokens == refs and max(same.stats.acceptance_by_head) > 0
        # none of them: every draft is wrong, the output is still greedy's
        others = [t for t in range(V) if t not in used]
        none = generate(model, prompts, GenerationConfig(**cfg, draft_vocab=others))
        assert none.tokens == refs
        assert max(none.stats.acceptance_by_head) == 0 and none.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("head_type, tree", [("parallel", None), ("sequential", None), ("parallel", "0;1;0,0")])
def test_sampling_with_a_draft_vocab_matches_plain_sampling(head_type, tree):
    model, prompt, n = sampling_model(head_type), [1, 3, 0], 3
    counts, out = sample_counts(model, prompt, 3, n, temperature=1.0, draft_vocab=[0, 1, 3], tree=tree)
    assert 0.05 < out.stats.acceptance_by_head[0] < 0.95
    assert chi_square_pvalue(counts, exact_joint(model, prompt, n, 1.0, None, 1.0)) > 1e-3


@pytest.mark.parametrize("ids, match", [([], "empty"), ([0, 40], "must lie in"), ([1, 1], "twice")])
def test_bad_draft_vocab(ids, match):
    with pytest.raises(MTPError, match=match):
        generate(trained("parallel"), [[1, 2]], GenerationConfig(max_new_tokens=2, draft_vocab=ids))


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_compiled_decoding_with_a_draft_vocab_equals_eager(head_type):
    """Compiled, the draft vocabulary's rows of the unembedding are constants of the step (frozen
    in on a CPU): the same tokens and the same drafts as eager decoding over the same draft
    vocabulary, and after the unembedding changes the compiled drafts follow it."""
    model = trained_copy(head_type)  # its unembedding is changed below
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 16) for p in prompts]
    ids = sorted({t for r in refs for t in r})[:-1]  # all but one of the tokens greedy writes
    cfg = dict(max_new_tokens=16, speculative=3, draft_vocab=ids)
    eager = generate(model, prompts, GenerationConfig(**cfg))
    out = generate(model, prompts, GenerationConfig(**cfg, compile=True))
    assert eager.tokens == refs and out.tokens == refs
    assert out.stats.forward_passes == eager.stats.forward_passes
    assert out.stats.acceptance_by_head == pytest.approx(eager.stats.acceptance_by_head)
    with torch.no_grad():
        model.output.weight[ids[: len(ids) // 2]] *= -1.0  # half the draft tokens' rows flipped
    refs = [reference_greedy(model, p, 16) for p in prompts]
    eager = generate(model, prompts, GenerationConfig(**cfg))
    out = generate(model, prompts, GenerationConfig(**cfg, compile=True))
    assert out.tokens == refs
    assert out.stats.forward_passes == eager.stats.forward_passes
    assert out.stats.acceptance_by_head == pytest.approx(eager.stats.acceptance_by_head)
