"""What the commands share: the one-line-error parser, --json output, the options of the
training commands (`mtp train`, `mtp finetune`), --dtype, and loading a checkpoint to decode.

Every command that measures something takes --json: one JSON object on stdout, nothing else
there; progress and logs go to stderr. Bad input ends with one line on stderr and exit code 2
(an MTPError, printed by `mtp.cli.main`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtp.config import TrainConfig
from mtp.errors import MTPError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise MTPError(f"{self.prog}: {message}")


def emit(obj: dict, as_json: bool, text: str) -> None:
    """The command's result: the JSON object with --json, else the text, on stdout."""
    print(json.dumps(obj) if as_json else text)


def int_list(flag: str, s: str | None) -> list[int] | None:
    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise MTPError(f"{flag} must be comma-separated integers, got {s!r}") from None


# ---- training options ------------------------------------------------------------------------
# The training options of `mtp train` and `mtp finetune`: argparse dest == TrainConfig field,
# default None = TrainConfig's default (or, with --resume, the run's own value). `mtp train
# --resume` takes every one of them from the checkpoint when it is not given.
_D = TrainConfig()
TRAIN_FLAGS: dict[str, tuple[type, str | None]] = {
    "steps": (int, f"optimizer steps (default {_D.steps})"),
    "batch_size": (int, f"sequences per micro-batch and process (default {_D.batch_size})"),
    "grad_accum": (int, None),
    "seq_len": (int, "default: the model's max_seq_len"),
    "lr": (float, f"peak learning rate (default {_D.lr:g})"),
    "warmup": (int, "warmup steps (default 5%% of steps)"),
    "grad_clip": (float, f"largest global gradient norm (default {_D.grad_clip:g}; 0: no clipping)"),
    "weight_decay": (float, None),
    "loss_weights": (str, "uniform, main:L, geometric:G, nth, or w1,...,wn"),
    "eval_every": (int, None),
    "eval_batches": (int, None),
    "save_every": (int, None),
    "log_every": (int, None),
    "seed": (int, None),
    "val_fraction": (float, "held-out share of the corpus"),
}
del _D


def add_flags(group, flags: dict[str, tuple[type, str | None]]) -> None:
    """--name-with-dashes for each entry of a flag table like TRAIN_FLAGS, default None."""
    for name, (typ, help_) in flags.items():
        group.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)


def add_run_flags(group, fsdp_help: str) -> None:
    """The options of a training run that are not TrainConfig numbers: where it runs, how, and
    what happens to --out (shared by `mtp train` and `mtp finetune`)."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32, bfloat16")
    group.add_argument("--compile", action="store_true", help="torch.compile each block")
    group.add_argument("--fsdp", action="store_true", help=fsdp_help)
    group.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each trunk block's activations in the backward (less memory)")
    group.add_argument("--log-grad-cosine", action="store_true", help="log the cosine similarity of the heads' "
                       "gradients at the trunk output (metrics.jsonl: grad_cosine)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out")
    group.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out")
    group.add_argument("--no-progress", action="store_true")
    group.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def training_lines(what: str, res) -> list[str]:
    """The text summary of a finished training run (mtp.train.TrainResult)."""
    return [what,
            "held-out loss per head: " + ", ".join(f"{x:.4f}" for x in res.final_eval["loss"]),
            "held-out top-1 per head: " + ", ".join(f"{x:.3f}" for x in res.final_eval["acc"]),
            f"training throughput: {res.tokens_per_s:,.0f} tokens/s"]


# ---- decoding --------------------------------------------------------------------------------
PACK_WEIGHTS = {"auto": None, "on": True, "off": False}  # --pack-weights -> GenerationConfig.pack_weights


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that decode from a checkpoint (mtp generate, mtp bench)."""
    p.add_argument("checkpoint", help="a run directory or checkpoint directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: CUDA graphs on GPU; on CPU, C++ matrix kernels on the "
                        "weights frozen in (compiling takes 1-2 minutes per batch size and k, ~20 s in a later process: "
                        "inductor caches the graphs on disk)")
    p.add_argument("--pack-weights", choices=["auto", "on", "off"], default="auto",
                   help="CPU: linear layers compute with weights prepacked for oneDNN (one more copy of them in "
                        "memory) or mtp's rowdot kernel; auto: for models with >= 64 MiB of linear weights, each "
                        "product with the kernel (F.linear, packed, rowdot) measured fastest on this CPU for its "
                        "number of rows; on: every product packed; off: F.linear")
    p.add_argument("--tree", default=None, metavar="auto|SPEC",
                   help="verify a tree of the heads' top candidates per step instead of a chain (eager): auto "
                        "(chosen for this device from the heads' acceptance on held-out text and the step cost), "
                        "or rank paths like '0;1;0,0;0,1' (head 2's top two, head 3's top two after head 2's "
                        "first), or chain:D")
    p.add_argument("--tree-max-nodes", type=int, default=32, help="--tree auto: at most this many nodes")
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="greedy: prompt lookup beside the heads: a row whose last tokens occurred before in its "
                        "prompt or output is fed up to N tokens that followed them there instead of its heads' "
                        "drafts (with --speculative 1: prompt lookup alone); output as greedy. mtp bench: adds "
                        "these settings beside the chains")
    p.add_argument("--lookup-ngram", type=int, default=3, metavar="N",
                   help="--lookup: match the last N..2 tokens (default 3)")
    p.add_argument("--json", action="store_true")



def parse_dtype(name: str, device, allowed: tuple[str, ...] = ("float32", "bfloat16")):
    """--dtype NAME -> a torch dtype: "auto" follows mtp.distributed.resolve_dtype on `device`
    (bf16 on CUDA), or is None (keep the stored dtype) where device is None."""
    from mtp.distributed import resolve_dtype

    if name != "auto" and name not in allowed:
        *first, last = ("auto", *allowed)
        raise MTPError(f"unknown --dtype {name!r}: use {', '.join(first)} or {last}")
    return None if device is None and name == "auto" else resolve_dtype(device, name)


def load_for_decoding(args):
    """(model, tokenizer, meta) on the chosen device, in bf16 on CUDA unless --dtype says otherwise."""
    from mtp.checkpoint import load_checkpoint
    from mtp.distributed import pick_device

    device = pick_device(args.device)
    model, tok, meta = load_checkpoint(args.checkpoint, device)
    return model.to(parse_dtype(args.dtype, device)).eval(), tok, meta


def file_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """--prompts FILE (mtp generate, mtp bench): JSONL with a "prompt" (or "text") field per
    line, else one prompt per line; each encoded with the tokenizer's prompt convention."""
    p = Path(path)
    if not p.is_file():
        raise MTPError(f"prompt file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MTPError(f"cannot read prompt file {p}: {e}") from None
    texts = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
                text = row["prompt"] if "prompt" in row else row["text"]
                if not isinstance(text, str):
                    raise TypeError
                texts.append(text)
            except (ValueError, KeyError, TypeError):
                raise MTPError(f"{p}:{i + 1}: expected a JSON object with a 'prompt' or 'text' string field") from None
        else:
            texts.append(line)
    if not texts:
        raise MTPError(f"{p} holds no prompts")
    return [tokenizer.encode_prompt(t) for t in texts]


def tree_texts(args, tok, meta, context: int) -> list[list[int]]:
    """Held-out text to measure the heads' acceptance on, for --tree auto: 16 windows of the
    checkpoint's training corpus (or --corpus) held-out split."""
    from mtp.bench import corpus_prompts

    train_cfg = meta.get("train") or {}
    corpus = getattr(args, "corpus", None) or train_cfg.get("corpus") or ["stdlib"]
    return corpus_prompts(corpus, tok, 16, min(128, context - 1), train_cfg.get("val_fraction", 0.005))
