"""Fine-tuning: heads added to (or removed from) a pretrained model, and parameter freezing.

The training itself is the ordinary loop (mtp.train.train) with TrainConfig.init_from set; this
module only builds the starting model and says which parameters train.

Two layouts for adding heads (`add_heads`):

plus-layers  (Table S4's "+ layers", Medusa-like) every pretrained block stays in `layers`, so the
             next-token path (embedding, trunk, next-token head, norm, unembedding) is unchanged,
             bit for bit; each new head is a copy of the pretrained next-token head block (the last
             block), so it starts out predicting what the next-token head predicts. n_layers grows
             by the number of heads added (linear heads add no block: n_layers stays). Works with
             the trunk frozen (freeze="trunk": only the new heads train) or fully fine-tuned.
matched      (the paper's parameter-matched layout) the total block count stays. The trunk is the
             first n_layers - n' pretrained blocks, the next-token head stays the pretrained last
             block, and every new head starts as a copy of that last block; the n' - n blocks just
             before the last one leave the model. Rationale: the last block is the one trained to
             feed the shared norm and unembedding, so it is the best starting point for every head
             (a middle block's output is not a prediction), and the blocks just before the last
             are the ones a pretrained model loses least by dropping (layer-pruning studies find the
             deep-but-not-last blocks the most redundant). The next-token path is shorter, so its
             output changes: this layout needs full fine-tuning (freeze="none").

Fewer heads than the model has (e.g. n = 4 -> n' = 1 before fine-tuning on a downstream task,
the paper's Fig. 4): the first n' heads are kept and the others dropped, which leaves the
next-token path unchanged (layout plus-layers; n_layers shrinks by the heads dropped). To keep
the heads but train only the next-token head, keep n and give loss weights 1,0,0,0 instead.
"""

from __future__ import annotations

import torch

from mtp.config import HEAD_TYPES, LAYOUTS, HeadGraph, ModelConfig, TrainConfig
from mtp.errors import MTPError
from mtp.model import MTPTransformer


def _block_keys(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def headed_config(cfg: ModelConfig, n_future: int, layout: str = "plus-layers",
                  head_type: str | None = None) -> ModelConfig:
    """The config `add_heads` gives a model of config `cfg`; MTPError for an impossible change."""
    n = cfg.n_future
    head_type = head_type or cfg.head_type
    if layout not in LAYOUTS:
        raise MTPError(f"unknown layout {layout!r}: use {' or '.join(LAYOUTS)}")
    if head_type not in HEAD_TYPES:
        raise MTPError(f"unknown head type {head_type!r}: use one of {', '.join(HEAD_TYPES)}")
    if not isinstance(n_future, int) or n_future < 1:
        raise MTPError(f"the number of heads must be an integer >= 1, got {n_future!r}")
    if n > 1 and head_type != cfg.head_type:
        raise MTPError(f"the model already has {n} {cfg.head_type} heads: cannot change them to {head_type} "
                       f"(only a one-head model takes a new head type)")
    graph = HeadGraph.of(head_type, n_future)
    if n_future != n and (graph.path_to(0) != [0] or HeadGraph.of(head_type, n).path_to(0) != [0]):
        raise MTPError("anticausal heads put the other heads in front of the next-token head, so adding or "
                       "removing them changes the next-token path: train such a model from scratch")
    if n_future < n and layout == "matched":
        raise MTPError(f"the matched layout only adds heads; to go from {n} to {n_future} heads use plus-layers "
                       "(drops the extra heads, next-token path unchanged)")
    if layout == "matched" and graph.is_linear:
        raise MTPError("linear heads add no transformer block, so there is nothing to match: use plus-layers")
    offsets = cfg.offsets
    if offsets is not None and n_future != n:
        if n_future > n:
            raise MTPError(f"the model's heads predict offsets {offsets}: adding heads to it is not supported")
        offsets = offsets[:n_future]
    if layout == "matched" or graph.is_linear:
        n_layers = cfg.n_layers
    else:
        n_layers = cfg.n_layers + n_future - n
    d = {**cfg.to_dict(), "n_future": n_future, "head_type": head_type, "n_layers": n_layers, "offsets": offsets}
    return ModelConfig.from_dict(d)


@torch.no_grad()
def add_heads(model: MTPTransformer, n_future: int, layout: str = "plus-layers",
              head_type: str | None = None) -> MTPTransformer:
    """A new model with n_future heads, initialised from `model` (left untouched); see the module
    docstring for the layouts. head_type=None keeps the model's own; a one-head model takes
    any head type but anticausal (whose next-token head reads the other heads). Parameters
    without a pretrained counterpart (a linear head's map: the identity; a sequential head's
    input projection and norms) are initialised as in a fresh model, from torch's RNG."""
    cfg = model.config
    new_cfg = headed_config(cfg, n_future, layout, head_type)
    ref = next(model.parameters())
    with torch.device(ref.device):
        new = MTPTransformer(new_cfg).to(ref.dtype)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    n_old_layers, n_new_layers = cfg.n_layer_blocks, new_cfg.n_layer_blocks
    last = n_old_layers - 1  # the next-token head block for a non-linear model (or a one-head one)
    # new `layers` index -> old `layers` index: the same blocks (plus-layers), or the first
    # n_new_layers - 1 trunk blocks and the old last block (matched)
    assert n_new_layers <= n_old_layers
    layer_map = {j: j for j in range(n_new_layers - 1)}
    layer_map[n_new_layers - 1] = last
    out: dict[str, torch.Tensor] = {}
    for key in new_sd:
        if key.startswith(("tok_embeddings.", "norm.", "output.")):
            out[key] = old_sd[key]
        elif key.startswith("layers."):
            j, rest = key[len("layers."):].split(".", 1)
            out[key] = old_sd[f"layers.{layer_map[int(j)]}.{rest}"]
    head_block = _block_keys(old_sd, f"layers.{last}.") if not new_cfg.head_graph.is_linear else {}
    for j in range(new_cfg.n_future - 1):
        prefix = f"extra_heads.{j}."
        own = _block_keys(new_sd, prefix)
        src = _block_keys(old_sd, prefix) if j < cfg.n_future - 1 else head_block  # kept, or a copy of head 0
        for rest, fresh in own.items():
            out[prefix + rest] = src.get(rest, fresh)  # no counterpart: the fresh init
    new.load_state_dict({k: v.clone() for k, v in out.items()})
    new.train(model.training)
    return new


def trainable_names(model: MTPTransformer, freeze: str) -> list[str]:
    """Names of the parameters that train under `freeze`: all of them ("none"), or ("trunk")
    those of the extra heads that are not on the next-token path."""
    names = [n for n, _ in model.named_parameters()]
    if freeze == "none":
        return names
    if freeze != "trunk":
        raise MTPError(f"unknown freeze mode {freeze!r}: use none or trunk")
    path = set(model.graph.path_to(0))
    heads = [f"extra_heads.{i - 1}." for i in range(1, model.config.n_future) if i not in path]
    return [n for n in names if n.startswith(tuple(heads))]


def check_freeze(cfg: ModelConfig, freeze: str) -> None:
    """MTPError (one line) when `freeze` leaves nothing to train in a model of config cfg."""
    if freeze == "none":
        return
    if freeze != "trunk":
        raise MTPError(f"unknown freeze mode {freeze!r}: use none or trunk")
    path = cfg.head_graph.path_to(0)
    if cfg.n_future == 1 or len(path) == cfg.n_future:
        why = ("it has one head" if cfg.n_future == 1 else
               f"its {cfg.head_type} heads all lie on the next-token path")
        raise MTPError(f"freezing the trunk leaves nothing to train: {why} (fine-tune it whole instead)")


def apply_freeze(model: MTPTransformer, freeze: str) -> list[str]:
    """Set requires_grad False on every parameter that does not train under `freeze` (see
    `trainable_names`); returns the trainable names. MTPError if nothing would train."""
    check_freeze(model.config, freeze)
    keep = set(trainable_names(model, freeze))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sorted(keep)


def init_model(tcfg: TrainConfig, device: torch.device | str = "cpu") -> tuple[MTPTransformer, object]:
    """(model, tokenizer) a fine-tuning run starts from: tcfg.init_from's weights and tokenizer,
    with its heads changed to tcfg.init_n_future (laid out by tcfg.init_layout, of type
    tcfg.init_head_type). MTPError for a combination the run cannot honour."""
    from mtp.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(tcfg.init_from, device)
    cfg = model.config
    n_future = tcfg.init_n_future if tcfg.init_n_future is not None else cfg.n_future
    head_type = tcfg.init_head_type or cfg.head_type
    if n_future != cfg.n_future or head_type != cfg.head_type:
        new_cfg = headed_config(cfg, n_future, tcfg.init_layout, head_type)
        if tcfg.freeze == "trunk" and new_cfg.n_layer_blocks < cfg.n_layer_blocks:
            raise MTPError("the matched layout changes the next-token path (the trunk loses blocks): it needs full "
                           "fine-tuning, not a frozen trunk")
        model = add_heads(model, n_future, tcfg.init_layout, head_type)
    if tcfg.init_draft_vocab is not None:
        set_draft_vocab(model, tokenizer, tcfg.init_draft_vocab, tcfg.corpus, tcfg.val_fraction)
    return model, tokenizer


def set_draft_vocab(model: MTPTransformer, tokenizer, n: int, corpus, val_fraction: float) -> list[int]:
    """Restrict the extra heads to the n most frequent tokens of the corpus's training split
    (ModelConfig.draft_vocab: mtp.losses trains them over those rows of the unembedding, and
    decoding drafts among them); returns the ids."""
    from mtp.decode.draft_vocab import corpus_draft_vocab

    if model.config.n_future < 2:
        raise MTPError("a draft vocabulary restricts the extra heads, but the model has one head")
    ids = corpus_draft_vocab(corpus, tokenizer, n, model.config.vocab_size, val_fraction)
    model.config.draft_vocab = ids
    model.config.validate()
    return ids


__all__ = ["add_heads", "apply_freeze", "check_freeze", "headed_config", "init_model", "set_draft_vocab",
           "trainable_names"]
