"""A Llama-style decoder with n future-token prediction heads on a shared trunk.

Parameter names follow Meta's multi-token release (tok_embeddings, layers.{i}.attention.wq, ...,
extra_heads.{j}..., norm, output), so its checkpoints load without renaming. Rotary embeddings
use Meta's interleaved-pair convention for the same reason.

Layout (parameter-matched, as in the paper): with n_layers blocks and n_future = n,
`layers` holds the n_layers - n trunk blocks plus the next-token head (the last entry), and
`extra_heads` the n - 1 other heads. All heads share the final `norm` and the `output`
unembedding. For `linear` heads the trunk keeps all n_layers blocks, the next-token head is the
identity and each extra head is one d x d map.

Head i (0-based) predicts the token at offset `config.head_offsets[i]` (1, 2, ..., n by default)
and reads its input from `parents[i]`: -1 is the trunk's output, otherwise another head's output.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.config import TRUNK, ModelConfig  # TRUNK: public here too
from mtp.decode.cache import CacheStep, KVCache, cached_attention  # what attention reads when decoding

if TYPE_CHECKING:
    from mtp.decode.cache import ModelCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight  # in float32


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, head_dim), float32; pair k's angle t * theta^(-2k/hd)
    fills both of its entries 2k and 2k+1."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs).repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x (B, T, H, hd) by position; cos/sin are
    (T, hd), shared by the batch, or (B, T, hd) when every row has its own positions.
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as x * cos + (-x1, x0) * sin: five kernels."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-x1, x0) per pair
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hd) or (B, T, 1, hd)
    return (xf * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if kv is not None:  # decoding: few tokens, so rotate q and k in one go (fewer kernels)
            q, k = apply_rope(torch.cat([q, k], dim=2), cos, sin).split([self.n_heads, self.n_kv_heads], dim=2)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:  # decoding: attend over the static cache, masked by position
            k, v = kv.update(step.slots, k, v, step.kv_len)  # (B, Hkv, kv_len, hd)
            y = cached_attention(q, k, v, step.mask)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, step)
        return h + self.feed_forward(self.ffn_norm(h))


class SequentialHead(TransformerBlock):
    """DeepSeek-V3 style depth: combine the previous depth's hidden state at position t with the
    embedding of token t + k, project 2d -> d, then one transformer block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, kv=None, step=None, emb_future: torch.Tensor | None = None):  # type: ignore[override]
        x = self.eh_proj(torch.cat([self.hnorm(x), self.enorm(emb_future)], dim=-1))
        return super().forward(x, cos, sin, kv, step)


class MTPTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        n = cfg.n_future
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer_blocks))
        self.graph = graph = cfg.head_graph  # which output each head reads (mtp.config.HeadGraph)
        if graph.is_linear:
            extra = [nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(n - 1)]
        elif graph.is_sequential:
            extra = [SequentialHead(cfg) for _ in range(n - 1)]
        else:
            extra = [TransformerBlock(cfg) for _ in range(n - 1)]
        self.extra_heads = nn.ModuleList(extra)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def parents(self) -> list[int]:
        """The output each head reads (self.graph.parents as a list)."""
        return list(self.graph.parents)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        std = cfg.init_std
        # residual output projections scaled down by depth (GPT-2 / nanoGPT), so that the
        # residual stream keeps its scale however many heads add blocks on top of the trunk
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(mod.weight, 0.0, resid_std if last in ("wo", "w2") else std)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        if self.graph.is_linear:
            for head in self.extra_heads:  # start every linear head as the next-token head
                nn.init.eye_(head.weight)
        for head in self.extra_heads:
            if isinstance(head, SequentialHead):
                # eh_proj reads two unit-RMS halves (2 * dim inputs): scale so its output starts at
                # the residual stream's scale instead of sqrt(2 * dim) times above it
                nn.init.normal_(head.eh_proj.weight, 0.0, std / math.sqrt(2 * cfg.dim))

    # ---- pieces, callable on their own (the loss and the decoder use them) -----------------
    def rope(self, T: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    @property
    def trunk_blocks(self) -> nn.ModuleList | list[nn.Module]:
        return self.layers if self.graph.is_linear else self.layers[:-1]

    def trunk(self, tokens: torch.Tensor, cache: "ModelCache | None" = None) -> torch.Tensor:
        """Embedding and shared blocks: tokens (B, T) -> hidden (B, T, D).

        With a cache (decoding), the tokens sit at the positions set by `cache.at(...)`, their
        keys and values are written there, and attention reads the cache."""
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if cache is not None:
            step = cache.step
            for block, kv in zip(self.trunk_blocks, cache.trunk):
                h = block(h, step.cos, step.sin, kv, step)
            return h
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope(T)
        for block in self.trunk_blocks:
            h = block(h, cos, sin)
        return h

    def head_module(self, i: int) -> nn.Module | None:
        """The module of head i (None for the identity next-token head of linear heads)."""
        if i == 0:
            return None if self.graph.is_linear else self.layers[-1]
        return self.extra_heads[i - 1]

    def future_embedding(self, tokens: torch.Tensor, shift: int) -> torch.Tensor:
        """Embedding of token t + shift at each position t, zeros past the end: (B, T, D)."""
        emb = self.tok_embeddings(tokens[:, shift:])  # (B, T - shift, D)
        return F.pad(emb, (0, 0, 0, shift))

    def run_head(self, i: int, x: torch.Tensor, tokens: torch.Tensor | None = None,
                 cache: "ModelCache | None" = None, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Head i on its input x (B, T, D) -> hidden (B, T, D), before the shared norm.

        Sequential heads also read token t + i at each position t: taken from the input tokens
        (B, T) by shifting, or given directly as future_tokens (B, T) (decoding, where t + i may
        be a draft). With a cache, the head attends over its own static cache (see `trunk`)."""
        mod = self.head_module(i)
        if mod is None:
            return x
        if isinstance(mod, nn.Linear):
            return mod(x)
        if cache is not None:
            step = cache.step
            cos, sin, extra = step.cos, step.sin, (cache.heads[i], step)
        else:
            (cos, sin), extra = self.rope(x.shape[1]), ()
        if isinstance(mod, SequentialHead):
            if future_tokens is not None:
                emb = self.tok_embeddings(future_tokens)
            elif tokens is not None:
                emb = self.future_embedding(tokens, i)
            else:
                raise ValueError("sequential heads need the input tokens")
            return mod(x, cos, sin, *extra, emb_future=emb)
        return mod(x, cos, sin, *extra)

    def heads_hidden(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All heads' hidden outputs, in head order 0..n-1."""
        outs: dict[int, torch.Tensor] = {TRUNK: h}
        for i in self.graph.order:
            outs[i] = self.run_head(i, outs[self.graph.parents[i]], tokens)
        return [outs[i] for i in range(len(self.graph.parents))]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding: (..., D) -> (..., V)."""
        return self.output(self.norm(hidden))

    def forward(self, tokens: torch.Tensor, return_all_heads: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, V), or every head's logits (B, T, n, V)."""
        h = self.trunk(tokens)
        if not return_all_heads:
            for i in self.graph.path_to(0):
                h = self.run_head(i, h, tokens)
            return self.logits(h)
        return self.logits(torch.stack(self.heads_hidden(h, tokens), dim=-2))

    # ---- bookkeeping ------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        def count(mods) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        heads = [m for i in range(self.config.n_future) if (m := self.head_module(i)) is not None]
        return {
            "total": sum(p.numel() for p in self.parameters()),  # a tied weight counts once
            "embedding": self.tok_embeddings.weight.numel(),
            "trunk": count(self.trunk_blocks),
            "heads": count(heads),
            "per_head": count(heads[-1:]) if heads else 0,
            "unembedding": 0 if self.config.tie_embeddings else self.output.weight.numel(),
        }
