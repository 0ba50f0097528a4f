"""Meta's released multi-token models (`facebook/multi-token-prediction`), read directly.

A release directory holds `params.json`, the weights in `consolidated.*.pth` (one file per
model-parallel rank) and Llama 2's SentencePiece `tokenizer.model` (in the directory or, as in
the release, in its parent). Parameter names are ours already (docs/architecture.md), so no renaming:
`layers.*` holds the trunk plus the next-token head, `extra_heads.*` the other heads.

What `n_layers` means. Meta's `llama/model.py` builds
    layers      = [TransformerBlock(i) for i in range(n_layers - n_future_tokens + 1)]
    extra_heads = [TransformerBlock(i) for i in range(n_layers - n_future_tokens + 1, n_layers)]
and runs `layers[:-1]` as the trunk, then every head of `[layers[-1]] + extra_heads` on the
trunk's output, through the shared `norm` and `output`. So `n_layers` counts ALL blocks, heads
included (parameter-matched: the 7B n=4 model has 29 + 3 = 32 blocks), exactly like our
`ModelConfig.n_layers`, and the heads are our `parallel` heads. The weights are checked against
this: `params.json` must agree with the number of `layers.*` and `extra_heads.*` blocks found.

Model-parallel shards (`consolidated.00.pth`, `consolidated.01.pth`, ...) are merged as in Llama's
fairscale layout: column-parallel weights (wq, wk, wv, w1, w3, output) are concatenated along
dim 0, row-parallel ones (wo, w2) along dim 1, the parallel embedding along dim 1, and norms are
replicated (taken from shard 0). Merging allocates the merged tensors once; a single shard is
never copied.

Memory: every shard is opened with `torch.load(..., weights_only=True, mmap=True)` and the model
is built on the meta device and filled with `load_state_dict(assign=True)`, so the parameters are
the file's own (memory-mapped) tensors: no second copy of a 7B model. Weights keep their stored
dtype (bf16 in Meta's release) unless `dtype` is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.model import MTPTransformer, rope_tables

PARAMS = "params.json"
TOKENIZER_MODEL = "tokenizer.model"
DEFAULT_MAX_SEQ_LEN = 4096  # Llama 2's context; params.json does not say

# Meta's ModelArgs: field -> default (None: required in params.json)
_ARGS = {
    "dim": None, "n_layers": None, "n_heads": None, "n_kv_heads": "n_heads", "vocab_size": -1,
    "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "n_future_tokens": 1,
}
_IGNORED = {"max_batch_size", "max_seq_len"}  # run-time sizes, not the architecture
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
_BLOCK_KEY = re.compile(r"^(layers|extra_heads)\.(\d+)\.(.+)$")


def weight_files(directory: str | Path) -> list[Path]:
    """`consolidated.*.pth` (or `consolidated.pth`) in `directory`, in model-parallel rank order."""
    d = Path(directory)
    files = sorted(d.glob("consolidated.*.pth"))
    single = d / "consolidated.pth"
    return files or ([single] if single.is_file() else [])


def is_meta_dir(path: str | Path) -> bool:
    """True for a directory laid out like Meta's release (params.json + consolidated*.pth)."""
    p = Path(path)
    return p.is_dir() and (p / PARAMS).is_file() and bool(weight_files(p))


def directory_kind(path: str | Path) -> str | None:
    """"meta" (Meta's release layout), "mtp" (our checkpoint), "hf" (a transformers model
    directory or a folder with a .gguf file) or None."""
    p = Path(path)
    if not p.is_dir():
        return None
    if is_meta_dir(p):
        return "meta"
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and "format_version" in config and "model" in config:
        return "mtp"
    if isinstance(config, dict) and ("model_type" in config or "architectures" in config) or any(p.glob("*.gguf")):
        return "hf"
    return None


def _not_meta(p: Path) -> MTPError:
    kind = directory_kind(p)
    hint = {"hf": "; it looks like a Hugging Face model: use `mtp convert hf`",
            "mtp": "; it is an mtp checkpoint already"}.get(kind or "", "")
    return MTPError(f"{p} is not a Meta checkpoint directory (needs {PARAMS} and consolidated.*.pth){hint}")


def read_params(directory: str | Path) -> dict:
    """params.json as Meta's ModelArgs (defaults filled in); MTPError on missing or bad fields."""
    path = Path(directory) / PARAMS
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MTPError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise MTPError(f"{path} is not a JSON object")
    missing = [k for k, v in _ARGS.items() if v is None and k not in raw]
    if missing:
        raise MTPError(f"{path} lacks required fields: {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_ARGS) - _IGNORED)
    if unknown:
        raise MTPError(f"{path} has fields this converter does not support: {', '.join(unknown)}")
    args = {k: raw.get(k, v) for k, v in _ARGS.items()}
    if args["n_kv_heads"] in ("n_heads", None):
        args["n_kv_heads"] = args["n_heads"]
    args["max_seq_len"] = raw.get("max_seq_len")
    return args


def _merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from Llama-style model-parallel shards (see the module docstring)."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != keys:
            raise MTPError(f"model-parallel shard {f.name} holds other parameters than {files[0].name}")
    merged = {}
    for k in shards[0]:
        parts = [s[k] for s in shards]
        if k == "tok_embeddings.weight":
            dim = 1
        elif k == "output.weight" or k.endswith(_COLUMN):
            dim = 0
        elif k.endswith(_ROW):
            dim = 1
        else:  # norms (and anything 1-D) are replicated on every rank
            dim = None
        merged[k] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def load_state(directory: str | Path, merge: bool = True) -> dict[str, torch.Tensor]:
    """The merged state dict of a Meta directory, memory-mapped where there is a single shard
    (merge=False: the first shard only, as it is: enough for names and the layout)."""
    d = Path(directory)
    files = weight_files(d)
    if not files:
        raise _not_meta(d)
    shards = []
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a corrupt zip / pickle
            raise MTPError(f"cannot load {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise MTPError(f"{f} does not hold a state dict of tensors")
        sd.pop("rope.freqs", None)  # Llama 1 checkpoints carry their rotary table
        shards.append(sd)
        if not merge:
            return sd
    return _merge_shards(shards, files)


def meta_config(directory: str | Path, state: dict[str, torch.Tensor] | None = None,
                max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a Meta directory, checked against the blocks its weights hold."""
    d = Path(directory)
    args = read_params(d)
    state = state if state is not None else load_state(d, merge=False)
    keys = state.keys()
    blocks = {"layers": set(), "extra_heads": set()}
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks[m.group(1)].add(int(m.group(2)))
    n_layer_blocks, n_extra = len(blocks["layers"]), len(blocks["extra_heads"])
    n_layers, n_future = args["n_layers"], args["n_future_tokens"]
    if (n_layer_blocks, n_extra) != (n_layers - n_future + 1, n_future - 1):
        raise MTPError(
            f"{d}: {PARAMS} says n_layers={n_layers} and n_future_tokens={n_future}, i.e. "
            f"{n_layers - n_future + 1} blocks in layers and {n_future - 1} extra heads, but the weights "
            f"hold {n_layer_blocks} and {n_extra}"
        )
    vocab = args["vocab_size"]
    if vocab is None or vocab < 0:  # Llama's convention: taken from the tokenizer (here: the weights)
        emb = state.get("tok_embeddings.weight")
        if emb is None:
            raise MTPError(f"{d}: {PARAMS} has no vocab_size and the weights have no tok_embeddings")
        vocab = int(emb.shape[0])
    cfg = dict(
        vocab_size=vocab, dim=args["dim"], n_layers=n_layers, n_heads=args["n_heads"],
        n_kv_heads=args["n_kv_heads"], multiple_of=args["multiple_of"],
        ffn_dim_multiplier=args["ffn_dim_multiplier"], norm_eps=args["norm_eps"],
        rope_theta=float(args["rope_theta"]),
        max_seq_len=max_seq_len or args["max_seq_len"] or DEFAULT_MAX_SEQ_LEN,
        n_future=n_future, head_type="parallel", tie_embeddings=False,
    )
    try:
        return ModelConfig(**cfg)
    except MTPError as e:
        raise MTPError(f"{d}/{PARAMS}: {e}") from None
    except (TypeError, ValueError) as e:
        raise MTPError(f"{d}/{PARAMS}: invalid model config: {e}") from None


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                     dtype: torch.dtype | None = None) -> MTPTransformer:
    """An MTPTransformer whose parameters ARE the given tensors (built on the meta device, then
    `load_state_dict(assign=True)`): no copy unless `dtype` differs from the stored one.
    MTPError naming the first parameter whose name or shape does not fit `cfg`."""
    with torch.device("meta"):
        model = MTPTransformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")
        state = {k: v for k, v in state.items() if k != "output.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MTPError(f"{source}: weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise MTPError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config implies {shape}")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # buffers were on meta
    model.rope_cos, model.rope_sin = cos, sin
    return model


def find_tokenizer(directory: str | Path) -> Path | None:
    """tokenizer.model in the directory or its parent (the release keeps one at its top)."""
    d = Path(directory)
    for cand in (d / TOKENIZER_MODEL, d.parent / TOKENIZER_MODEL):
        if cand.is_file():
            return cand
    return None


def load_meta(directory: str | Path, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
              tokenizer: str | Path | None = None, max_seq_len: int | None = None):
    """(model, tokenizer, meta) from a Meta release directory, like `load_checkpoint`.

    tokenizer: a tokenizer file or directory (default: tokenizer.model beside or above the
    weights). dtype: convert the weights (default: keep the stored dtype). max_seq_len: the
    context for the rotary tables (default: params.json's, else 4096)."""
    from mtp.tokenizers import SentencePieceTokenizer, check_vocab, get_tokenizer

    d = Path(directory)
    if not is_meta_dir(d):
        raise _not_meta(d)
    state = load_state(d)
    cfg = meta_config(d, state, max_seq_len)
    if tokenizer is None:
        found = find_tokenizer(d)
        if found is None:
            raise MTPError(f"{d}: no {TOKENIZER_MODEL} in it or its parent; pass the tokenizer explicitly")
        tok = SentencePieceTokenizer.from_file(found)
    else:
        tok = get_tokenizer(tokenizer)
    check_vocab(tok, cfg.vocab_size, str(d), exact=True)
    model = model_from_state(cfg, state, str(d), dtype).to(device)
    meta = {"format_version": None, "model": cfg, "train": None, "step": None, "path": d, "source": "meta"}
    return model.eval(), tok, meta


def inspect_meta(directory: str | Path):
    """(model on the meta device, tokenizer, meta) without reading the weights' data."""
    from mtp.tokenizers import SentencePieceTokenizer, check_vocab

    d = Path(directory)
    if not is_meta_dir(d):
        raise _not_meta(d)
    cfg = meta_config(d, load_state(d, merge=False))  # memory-mapped: no weight is read
    found = find_tokenizer(d)
    if found is None:
        raise MTPError(f"{d}: no {TOKENIZER_MODEL} in it or its parent")
    tok = SentencePieceTokenizer.from_file(found)
    check_vocab(tok, cfg.vocab_size, str(d), exact=True)
    with torch.device("meta"):
        model = MTPTransformer(cfg)
    return model, tok, {"format_version": None, "model": cfg, "train": None, "step": None, "path": d,
                        "source": "meta"}
