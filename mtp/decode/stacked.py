"""Parallel heads run as one batched block when decoding.

Self-speculative decoding runs heads 1..k on every verify step as well as the next-token head.
With `parallel` heads all of them read the trunk's output and have the same shape, so instead of
k transformer blocks one after the other (k times the kernels, k times the Python dispatch: on a
CPU and on a small model that is most of a step's cost) they run as one block whose matrix
products are batched over the heads (`torch.bmm` on weights stacked along a new first axis).

Each head computes exactly what its own block computes: the same normalisation, the same
products row by row, the same attention over its own cache (tests/test_stacked.py compares them
bit for bit on CPU). The price is one copy of the heads' weights per k, kept for the model
(`stacked_heads`: in a weak registry, not on the model) and refreshed when the model's weights
change (in-place updates bump a parameter's version).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.config import TRUNK
from mtp.decode import rowdot
from mtp.decode.cache import CacheStep, KVCache, cached_attention, weights_key
from mtp.decode.packed import kernel_of
from mtp.model import TransformerBlock, apply_rope

# model -> {k: its StackedHeads}; a StackedHeads holds the model's head blocks, never the model
_stacked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stacked_heads(model: nn.Module, k: int) -> "StackedHeads | None":
    """Heads 0..k-1 of `model` as one StackedHeads, or None where they cannot be stacked (they do
    not all read the trunk, or are not plain transformer blocks). One per k is kept for the model
    (as long as the model lives), so decoders of every batch size and length share one copy of
    the weights (a decoder's `reset` refreshes it)."""
    heads = [model.head_module(i) for i in range(k)]
    if not (all(model.graph.parents[i] == TRUNK for i in range(k)) and stackable(heads)):
        return None
    kept = _stacked.setdefault(model, {})
    if k not in kept:
        kept[k] = StackedHeads(heads)
    return kept[k]


def stackable(blocks: list[nn.Module]) -> bool:
    """Whether these head modules can run as one batched block: plain transformer blocks (not
    sequential heads, not linear maps) of one shape."""
    return len(blocks) > 1 and all(type(b) is TransformerBlock for b in blocks)


class StackedHeads(nn.Module):
    """H transformer blocks that read the same input, run at once: (B, T, D) -> (H, B, T, D).

    Decoding only (a KV cache is required); the weights are buffers copied from the blocks, not
    parameters: nothing here is trained."""

    # the stacked buffers and, for each, the parameters of one block that fill it (concatenated
    # along the output dimension where several are one product). The weights after attention are
    # kept in two buffers, `{name}_0` for head 0 (`verify`) and `{name}_d` for the drafting heads
    # (`draft`), so that no product reads a slice of a stacked weight: compiled for a CPU with
    # frozen weights, inductor's C++ GEMM kernels read such a slice wrongly (torch 2.13; the drafts
    # came out wrong at batch sizes > 1; tests/test_generate.py::test_compiled_decoding_equals_eager)
    _SPLIT = ("ffn_norm", "wo", "w13", "w2")
    _LAYOUT = {
        "attention_norm": ("attention_norm.weight",),
        "ffn_norm": ("ffn_norm.weight",),
        "wqkv": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
        "wo": ("attention.wo.weight",),
        "w13": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
        "w2": ("feed_forward.w2.weight",),
    }

    def __init__(self, blocks: list[TransformerBlock]):
        super().__init__()
        if not stackable(blocks):
            raise ValueError("StackedHeads needs two or more plain transformer blocks")
        attn = blocks[0].attention
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.eps = blocks[0].attention_norm.eps
        self.ffn_hidden = blocks[0].feed_forward.w1.weight.shape[0]
        self._blocks = list(blocks)  # a plain list: the blocks stay registered on their model only
        self._key = None
        for name in self._buffer_sources():
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    def _buffer_sources(self) -> dict[str, tuple[slice, tuple[str, ...]]]:
        """{buffer: (the blocks that fill it, their parameters)}."""
        out = {}
        for name, sources in self._LAYOUT.items():
            if name in self._SPLIT:
                out[f"{name}_0"], out[f"{name}_d"] = (slice(0, 1), sources), (slice(1, None), sources)
            else:
                out[name] = (slice(None), sources)
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the blocks' weights in if they changed since the last copy. The buffers keep their
        storage (a captured CUDA graph reads them by address)."""
        key = weights_key(*self._blocks)
        if key == self._key:
            return
        params = [dict(b.named_parameters()) for b in self._blocks]
        for name, (blocks, sources) in self._buffer_sources().items():
            stacked = torch.stack([torch.cat([p[s] for s in sources], 0) for p in params[blocks]])
            buf = getattr(self, name)
            if buf.shape == stacked.shape and buf.dtype == stacked.dtype and buf.device == stacked.device:
                buf.copy_(stacked)
            else:
                setattr(self, name, stacked)
        self._key = key

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (H', M, in) @ w (H', out, in)^T per head -> (H', M, out): torch.bmm, or one product
        per head with mtp's rowdot kernel where the blocks' own linear layers compute with it at
        this many rows (within mtp.decode.packed.packed_linears)."""
        if kernel_of(self._blocks[0].feed_forward.w1, x.shape[1]) == "rowdot":
            return torch.stack([rowdot.rowdot(x[h], w[h]) for h in range(x.shape[0])])
        return torch.bmm(x, w.transpose(1, 2))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as mtp.model.RMSNorm computes it; weight is shaped to broadcast over x."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * weight

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cached_attention(q, k, v, mask).transpose(1, 2)  # (rows, T, nh, hd)

    def _ffn(self, h: torch.Tensor, part: str) -> torch.Tensor:
        """The feed-forward half of head 0 (part "0") or the drafting heads ("d") on their residual
        streams h (H', M, D)."""
        norm, w13, w2 = (getattr(self, f"{name}_{part}") for name in ("ffn_norm", "w13", "w2"))
        gate, up = self._mm(self._norm(h, norm[:, None]), w13).split(self.ffn_hidden, dim=-1)
        return h + self._mm(F.silu(gate) * up, w2)

    def verify(self, x: torch.Tensor, kv: KVCache, step: CacheStep):
        """x (B, T, D), the trunk's output at step.positions. kv: the heads' caches as one cache of
        H * B rows (head h's rows are h * B .. h * B + B - 1).

        Writes every head's keys and values at every position, and runs head 0 (the next-token
        head) in full -> (its output (B, T, D), the state `draft` needs). The other heads' outputs
        are only ever read at one position per row, so they are computed there only (`draft`)."""
        H, (B, T, D) = self.attention_norm.shape[0], x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        a = self._norm(x, self.attention_norm[:, None, None]).view(H, B * T, D)  # x normalised once
        qkv = self._mm(a, self.wqkv).view(H, B, T, nh + 2 * nkv, hd)
        qk, v = qkv.split([nh + nkv, nkv], dim=3)
        q, k = apply_rope(qk, step.cos, step.sin).split([nh, nkv], dim=3)  # (H, B, T, heads, hd)
        k, v = (t.reshape(H * B, T, nkv, hd).transpose(1, 2) for t in (k, v))
        k, v = kv.update(step.slots.repeat(H, 1), k, v, step.kv_len)  # (HB, nkv, kv_len, hd)
        y = self._attend(q[0].transpose(1, 2), k[:B], v[:B], step.mask).reshape(1, B * T, nh * hd)
        h0 = x.reshape(1, B * T, D) + self._mm(y, self.wo_0)
        h0 = self._ffn(h0, "0").view(B, T, D)
        return h0, (x, q[1:], step.mask)  # no views of the cache: outputs of a captured graph stay its own

    def draft(self, state, idx: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """Heads 1..H-1 at index idx (B,) of the positions `verify` wrote (state: what it returned;
        kv: the same cache) -> their outputs (H - 1, B, D)."""
        x, q, mask = state
        G, B = q.shape[0], x.shape[0]
        k, v = kv.k[B:, :, : mask.shape[-1]], kv.v[B:, :, : mask.shape[-1]]  # the drafting heads' rows
        rows = torch.arange(B, device=idx.device)
        q = q[:, rows, idx].reshape(G * B, 1, -1, self.head_dim).transpose(1, 2)  # (GB, nh, 1, hd)
        mask = mask[rows, :, idx][:, :, None].repeat(G, 1, 1, 1)  # (GB, 1, 1, kv_len)
        y = self._attend(q, k, v, mask).reshape(G, B, -1)
        h = x[rows, idx][None] + self._mm(y, self.wo_d)  # (G, B, D)
        return self._ffn(h, "d")
