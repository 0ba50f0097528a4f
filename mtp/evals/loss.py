"""`mtp eval --task loss`: held-out loss, bits per byte and top-1 accuracy of every head.

The corpus is the checkpoint's own training corpus (its held-out split, by document, exactly as
training held it out) unless --corpus names another one; then the whole of that corpus' held-out
split is used the same way. Windows are spread evenly over the split (`mtp.data.eval_batches`).

Bits per byte make byte-level and BPE models comparable: head i's summed cross-entropy (nats)
over its targets, divided by ln 2 times the UTF-8 bytes those targets spell. Bytes are counted by
decoding each window's target tokens (end-of-text tokens spell nothing), so a character cut at a
window's edge can shift the count by a few bytes in a window: well under 1% at the usual lengths.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from mtp.data import build_token_data, check_tokens, default_cache_dir, eval_batches
from mtp.errors import MTPError
from mtp.losses import head_metrics


def _target_bytes(tokenizer, window: torch.Tensor, offset: int) -> int:
    """UTF-8 bytes spelled by the tokens a head with this offset predicts in each row."""
    total = 0
    for row in window[:, offset:].tolist():
        if hasattr(tokenizer, "decode_bytes"):
            total += len(tokenizer.decode_bytes(row))
        else:
            eot = getattr(tokenizer, "eot_id", None)
            total += len(tokenizer.decode([t for t in row if t != eot]).encode("utf-8"))
    return total


@torch.no_grad()
def evaluate(model, tokenizer, opts, meta: dict, progress: bool) -> dict:
    train_cfg = meta.get("train") or {}
    corpus = opts.corpus or train_cfg.get("corpus")
    if not corpus:
        raise MTPError("--task loss needs --corpus: the checkpoint does not record its training corpus")
    val_fraction = float(train_cfg.get("val_fraction", 0.005)) if not opts.corpus else 0.005
    seq_len = int(opts.extra.get("seq_len") or min(train_cfg.get("seq_len", 256), model.config.max_seq_len))
    if seq_len > model.config.max_seq_len:
        raise MTPError(f"--seq-len {seq_len} exceeds the model's context {model.config.max_seq_len}")
    data = build_token_data(list(corpus), tokenizer, default_cache_dir(), val_fraction, progress=progress)
    check_tokens(data.val, seq_len, f"the held-out split of {list(corpus)}")
    windows = opts.limit or 64
    device = next(model.parameters()).device
    offsets = model.config.head_offsets
    n = len(offsets)
    totals = {k: torch.zeros(n, dtype=torch.float64) for k in ("ce_sum", "correct", "count")}
    nbytes = [0] * n
    batches = list(eval_batches(data.val, opts.batch_size, seq_len, math.ceil(windows / opts.batch_size)))
    seen = 0
    for batch in tqdm(batches, desc="loss", unit="batch", disable=not progress, file=None):
        batch = batch[: windows - seen]
        seen += len(batch)
        m = head_metrics(model, batch.to(device))
        totals = {k: totals[k] + m[k] for k in m}
        for i, o in enumerate(offsets):
            nbytes[i] += _target_bytes(tokenizer, batch, o)
    count = totals["count"].clamp(min=1)
    loss = (totals["ce_sum"] / count).tolist()
    acc = (totals["correct"] / count).tolist()
    bpb = [float(totals["ce_sum"][i]) / (math.log(2) * max(nbytes[i], 1)) for i in range(n)]
    return {
        "metrics": {"loss": loss[0], "bits_per_byte": bpb[0], "top1": acc[0]},
        "per_head": {"offset": offsets, "loss": loss, "bits_per_byte": bpb, "top1": acc},
        "n_problems": seen,
        "n_samples": None,
        "details": {"corpus": list(corpus), "seq_len": seq_len, "tokens": int(totals["count"][0]),
                    "bytes": nbytes[0]},
    }
