"""Static KV caches: written by position, read through a mask sliced by position.

A decode step writes its tokens' keys and values at their positions and attends to positions
<= its own, so the entries of rejected drafts are simply overwritten later: no rollback, no copy,
shapes never change (gpt-fast's design). `KVCache` is one attention block's, `ModelCache` every
block's of a model (trunk and heads), and `CacheStep` says where the next cached call reads and
writes. `mtp.model`'s attention takes a `KVCache` and a `CacheStep`; this module imports the model
only inside `ModelCache`, so the model can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.decode import attend

if TYPE_CHECKING:
    from mtp.model import MTPTransformer


class KVCache(nn.Module):
    """Static keys and values of one attention block, (B, n_kv_heads, S, head_dim), written by
    position: a step writes its tokens' k/v at their positions and attends to positions <= its
    own, so entries of rejected draft tokens are simply overwritten later (no rollback, no copy,
    shapes never change). Buffers, so torch.compile treats them as static state."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @classmethod
    def rows_of(cls, other: "KVCache", start: int, batch: int) -> "KVCache":
        """A cache whose buffers are rows start..start+batch-1 of another's (shared storage)."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache.register_buffer("k", other.k[start : start + batch], persistent=False)
        cache.register_buffer("v", other.v[start : start + batch], persistent=False)
        return cache

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (B, Hkv, T, hd) at positions (B, T); return the first kv_len positions."""
        if torch.compiler.is_compiling():
            # an index_put_: inductor writes it in place, where a scatter_ into a buffer makes it
            # copy the whole cache in and out around the write, at every step
            rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
            self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, Hkv, hd)
            self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        else:  # eager: scatter_ is the cheaper call
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k.scatter_(2, idx, k.to(self.k.dtype))
            self.v.scatter_(2, idx, v.to(self.v.dtype))
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


def weights_key(*modules: nn.Module) -> tuple:
    """Changes when any parameter of the modules is replaced or changed in place (its version
    counter): how copies of weights (stacked heads, compiled-in constants) know they are stale."""
    return tuple((p.data_ptr(), p._version) for m in modules for p in m.parameters())


# the most queries a step sends to the attend kernel (a decode step's k, a tree's nodes); a longer
# prefill keeps SDPA, which blocks its queries (16: 74 us a layer on attend, 108 on SDPA)
ATTEND_QUERIES = 16


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of decoding queries q (B, H, T, hd) over a cache's keys and values
    (B, Hkv, S, hd), masked by mask (B, 1, T, S), -> (B, H, T, hd).

    On a CPU in float32, a step of up to ATTEND_QUERIES queries: mtp's attend kernel, eager and
    compiled (`mtp.decode.attend`: only the positions each query sees, and a query's output
    independent of the others'; on SmolLM2 9 / 20 us a layer for 1 / 4 queries, where SDPA took
    29 / 55 and inductor's code below 41 / 90). Otherwise eager: scaled_dot_product_attention;
    compiled for a CPU: the product written out, which inductor fuses into its own kernels (SDPA
    stays an opaque call there, whose cost at a few queries exceeds the arithmetic around it)."""
    if q.shape[2] <= ATTEND_QUERIES and attend.usable(q, k):
        return attend.attend(q, k, v, mask)
    if not (torch.compiler.is_compiling() and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return written_out_attention(q, k, v, mask)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cached_attention as products and a softmax, for inductor to fuse (compiled, where the
    attend kernel does not apply)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # q . k as a broadcast sum: inductor fuses it into a reduction over the cache as it lies (as a
    # matmul it copied the key cache into a transposed layout at every step, at batch sizes > 1)
    scores = (q[..., :, None, :] * k.to(q.dtype)[..., None, :, :]).sum(-1) * q.shape[-1] ** -0.5  # (B, H, T, S)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1).to(q.dtype) @ v.to(q.dtype))


class CacheStep:
    """Where a cached forward pass reads and writes: per-row positions (B, T), their rotary
    tables, and the mask (B, 1, T, kv_len) letting each query see cache positions <= its own.

    A token tree (mtp.decode.tree) gives its own cache slots (B, T), where the keys and values are
    written (distinct per node, while siblings share a rotary position), and its own mask (each
    node sees the committed slots and its ancestors); without them slots are the positions."""

    def __init__(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_len: int,
                 slots: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        self.positions, self.kv_len = positions, kv_len
        self.slots = positions if slots is None else slots
        self.cos, self.sin = cos[positions], sin[positions]  # (B, T, hd)
        if mask is None:
            keys = torch.arange(kv_len, device=positions.device)
            mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, kv_len)
        self.mask = mask


class ModelCache(nn.Module):
    """Static KV caches for every attention block of a model (trunk blocks and heads), for a
    batch of B rows and positions 0..max_len-1, with rotary tables of that length (drafts may
    sit a few positions past the model's context; they are never accepted there).

    The heads listed in `stacked` (run together by mtp.decode.stacked.StackedHeads) share one
    cache of len(stacked) * batch rows, `self.stacked`; their entries in `self.heads` are views
    of it."""

    def __init__(self, model: MTPTransformer, batch: int, max_len: int, device=None, dtype=None,
                 stacked: Sequence[int] = ()):
        super().__init__()
        from mtp.model import TransformerBlock, rope_tables  # here: mtp.model imports this module

        cfg = model.config
        device = device if device is not None else model.output.weight.device
        dtype = dtype or model.output.weight.dtype

        def kv() -> KVCache:
            return KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, device, dtype)

        self.batch, self.max_len = batch, max_len
        self.trunk = nn.ModuleList(kv() for _ in model.trunk_blocks)
        self.stacked = None
        if stacked:
            self.stacked = KVCache(len(stacked) * batch, cfg.n_kv_heads, max_len, cfg.head_dim, device, dtype)
        slot = {head: j for j, head in enumerate(stacked)}  # head -> its block of rows in self.stacked
        heads = []
        for i in range(cfg.n_future):
            if i in slot:
                heads.append(KVCache.rows_of(self.stacked, slot[i] * batch, batch))
            else:
                heads.append(kv() if isinstance(model.head_module(i), TransformerBlock) else nn.Identity())
        self.heads = nn.ModuleList(heads)
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.step: CacheStep | None = None

    def at(self, positions: torch.Tensor, kv_len: int | None = None, slots: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> CacheStep:
        """Set the positions (B, T) of the next cached calls; attention reads cache positions
        < kv_len (default: all), which must cover every position given. A token tree also gives
        the slots (B, T) its keys and values go to and its mask (B, 1, T, kv_len) (see CacheStep)."""
        self.step = CacheStep(positions, self.rope_cos, self.rope_sin, kv_len or self.max_len, slots, mask)
        return self.step
