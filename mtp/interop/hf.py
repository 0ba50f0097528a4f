"""Export an `mtp` model's next-token path to a Hugging Face `transformers` `LlamaForCausalLM`.

The next-token logits of an `MTPTransformer` come from the trunk blocks plus the next-token head;
when that head is one ordinary transformer block on top of the trunk (every head type except
`anticausal` with n_future > 1), the path is exactly a Llama: embedding, blocks, final RMSNorm,
unembedding. The exported model gives the same logits as `model(tokens)`, so HF's `generate` can
be timed on the very same weights. The extra heads are dropped.

Rotary embeddings: `mtp.model.apply_rope` rotates interleaved pairs (x[2k], x[2k+1]) of each
attention head (Meta's convention); HF Llama's `rotate_half` rotates (x[k], x[k + hd/2]) with the
same frequency for index k. Reordering the output rows of wq and wk within each head, so that the
even rows come first and the odd rows second, turns one into the other; q.k is unchanged because
queries and keys get the same reordering, and v / wo are untouched.

`transformers` is imported inside the functions: it is an optional extra (pip install 'mtp[hf]').
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.model import MTPTransformer, TransformerBlock

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaConfig, LlamaForCausalLM

_EXTRA = "pip install 'mtp[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MTPError(f"exporting to Hugging Face transformers needs the optional extra: {_EXTRA}") from None
    return transformers


def _llama_blocks(cfg: ModelConfig) -> int:
    """Blocks on the next-token path: the trunk plus the next-token head block (all of `layers`)."""
    return cfg.n_layer_blocks


def _refuse_unless_plain(head_type: str, path: list[int]) -> None:
    """MTPError unless the next-token path is head 0 alone, read straight from the trunk."""
    if list(path) != [0]:
        raise MTPError(
            f"cannot export to a Llama: the next-token path of this {head_type} model runs "
            f"{len(path)} heads ({' -> '.join(map(str, path))}) on top of the trunk, not a single block"
        )


def _check_plain_llama(model: MTPTransformer) -> list[nn.Module]:
    """The blocks of the next-token path, in order; MTPError when the path is not a plain Llama."""
    _refuse_unless_plain(model.config.head_type, model.next_token_path)
    blocks = list(model.trunk_blocks)
    head = model.head_module(0)  # None: the identity next-token head of linear heads
    if head is not None:
        if type(head) is not TransformerBlock:
            raise MTPError(f"cannot export to a Llama: the next-token head is a {type(head).__name__}, not a block")
        blocks.append(head)
    return blocks


def hf_llama_config(cfg: ModelConfig) -> "LlamaConfig":
    """A `transformers.LlamaConfig` with the shapes of `cfg`'s next-token path.

    bos/eos/pad token ids are left unset (the tokenizer is not exported), so `generate` never stops
    early on its own; pass `eos_token_id=` to `generate` to stop on one. MTPError when the
    next-token path is more than one block on the trunk (anticausal heads with n_future > 1)."""
    transformers = _transformers()
    parents = MTPTransformer._parents(cfg.head_type, cfg.n_future)
    _refuse_unless_plain(cfg.head_type, MTPTransformer._path_to(0, parents))
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=_llama_blocks(cfg),
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection (n_heads * head_dim, dim) from interleaved
    rotary pairs to rotate_half's halves: within each head, new row k = old row 2k and new row
    k + head_dim/2 = old row 2k + 1 (the order [0, 2, 4, ..., hd-2, 1, 3, ..., hd-1])."""
    dim = w.shape[-1]
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_llama_state_dict(model: MTPTransformer) -> dict[str, torch.Tensor]:
    """The next-token path's weights under HF Llama's names, q/k rows reordered for rotate_half."""
    cfg = model.config
    blocks = _check_plain_llama(model)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_embeddings.weight}
    for i, b in enumerate(blocks):
        p = f"model.layers.{i}."
        att, ffn = b.attention, b.feed_forward
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half(att.wq.weight, cfg.n_heads, cfg.head_dim)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half(att.wk.weight, cfg.n_kv_heads, cfg.head_dim)
        sd[p + "self_attn.v_proj.weight"] = att.wv.weight
        sd[p + "self_attn.o_proj.weight"] = att.wo.weight
        sd[p + "mlp.gate_proj.weight"] = ffn.w1.weight
        sd[p + "mlp.up_proj.weight"] = ffn.w3.weight
        sd[p + "mlp.down_proj.weight"] = ffn.w2.weight
        sd[p + "input_layernorm.weight"] = b.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.ffn_norm.weight
    sd["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    return {k: v.detach() for k, v in sd.items()}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def to_hf_llama(model: MTPTransformer, dtype: torch.dtype | None = None) -> "LlamaForCausalLM":
    """A `LlamaForCausalLM` (eval mode, on the model's device) whose logits equal `model(tokens)`.

    dtype: the exported weights' dtype (default: the model's own). The extra heads are dropped;
    MTPError if the next-token path is not a plain Llama (anticausal heads with n_future > 1)."""
    transformers = _transformers()
    sd = hf_llama_state_dict(model)  # refuses before building anything
    src = model.tok_embeddings.weight
    dtype = dtype or src.dtype
    config = hf_llama_config(model.config)
    with _default_dtype(dtype):  # parameters are created in `dtype`, never a float32 copy first
        hf = transformers.LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # a tied lm_head shares the embedding and is not in `sd`; anything else missing is a bug
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF Llama weights do not match: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF Llama did not tie lm_head to embed_tokens")
    return hf.to(src.device).eval()


def save_hf_llama(model: MTPTransformer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir` (config.json + model.safetensors) for `LlamaForCausalLM.from_pretrained`.

    Weights and config only: the tokenizer is not written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MTPError(f"cannot write a Hugging Face model to {out}: it exists and is not a directory")
    hf = to_hf_llama(model, dtype)
    hf.save_pretrained(out)  # safetensors: the default since transformers 4.35
    return out
