"""Checkpoints: a directory with model.safetensors, config.json, the tokenizer's files and, for
training, trainer_state.pt (loaded with weights_only=True).

Saving is atomic at the directory level: everything is written into a temporary sibling
directory and fsynced, then swapped in by rename. A crash at any point leaves either the old
checkpoint or the new one, never a mixture; `resolve_checkpoint` recovers the previous one if the
crash fell between the two renames of the swap.

A training run directory holds its latest checkpoint in `checkpoint/`; every command that takes
a checkpoint accepts the run directory or the checkpoint directory itself, and also a directory
of Meta's multi-token release (params.json + consolidated.*.pth, read by `mtp.interop.meta`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.model import MTPTransformer

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TRAINER_STATE = "model.safetensors", "config.json", "trainer_state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for a run directory or a checkpoint directory; MTPError if none."""
    p = Path(path)
    if not p.exists():
        raise MTPError(f"checkpoint not found: {p}")
    for cand in (p, p / "checkpoint", p / "checkpoint.old"):
        if (cand / CONFIG).is_file():
            return cand
    if _is_meta(p):
        return p
    raise MTPError(f"{p} is not a checkpoint (no {CONFIG} in it or in {p / 'checkpoint'}, "
                   f"and not a Meta release directory with params.json + consolidated.*.pth)")


def _is_meta(p: Path) -> bool:
    """A directory of Meta's release (see mtp.interop.meta), with no mtp config.json in it."""
    from mtp.interop.meta import is_meta_dir

    return not (p / CONFIG).is_file() and is_meta_dir(p)


def has_checkpoint(run_dir: str | Path) -> bool:
    p = Path(run_dir)
    return any((p / d / CONFIG).is_file() for d in ("checkpoint", "checkpoint.old"))


def save_checkpoint(
    directory: str | Path, model: MTPTransformer, tokenizer, *,
    trainer_state: dict | None = None, train_config: dict | None = None, step: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint into `directory` atomically (replacing any previous one there).
    `state_dict` (full, e.g. gathered from FSDP shards) is written instead of the model's own
    weights; the model then only supplies the config."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.exists():  # an earlier save died between its two renames
        os.replace(old, directory)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):  # debris of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if state_dict is None:
            save_model(model, str(tmp / WEIGHTS))  # deduplicates a tied unembedding
        else:
            _save_state_dict(state_dict, model.config, tmp / WEIGHTS)
        meta = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(),
                "train": train_config, "step": step}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if old.exists():  # only while `directory` holds a complete checkpoint (see above)
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    """The same file as save_model writes: a tied unembedding stored once, as output.weight."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    metadata = None
    if cfg.tie_embeddings:
        sd.pop("tok_embeddings.weight", None)
        metadata = {"tok_embeddings.weight": "output.weight"}
    save_file(sd, str(path), metadata=metadata)


def read_meta(path: str | Path) -> dict:
    """config.json of a checkpoint, validated: keys format_version, model (ModelConfig), train, step."""
    ckpt = resolve_checkpoint(path)
    if _is_meta(ckpt):
        from mtp.interop.meta import meta_config

        return {"format_version": None, "model": meta_config(ckpt), "train": None, "step": None, "path": ckpt,
                "source": "meta"}
    try:
        meta = json.loads((ckpt / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise MTPError(f"corrupt checkpoint {ckpt}: cannot read {CONFIG}: {e}") from None
    if isinstance(meta, dict) and "model_type" in meta and "format_version" not in meta:
        raise MTPError(f"{ckpt} is not a checkpoint but a Hugging Face model: convert it with `mtp convert hf`")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise MTPError(f"corrupt checkpoint {ckpt}: {CONFIG} has no model config")
    meta["model"] = ModelConfig.from_dict(meta["model"])
    meta["path"] = ckpt
    return meta


def inspect_checkpoint(path: str | Path):
    """(model on the meta device, tokenizer, meta) without reading the weights: the safetensors
    header is checked against the config (names, shapes, file size), so a truncated or
    mismatched file is still caught, but a 7B checkpoint costs no memory."""
    from safetensors import SafetensorError, safe_open

    from mtp.tokenizers import load_tokenizer

    if _is_meta(resolve_checkpoint(path)):
        from mtp.interop.meta import inspect_meta

        return inspect_meta(path)
    meta = read_meta(path)
    ckpt = meta["path"]
    with torch.device("meta"):
        model = _build(meta["model"], ckpt)
    try:
        with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MTPError(f"corrupt checkpoint {ckpt}: cannot load {WEIGHTS}: {str(e).splitlines()[0]}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # a tied unembedding is stored once, under either of its two names
    tied = {"output.weight", "tok_embeddings.weight"} if meta["model"].tie_embeddings else set()
    untied = {k: v for k, v in shapes.items() if k not in tied}
    if {k: v for k, v in expected.items() if k not in tied} != untied or (tied and len(shapes) == len(untied)):
        raise MTPError(f"checkpoint {ckpt}: {WEIGHTS} does not match its config (parameter names or shapes differ)")
    return model, load_tokenizer(ckpt), meta


def _build(cfg: ModelConfig, ckpt: Path) -> MTPTransformer:
    try:
        return MTPTransformer(cfg)
    except (RuntimeError, ValueError) as e:
        raise MTPError(f"checkpoint {ckpt}: cannot build its model: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Load (model, tokenizer, meta) from a run or checkpoint directory, or from a directory of
    Meta's release (its weights memory-mapped, in their stored dtype: see mtp.interop.meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from mtp.tokenizers import load_tokenizer

    if _is_meta(resolve_checkpoint(path)):
        from mtp.interop.meta import load_meta

        return load_meta(path, device)
    meta = read_meta(path)
    ckpt = meta["path"]
    model = _build(meta["model"], ckpt)
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise MTPError(f"corrupt checkpoint {ckpt}: {WEIGHTS} is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise MTPError(f"corrupt checkpoint {ckpt}: cannot load {WEIGHTS}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise MTPError(
            f"checkpoint {ckpt} does not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.to(device)
    return model, load_tokenizer(ckpt), meta


def load_trainer_state(path: str | Path) -> dict:
    ckpt = resolve_checkpoint(path)
    f = ckpt / TRAINER_STATE
    if not f.is_file():
        raise MTPError(f"checkpoint {ckpt} has no {TRAINER_STATE}: it cannot be resumed")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt pickle/zip
        raise MTPError(f"corrupt checkpoint {ckpt}: cannot load {TRAINER_STATE}: {str(e).splitlines()[0]}") from None
