"""mtp's attention kernel for decode steps (mtp.decode.attend): what scaled_dot_product_attention
computes over a static cache (grouped queries, per-row and per-query masks, views of the cache),
each query independent of the step's others, and what compiled CPU decoding calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp.decode import attend, rowdot
from mtp.decode.cache import cached_attention

pytestmark = pytest.mark.skipif(not rowdot.available(), reason=f"kernels unavailable: {rowdot.unavailable_reason()}")


def cache_case(B, H, G, T, S, hd, seed=0, max_len=None):
    """q (B, H, T, hd) as the model makes it (a transposed view), k, v as the first S positions of
    a longer cache, and a mask letting row b's query t see positions <= its own (ragged rows)."""
    g = torch.Generator().manual_seed(seed)
    max_len = max_len or S + 5
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)
    kc, vc = torch.randn(B, G, max_len, hd, generator=g), torch.randn(B, G, max_len, hd, generator=g)
    last = torch.randint(T, S - T + 1, (B,), generator=g)  # row b's queries sit at last[b] - T + 1 .. last[b]
    pos = last[:, None] - T + 1 + torch.arange(T)  # (B, T)
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S)
    return q, kc[:, :, :S], vc[:, :, :S], mask


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


# head sizes: one vector (16) or two (AVX2), 24 (a tail past the vector width: the generic path),
# 64 (SmolLM2), 128; multi-head and grouped-query attention; batch sizes 1 and 3
CASES = [(1, 9, 3, 4, 256, 64), (3, 4, 4, 1, 40, 16), (2, 6, 2, 5, 33, 24), (1, 2, 1, 16, 70, 128),
         (3, 8, 2, 3, 17, 32)]


@pytest.mark.parametrize("B,H,G,T,S,hd", CASES)
def test_attend_computes_what_sdpa_computes(B, H, G, T, S, hd):
    q, k, v, mask = cache_case(B, H, G, T, S, hd, seed=B * 100 + hd)
    out = attend.attend(q, k, v, mask)
    assert out.shape == (B, H, T, hd)
    torch.testing.assert_close(out, sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # laid out (B, T, H, hd): the output projection reads it without a copy
    assert out.transpose(1, 2).is_contiguous()


def test_scores_far_apart():
    """Weights that underflow to 0 next to ones that do not (the kernel's own exp, checked far
    from the maximum), and a cache length past the last full vector."""
    q, k, v, mask = cache_case(2, 4, 2, 3, 53, 32, seed=13)
    q = q * 40
    torch.testing.assert_close(attend.attend(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_a_tree_mask_per_query_and_per_head():
    """Any boolean mask: a token tree's (each node sees the committed positions and its
    ancestors), given per head too."""
    B, H, G, T, S, hd = 2, 4, 2, 5, 30, 16
    q, k, v, _ = cache_case(B, H, G, T, S, hd, seed=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, H, T, S, generator=g) < 0.4
    mask[..., 0] = True  # every query sees something
    torch.testing.assert_close(attend.attend(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_each_query_is_computed_alone():
    """A query's output does not depend on the step's other queries: bit for bit what it gives
    alone (a speculative step's attention is then a greedy step's)."""
    B, H, G, T, S, hd = 2, 9, 3, 6, 100, 64
    q, k, v, mask = cache_case(B, H, G, T, S, hd, seed=11)
    together = attend.attend(q, k, v, mask)
    for t in range(T):
        alone = attend.attend(q[:, :, t : t + 1], k, v, mask[:, :, t : t + 1])
        assert torch.equal(alone[:, :, 0], together[:, :, t]), t


def test_positions_a_query_cannot_see_are_never_read():
    """Masked positions do not enter the result, whatever they hold (a compiled step's cache is
    mostly unwritten): NaN there changes nothing."""
    q, k, v, mask = cache_case(2, 4, 2, 3, 50, 32, seed=5)
    before = attend.attend(q, k, v, mask)
    k, v = k.clone(), v.clone()
    k[~mask[:, 0, -1][:, None, :, None].expand_as(k)] = float("nan")
    v[~mask[:, 0, -1][:, None, :, None].expand_as(v)] = float("nan")
    assert torch.equal(attend.attend(q, k, v, mask), before)


def test_a_query_that_sees_nothing_gets_zeros():
    q, k, v, mask = cache_case(1, 2, 1, 2, 10, 16, seed=2)
    mask = mask.clone()
    mask[:, :, 1] = False
    out = attend.attend(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    torch.testing.assert_close(out[:, :, 0], sdpa(q, k, v, mask)[:, :, 0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    q, k, v, mask = cache_case(1, 4, 2, 2, 10, 16)
    with pytest.raises(RuntimeError, match="do not fit"):
        attend.attend(q, k[..., :8], v, mask)
    with pytest.raises(RuntimeError, match="mask does not fit"):
        attend.attend(q, k, v, mask[..., :5])
    with pytest.raises(RuntimeError, match="boolean mask"):
        attend.attend(q, k, v, mask.float())


def test_compiled_cpu_attention_calls_the_kernel():
    """Compiled for a CPU in float32, cached_attention is mtp::attend (the same numbers as the
    kernel called eagerly); bfloat16 keeps inductor's code."""
    q, k, v, mask = cache_case(2, 9, 3, 4, 64, 64, seed=9)
    compiled = torch.compile(cached_attention, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(q, k, v, mask), attend.attend(q, k, v, mask))
    assert attend.usable(q, k) and not attend.usable(q.bfloat16(), k.bfloat16())
