"""Parallel heads run as one batched block (mtp.decode.stacked) compute what the heads' own blocks do:
the same next-token output and cache entries (bit for bit), the same drafts (the drafting heads
run at one position only: equal up to float rounding), the same generated tokens."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mtp.config import ModelConfig
from mtp.decode import rowdot
from mtp.decode.decoder import Decoder
from mtp.decode.packed import packed_linears
from mtp.generate import GenerationConfig, generate
from mtp.model import MTPTransformer


def model_for(head_type="parallel", n_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, dim=32, n_layers=6, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64,
                      multiple_of=16, n_future=4, head_type=head_type, init_std=0.2)
    return MTPTransformer(cfg).eval()


def decoders(model, k, B, **kw):
    return [Decoder(model, k, B, 48, GenerationConfig(speculative=k, stack_heads=s, **kw)).reset(GenerationConfig())
            for s in (True, False)]


@torch.no_grad()
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("kernel", [None, "rowdot"])
def test_stacked_heads_equal_their_own_blocks(n_kv_heads, k, kernel):
    """kernel rowdot: every product (the stacked heads' per-head ones too) on mtp's rowdot kernel."""
    if kernel == "rowdot" and not rowdot.available():
        pytest.skip(f"rowdot unavailable: {rowdot.unavailable_reason()}")
    model = model_for(n_kv_heads=n_kv_heads)
    with contextlib.nullcontext() if kernel is None else packed_linears(model, kernel=kernel):
        check_stacked_against_own_blocks(model, k)


def check_stacked_against_own_blocks(model, k):
    stacked, plain = decoders(model, k, B=3)
    assert stacked.stacked is not None and plain.stacked is None
    g = torch.Generator().manual_seed(0)
    B, rows = 3, torch.arange(3)
    # a prefill of 7 positions, then a verify step of k tokens at different positions per row
    steps = [(torch.randint(0, 16, (B, 7), generator=g), torch.arange(7).expand(B, -1)),
             (torch.randint(0, 16, (B, k), generator=g), torch.tensor([[2], [6], [4]]) + torch.arange(k))]
    for tokens, positions in steps:
        h_s, state = stacked.forward(tokens, positions, 16)
        h_p, extra = plain.forward(tokens, positions, 16)
        assert torch.equal(h_s, h_p)  # the next-token head, bit for bit
        for _ in range(3):  # the drafting heads at any index of the step
            idx = torch.randint(0, tokens.shape[1], (B,), generator=g)
            # computed at that one position only: equal up to float rounding (other kernel shapes)
            drafted = stacked.stacked.draft(state, idx, stacked.cache.stacked)
            torch.testing.assert_close(drafted, extra[:, rows, idx], rtol=1e-5, atol=1e-5)
            assert torch.equal(stacked.parallel_drafts(state, idx)[0], plain.parallel_drafts(extra, idx)[0])
        for i in range(k):  # every head's cache holds the same keys and values
            assert torch.equal(stacked.cache.heads[i].k, plain.cache.heads[i].k)
            assert torch.equal(stacked.cache.heads[i].v, plain.cache.heads[i].v)
    assert stacked.cache.heads[k - 1].k.abs().sum() > 0  # the views see what the stacked block wrote


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_is_the_same_with_and_without_stacking(temperature):
    model = model_for(seed=1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 16, (n,), generator=g).tolist() for n in (5, 1, 9)]
    for k in (2, 3, 4):
        outs = [generate(model, prompts, GenerationConfig(max_new_tokens=20, speculative=k, temperature=temperature,
                                                          seed=3, stack_heads=s)) for s in (True, False)]
        assert outs[0].tokens == outs[1].tokens, f"k={k}"
        assert outs[0].stats.forward_passes == outs[1].stats.forward_passes
        assert outs[0].stats.acceptance_by_head == outs[1].stats.acceptance_by_head


@torch.no_grad()
def test_the_stacked_copy_follows_weight_changes():
    """A decoder kept across calls (compiled decoders are) re-copies weights changed in place."""
    model = model_for()
    stacked, _ = decoders(model, 3, B=1)
    tokens, positions = torch.tensor([[1, 2, 3]]), torch.arange(3)[None]
    before = stacked.forward(tokens, positions, 8)[0].clone()
    for p in model.extra_heads[0].parameters():
        p.mul_(1.5)
    model.layers[-1].feed_forward.w2.weight.mul_(-1)
    stacked.reset(GenerationConfig())
    _, plain = decoders(model, 3, B=1)
    h_s, state = stacked.forward(tokens, positions, 8)
    h_p, extra = plain.forward(tokens, positions, 8)
    assert not torch.equal(h_s, before)
    assert torch.equal(h_s, h_p)
    idx = torch.tensor([2])
    drafted = stacked.stacked.draft(state, idx, stacked.cache.stacked)
    torch.testing.assert_close(drafted, extra[:, [0], idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_type, k", [("parallel", 1), ("causal", 3), ("anticausal", 3), ("sequential", 3),
                                          ("linear", 3)])
def test_only_parallel_transformer_heads_are_stacked(head_type, k):
    model = model_for(head_type)
    dec = Decoder(model, k, 1, 16, GenerationConfig(speculative=k)).reset(GenerationConfig())
    assert dec.stacked is None
    assert dec.cache.stacked is None


def test_decoders_share_one_stacked_copy_per_k():
    """Compiled decoders are kept per shape: they must not each hold a copy of the heads' weights."""
    model = model_for()
    a, b = (Decoder(model, 3, batch, 16, GenerationConfig(speculative=3)) for batch in (1, 4))
    c = Decoder(model, 2, 1, 16, GenerationConfig(speculative=2))
    assert a.stacked is b.stacked and a.stacked is not c.stacked
