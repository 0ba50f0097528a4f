"""Typed configs with validation, and named presets.

`ModelConfig` describes the architecture (it is what `config.json` in a checkpoint holds);
`TrainConfig` describes one training run. Both validate on construction and raise `MTPError`
with one clear line for out-of-range values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from mtp.errors import MTPError

HEAD_TYPES = ("parallel", "linear", "causal", "anticausal", "sequential")
LAYOUTS = ("plus-layers", "matched")  # how fine-tuning adds heads (mtp.finetune.add_heads)
FREEZE_MODES = ("none", "trunk")


TRUNK = -1  # parent index meaning "the trunk's output"


def draft_vocab_problem(ids, vocab_size: int) -> str | None:
    """What is wrong with `ids` as a draft vocabulary of a vocab_size-token model (the ids the
    extra heads predict among), or None: checked by ModelConfig and by every decoder."""
    if len(ids) == 0 or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        return "must be a non-empty list of integer token ids"
    if min(ids) < 0 or max(ids) >= vocab_size:
        return f"ids must lie in [0, {vocab_size}), got {min(ids)}..{max(ids)}"
    if len(set(ids)) != len(ids):
        return "lists a token twice"
    return None


@dataclass(frozen=True)
class HeadGraph:
    """Which output each head reads, and what that means for the code that runs the heads (the
    model, the losses, the decoder, the parallel wrapper): the one place head types are told
    apart. Head i reads the output of head parents[i], or the trunk's (TRUNK)."""

    head_type: str
    parents: tuple[int, ...]

    @classmethod
    def of(cls, head_type: str, n: int) -> "HeadGraph":
        if head_type in ("causal", "sequential"):
            parents = (TRUNK, *range(n - 1))  # head i reads head i-1
        elif head_type == "anticausal":
            parents = (*range(1, n), TRUNK)  # the farthest head reads the trunk
        else:  # parallel, linear
            parents = (TRUNK,) * n
        return cls(head_type, parents)

    @functools.cached_property
    def order(self) -> tuple[int, ...]:
        """The heads in an order where each comes after the one it reads."""
        order, placed = [], {TRUNK}
        while len(order) < len(self.parents):
            for i, p in enumerate(self.parents):
                if i not in placed and p in placed:
                    order.append(i)
                    placed.add(i)
        return tuple(order)

    def path_to(self, head: int) -> list[int]:
        """The heads from the trunk to `head`, in the order they run (head 0: the next-token path)."""
        path = []
        while head != TRUNK:
            path.append(head)
            head = self.parents[head]
        return path[::-1]

    @property
    def is_linear(self) -> bool:
        """Heads are linear maps of the trunk's output (no transformer block; head 0: the identity)."""
        return self.head_type == "linear"

    @property
    def is_sequential(self) -> bool:
        """Head i also reads the embedding of token t + i, so heads draft one after another."""
        return self.head_type == "sequential" and len(self.parents) > 1

    @property
    def drafts_in_parallel(self) -> bool:
        """Every head's draft comes out of one pass (what a token tree and fused steps need)."""
        return not self.is_sequential


@dataclass
class ModelConfig:
    vocab_size: int = 257
    dim: int = 256
    n_layers: int = 6  # total transformer blocks, heads included (parameter-matched)
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    n_future: int = 1  # number of prediction heads (n in the paper)
    head_type: str = "parallel"
    offsets: list[int] | None = None  # token offset each head predicts; None = 1..n_future
    tie_embeddings: bool = False
    init_std: float = 0.02
    # the token ids the extra heads predict among (trained and drafting over these rows of the
    # unembedding only: mtp.losses, mtp.decode.draft_vocab); None = the whole vocabulary
    draft_vocab: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.offsets is not None and not isinstance(self.offsets, (list, tuple)):
            raise MTPError(f"invalid model config: offsets must be a list of integers, got {self.offsets!r}")
        if self.offsets is not None:
            self.offsets = list(self.offsets)
        if self.draft_vocab is not None and not isinstance(self.draft_vocab, (list, tuple)):
            raise MTPError(f"invalid model config: draft_vocab must be a list of token ids, got {self.draft_vocab!r}")
        if self.draft_vocab is not None:
            self.draft_vocab = list(self.draft_vocab)
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def head_graph(self) -> HeadGraph:
        return HeadGraph.of(self.head_type, self.n_future)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size, computed as in Meta's Llama / MTP release."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_offsets(self) -> list[int]:
        return list(self.offsets) if self.offsets is not None else list(range(1, self.n_future + 1))

    @property
    def n_layer_blocks(self) -> int:
        """Blocks in `layers` (trunk + next-token head, or the whole trunk for linear heads)."""
        if self.head_graph.is_linear:
            return self.n_layers
        return self.n_layers - self.n_future + 1

    @property
    def n_trunk(self) -> int:
        """Blocks shared by all heads."""
        return self.n_layer_blocks if self.head_graph.is_linear else self.n_layer_blocks - 1

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise MTPError(f"invalid model config: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0

        # types first: config.json is user input, and a string or a negative number must not
        # surface later as a shape error deep in the model
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len",
                     "n_future"):
            if not is_int(getattr(self, name)):
                bad(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not is_num(getattr(self, name)):
                bad(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.ffn_dim_multiplier is not None and not is_num(self.ffn_dim_multiplier):
            bad(f"ffn_dim_multiplier must be a positive number or null, got {self.ffn_dim_multiplier!r}")
        if not isinstance(self.tie_embeddings, bool):
            bad(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.offsets is not None and not all(is_int(o) for o in self.offsets):
            bad(f"offsets must be a list of integers, got {self.offsets!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_future < 1:
            bad(f"n_future must be >= 1, got {self.n_future}")
        if self.head_type not in HEAD_TYPES:
            bad(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}")
        graph = self.head_graph
        if not graph.is_linear and self.n_future > self.n_layers:
            bad(
                f"n_future={self.n_future} heads need at least {self.n_future} blocks, "
                f"but n_layers={self.n_layers}"
            )
        if self.dim % self.n_heads:
            bad(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            bad(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.offsets is not None:
            if len(self.offsets) != self.n_future:
                bad(f"{len(self.offsets)} offsets given for n_future={self.n_future}")
            if self.offsets[0] != 1:
                bad(f"the first head must predict the next token (offset 1), got offsets {self.offsets}")
            if any(b <= a for a, b in zip(self.offsets, self.offsets[1:])):
                bad(f"offsets must be strictly increasing, got {self.offsets}")
            if graph.is_sequential and self.offsets != list(range(1, self.n_future + 1)):
                bad("sequential heads predict consecutive tokens; offsets must be 1..n_future")
            if self.offsets[-1] >= self.max_seq_len:
                bad(f"offset {self.offsets[-1]} is not below max_seq_len={self.max_seq_len}")
        if self.draft_vocab is not None and (problem := draft_vocab_problem(self.draft_vocab, self.vocab_size)):
            bad(f"draft_vocab {problem}")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MTPError(f"invalid model config: unknown fields {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise MTPError(f"invalid model config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise MTPError(f"cannot read model config {path}: {e}") from None
        if not isinstance(d, dict):
            raise MTPError(f"model config {path} is not a JSON object")
        return cls.from_dict(d)


# Named layouts. vocab_size is set from the tokenizer at training time unless given.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=4, n_heads=4, max_seq_len=128, multiple_of=16),
    "small": dict(dim=256, n_layers=6, n_heads=8, max_seq_len=256, multiple_of=64),
    "gpt2-124m": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024, multiple_of=256),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, max_seq_len=2048, multiple_of=256),
    "1b": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, max_seq_len=2048, multiple_of=256),
    # Meta's released 7B multi-token models (params.json of facebook/multi-token-prediction).
    "7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, multiple_of=256, vocab_size=32000),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise MTPError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    args = dict(PRESETS[name])
    args.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**args)


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    out: str = "runs/mtp"
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # linear warmup steps; None = 5% of the steps (at least 1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    loss_weights: str = "uniform"
    memory_efficient: bool = True
    ce_chunk: int | None = None  # tokens per cross-entropy chunk; None = a 64M-logit budget
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    compile: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block) instead of data parallel
    activation_checkpointing: bool = False  # recompute each trunk block's activations in backward
    tokenizer: str | None = None  # None = byte-level
    val_fraction: float = 0.005
    # fine-tuning (mtp.finetune): start from a checkpoint's weights and tokenizer instead of a
    # random init, with its heads changed to init_n_future (None: kept) laid out by init_layout
    init_from: str | None = None
    init_n_future: int | None = None
    init_layout: str = "plus-layers"  # or "matched" (see mtp.finetune.add_heads)
    init_head_type: str | None = None  # head type of added heads; None = the checkpoint's
    # the extra heads train (and draft) over the N most frequent tokens of the training split
    # (ModelConfig.draft_vocab, stored in the new model's config); None: the checkpoint's own
    init_draft_vocab: int | None = None
    freeze: str = "none"  # "trunk": only the extra heads train (embeddings, trunk, next-token head,
    #                       norm and unembedding frozen; Medusa-1)
    extra_weight: float = 1.0  # lambda: the extra heads' loss weights are multiplied by it ...
    extra_weight_warmup: int = 0  # ... ramped linearly from 0 over this many steps (Medusa-2)
    log_grad_cosine: bool = False  # log the cosine of the heads' gradients at the trunk output
    # self-distillation of the extra heads (mtp.losses.Distill; needs freeze="trunk"): their loss is
    # (1 - distill_weight) * CE + distill_weight * KL(next-token head at t+o-1 / T || head)
    distill: bool = False
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # > 0 (needs freeze="trunk", one process): batches come from a fixed pool of this many training
    # windows, in epochs, and the frozen trunk's states are cached on disk (mtp.distill.TrunkCache)
    trunk_cache_windows: int = 0
    trunk_cache_dtype: str = "bfloat16"  # or float16, float32

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise MTPError(f"invalid training config: {msg}")

        if self.warmup is None:
            self.warmup = max(1, int(self.steps) // 20)
        if self.freeze not in FREEZE_MODES:
            bad(f"freeze must be one of {', '.join(FREEZE_MODES)}, got {self.freeze!r}")
        if self.init_layout not in LAYOUTS:
            bad(f"init_layout must be one of {', '.join(LAYOUTS)}, got {self.init_layout!r}")
        if self.init_head_type is not None and self.init_head_type not in HEAD_TYPES:
            bad(f"init_head_type must be one of {', '.join(HEAD_TYPES)}, got {self.init_head_type!r}")
        if self.init_draft_vocab is not None and (isinstance(self.init_draft_vocab, bool)
                                                  or not isinstance(self.init_draft_vocab, int)
                                                  or self.init_draft_vocab < 1):
            bad(f"init_draft_vocab must be an integer >= 1, got {self.init_draft_vocab!r}")
        if self.init_from is None and self.init_draft_vocab is not None:
            bad("init_draft_vocab needs init_from (the checkpoint whose heads it restricts)")
        if self.init_n_future is not None and int(self.init_n_future) < 1:
            bad(f"init_n_future must be >= 1, got {self.init_n_future}")
        if self.init_from is None and (self.init_n_future is not None or self.init_head_type is not None):
            bad("init_n_future and init_head_type need init_from (the checkpoint to start from)")
        if not (math.isfinite(self.extra_weight) and self.extra_weight >= 0):
            bad(f"extra_weight must be a finite number >= 0, got {self.extra_weight}")
        if self.extra_weight_warmup < 0:
            bad(f"extra_weight_warmup must be >= 0, got {self.extra_weight_warmup}")
        if self.log_grad_cosine and not self.memory_efficient:
            bad("log_grad_cosine needs the memory-efficient loss (not the naive one)")
        if self.distill and self.freeze != "trunk":
            bad("distill trains the extra heads towards the frozen model's own predictions: it needs freeze='trunk'")
        if not (math.isfinite(self.distill_weight) and 0 <= self.distill_weight <= 1):
            bad(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            bad(f"distill_temperature must be a finite number > 0, got {self.distill_temperature}")
        if int(self.trunk_cache_windows) < 0:
            bad(f"trunk_cache_windows must be >= 0 (0: no cache), got {self.trunk_cache_windows}")
        if self.trunk_cache_windows and self.freeze != "trunk":
            bad("trunk_cache_windows caches a frozen trunk's states: it needs freeze='trunk'")
        if self.trunk_cache_windows and not self.memory_efficient:
            bad("trunk_cache_windows needs the memory-efficient loss (not the naive one)")
        if self.trunk_cache_dtype not in ("bfloat16", "float16", "float32"):
            bad(f"trunk_cache_dtype must be bfloat16, float16 or float32, got {self.trunk_cache_dtype!r}")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            bad(f"grad_clip must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup < 0:
            bad(f"warmup must be >= 0, got {self.warmup}")
        for name in ("eval_every", "save_every"):  # 0: only at the end
            if int(getattr(self, name)) < 0:
                bad(f"{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            bad(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
