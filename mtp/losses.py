"""Multi-token targets, head weighting, and the memory-efficient forward/backward.

The loss is sum_i w_i * CE_i, where CE_i is head i's mean cross-entropy over the positions
whose target (the token `offset_i` ahead) lies inside the window. Positions past the end are
ignored, never wrapped.

`naive_loss` materialises every head's logits at once (B, T, n, V) and is the reference.
`mtp_loss_backward` computes the same loss and gradients with at most one head's activations and
one chunk of logits alive at a time: the trunk runs forward once, each head runs forward and
backward in turn with the gradient accumulating at the trunk output, the cross-entropy is fused
with the unembedding and chunked over tokens (a full (B*T, V) logit tensor never exists), and the
trunk runs backward once.

Frozen parameters (requires_grad False, e.g. a fine-tuning run that trains only the extra heads)
get no gradient: the trunk runs under no_grad when none of its parameters trains, a head whose
input and parameters all are frozen runs no backward, and the unembedding's gradient is neither
computed nor written when it is frozen.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtp.errors import MTPError
from mtp.model import TRUNK, MTPTransformer

IGNORE = -100


# ---- head weighting -----------------------------------------------------------------------
def parse_loss_weights(spec: str, n: int) -> list[float]:
    """Per-head weights from a spec string.

    uniform          every head weight 1 (the paper)
    main[:LAMBDA]    next-token head 1, the others LAMBDA / (n - 1) each, i.e.
                     main + LAMBDA * mean(extra) (DeepSeek-V3 / Megatron; default LAMBDA 0.3)
    geometric[:G]    head i gets G**i (default G 0.5)
    nth              only the next-token head and the farthest head (weight 1 each)
    w1,w2,...,wn     explicit weights, one per head
    """
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    try:
        if name == "uniform" and not arg:
            weights = [1.0] * n
        elif name == "main":
            lam = float(arg) if arg else 0.3
            weights = [1.0] + [lam / (n - 1)] * (n - 1) if n > 1 else [1.0]
        elif name == "geometric":
            g = float(arg) if arg else 0.5
            weights = [g**i for i in range(n)]
        elif name == "nth" and not arg:
            weights = [1.0] + [0.0] * (n - 2) + [1.0] if n > 1 else [1.0]
        else:
            weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise MTPError(f"invalid loss weights {spec!r}: expected uniform, main:L, geometric:G, nth or a list") from None
    if len(weights) != n:
        raise MTPError(f"loss weights {spec!r} give {len(weights)} weights for {n} heads")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise MTPError(f"loss weights {spec!r} must be finite and >= 0 with a positive sum, got {weights}")
    return weights


def multi_token_targets(window: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Labels for every head from one token row.

    window (B, T + 1): the model reads window[:, :T]; head i at position t predicts
    window[:, t + offsets[i]]. Returns (B, T, n) with IGNORE where t + offset > T."""
    B, T1 = window.shape
    T = T1 - 1
    labels = torch.full((B, T, len(offsets)), IGNORE, dtype=torch.long, device=window.device)
    for i, o in enumerate(offsets):
        if o <= T:
            labels[:, : T - o + 1, i] = window[:, o:]
    return labels


@dataclass
class LossOutput:
    loss: torch.Tensor  # weighted total (detached for the memory-efficient path)
    per_head: list[float]  # each head's mean cross-entropy (NaN for a zero-weight head, not computed)
    # (n, n) cosine similarity of the heads' gradients at the trunk output, on the device, NaN for
    # heads that do not read the trunk directly or get no gradient (mtp_loss_backward(grad_cosine=True))
    grad_cosine: torch.Tensor | None = None


def naive_loss(model: MTPTransformer, window: torch.Tensor, weights: list[float]) -> LossOutput:
    """Reference: all heads' logits at once, one autograd graph. Call .loss.backward()."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)  # (B, T, n)
    logits = model(x, return_all_heads=True)  # (B, T, n, V)
    ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    counts = (labels != IGNORE).sum(dim=(0, 1)).clamp(min=1)  # (n,)
    per_head = ce.view(labels.shape).sum(dim=(0, 1)) / counts  # (n,) mean CE of each head
    total = (per_head * torch.tensor(weights, device=per_head.device)).sum()
    return LossOutput(total, per_head.detach().tolist())


# ---- fused unembedding + cross-entropy, chunked over tokens -----------------------------------
LOGITS_PER_CHUNK = 2**26  # 64M logits (256 MB in float32) per chunk when no chunk size is given


def default_chunk(vocab_size: int) -> int:
    """Tokens per cross-entropy chunk: a fixed logit budget, so a small vocabulary takes few
    chunks (few kernel launches) and a large one stays within the same memory."""
    return max(128, LOGITS_PER_CHUNK // vocab_size)


def _ce_chunk(zc: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """One chunk: CE sum of logits = zc @ w.T, and the gradient of scale * CE sum with respect
    to the logits (in zc's dtype). scale is a 0-d tensor so that a compiled version of this
    function is not specialised on its value."""
    logits = (zc @ w.T).float()  # (c, V)
    valid = labels != IGNORE
    safe = labels.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    ce_sum = ((lse - picked) * valid).sum()
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe[:, None], -valid[:, None].float())
    grad.mul_(valid[:, None].float() * scale)  # d(scale * ce_sum) / d logits
    return ce_sum, grad.to(zc.dtype)


@functools.cache
def _compiled_ce_chunk():
    """_ce_chunk compiled: the softmax / gradient element-wise passes fuse into few kernels."""
    return torch.compile(_ce_chunk, dynamic=False)


def fused_linear_cross_entropy(
    z: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float, chunk: int | None = None,
    compute_dtype: torch.dtype | None = None, compile: bool = False, dweight: torch.Tensor | None = None,
    input_grad: bool = True, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum of CE(z @ weight.T, labels) and the gradients of scale * that sum, chunk by chunk.

    z (N, D) normalised hidden states, weight (V, D), labels (N,) with IGNORE.
    Returns (ce_sum float32 scalar, dz (N, D) in z's dtype, dweight (V, D) float32); a given
    float32 `dweight` buffer is accumulated into and returned. At most (chunk, V) logits exist
    at a time. compile=True runs each chunk through torch.compile (same result).
    input_grad=False / weight_grad=False skip dz / dweight (returned as None): a frozen input
    or unembedding costs no matmul."""
    cdt = compute_dtype or z.dtype
    # by default at least two chunks, so that the full (N, V) logits never exist at once
    chunk = chunk or min(default_chunk(weight.shape[0]), max(1, -(-z.shape[0] // 2)))
    w = weight.detach().to(cdt)  # no copy when the caller passes it in the compute dtype
    dz = torch.empty_like(z) if input_grad else None
    dw = None
    if weight_grad:
        dw = dweight if dweight is not None else torch.zeros(weight.shape, dtype=torch.float32, device=z.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=z.device)
    scale_t = torch.tensor(scale, dtype=torch.float32, device=z.device)
    step = _compiled_ce_chunk() if compile else _ce_chunk
    with torch.autocast(z.device.type, enabled=False):
        for s in range(0, z.shape[0], chunk):
            zc = z[s : s + chunk].to(cdt)
            ce, g = step(zc, w, labels[s : s + chunk], scale_t)
            ce_sum += ce
            if dz is not None:
                dz[s : s + chunk] = (g @ w).to(z.dtype)
            if dw is not None:
                dw += (g.T @ zc).float()
    return ce_sum, dz, dw


def mtp_loss_backward(
    model: MTPTransformer, window: torch.Tensor, weights: list[float], *,
    chunk: int | None = None, grad_scale: float = 1.0, compute_dtype: torch.dtype | None = None,
    compile_ce: bool = False, on_backward: Callable[[int], None] | None = None, grad_cosine: bool = False,
) -> LossOutput:
    """Memory-efficient loss: computes the loss and accumulates grad_scale * d loss / d params
    into .grad (so it composes with gradient accumulation). Same result as naive_loss.
    compile_ce=True compiles the per-chunk cross-entropy (use it with compiled blocks).
    on_backward(i) is called just before head i's backward and on_backward(TRUNK) just before
    the trunk's (FSDP switches gradient reduction on there: mtp.parallel). The unembedding's
    gradient is complete, in .grad, before the trunk's backward starts.
    grad_cosine=True also returns the pairwise cosine similarity of the gradients that the heads
    reading the trunk output send to it (LossOutput.grad_cosine, on the device: no host sync)."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)
    n = len(model.parents)
    children: dict[int, list[int]] = {TRUNK: []}
    for i, p in enumerate(model.parents):
        children.setdefault(p, []).append(i)
    # heads that matter: a positive weight, or a descendant with one
    needed = [False] * n
    for i in reversed(model.head_order):
        needed[i] = weights[i] > 0 or any(needed[c] for c in children.get(i, []))

    out_weight = model.output.weight
    out_trains = out_weight.requires_grad
    trunk_trains = model.tok_embeddings.weight.requires_grad or any(
        p.requires_grad for block in model.trunk_blocks for p in block.parameters())
    w_compute = out_weight.detach().to(compute_dtype or out_weight.dtype)  # cast once for all heads
    dw_total = torch.zeros(out_weight.shape, dtype=torch.float32, device=out_weight.device) if out_trains else None
    # every window token is a real token, so head i has B * (T - offset_i + 1) targets (no sync)
    B, T = x.shape
    n_valid_by_head = [B * max(T - o + 1, 0) for o in model.config.head_offsets]
    ce_means: dict[int, torch.Tensor] = {}

    def head_ce_grad(i: int, out: torch.Tensor) -> torch.Tensor | None:
        """CE of head i on its hidden output: backward through the shared norm; returns d/d out
        (None when nothing before `out` trains)."""
        if weights[i] == 0:  # a head only run because a later head reads it: no loss of its own
            return None
        lab = labels[:, :, i].reshape(-1).contiguous()  # same strides for every head (no recompiles)
        n_valid = n_valid_by_head[i]
        out_d = out.detach().requires_grad_(out.requires_grad)
        z = model.norm(out_d)  # (B, T, D)
        ce_sum, dz, _ = fused_linear_cross_entropy(
            z.detach().reshape(-1, z.shape[-1]), w_compute, lab,
            scale=weights[i] * grad_scale / max(n_valid, 1), chunk=chunk, compute_dtype=compute_dtype,
            compile=compile_ce, dweight=dw_total, input_grad=z.requires_grad, weight_grad=out_trains,
        )
        ce_means[i] = ce_sum / max(n_valid, 1)  # stays on the device: no host sync per head
        if z.requires_grad:  # the shared norm's weight and/or the head's output
            torch.autograd.backward(z, dz.view_as(z))
        return out_d.grad

    def visit(i: int, inp: torch.Tensor) -> torch.Tensor | None:
        """Forward head i (and its subtree), backward it; returns the gradient at its input."""
        inp_d = inp.detach().requires_grad_(inp.requires_grad)
        out = model.run_head(i, inp_d, x)  # (B, T, D)
        grads = [head_ce_grad(i, out)]
        grads += [visit(c, out) for c in children.get(i, []) if needed[c]]
        grads = [g for g in grads if g is not None]
        if not grads or not out.requires_grad:  # nothing trains before this head's output
            return None
        if on_backward is not None:
            on_backward(i)
        torch.autograd.backward(out, sum(grads))
        return inp_d.grad

    with nullcontext() if trunk_trains else torch.no_grad():  # a frozen trunk keeps no activations
        h = model.trunk(x)  # (B, T, D)
    trunk_heads = [c for c in children[TRUNK] if needed[c]]
    by_head = {c: visit(c, h) for c in trunk_heads}
    trunk_grads = [g for g in by_head.values() if g is not None]
    if out_trains:
        if out_weight.grad is None:
            out_weight.grad = dw_total.to(out_weight.dtype)
        else:
            out_weight.grad += dw_total.to(out_weight.dtype)
    cosine = _grad_cosine(by_head, n, h) if grad_cosine else None
    if on_backward is not None:
        on_backward(TRUNK)
    if trunk_grads:
        torch.autograd.backward(h, sum(trunk_grads))
    # heads with zero weight report NaN (their loss is not computed); one host sync here
    means = torch.stack([ce_means.get(i, torch.tensor(float("nan"), device=x.device)) for i in range(n)])
    per_head = means.tolist()
    total = sum(w * m for w, m in zip(weights, per_head) if w > 0)
    return LossOutput(torch.tensor(total), per_head, cosine)


def _grad_cosine(by_head: dict[int, torch.Tensor | None], n: int, h: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarity of the gradients at the trunk output, float32, NaN where a head
    has no gradient there. Every head's gradient is flattened over batch, positions and
    features (one vector per head)."""
    cos = torch.full((n, n), float("nan"), dtype=torch.float32, device=h.device)
    heads = [i for i, g in by_head.items() if g is not None]
    if heads:
        G = torch.stack([by_head[i].reshape(-1).float() for i in heads])  # (k, B*T*D)
        gram = G @ G.T  # (k, k)
        norms = gram.diagonal().sqrt().clamp(min=1e-30)
        idx = torch.tensor(heads, device=h.device)
        cos[idx[:, None], idx[None, :]] = gram / (norms[:, None] * norms[None, :])
    return cos


# ---- held-out metrics ---------------------------------------------------------------------
@torch.no_grad()
def head_metrics(model: MTPTransformer, window: torch.Tensor, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Per-head sums over one batch: cross-entropy, correct top-1 predictions, counted targets.
    Returns tensors of shape (n,) under keys ce_sum, correct, count."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)
    outs = model.heads_hidden(model.trunk(x), x)
    n = len(outs)
    chunk = chunk or default_chunk(model.config.vocab_size)
    ce_sum, correct, count = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    for i, out in enumerate(outs):
        z = model.norm(out).reshape(-1, out.shape[-1])
        lab = labels[:, :, i].reshape(-1)
        for s in range(0, z.shape[0], chunk):
            logits = model.output(z[s : s + chunk]).float()
            lc = lab[s : s + chunk]
            valid = lc != IGNORE
            ce = F.cross_entropy(logits, lc, ignore_index=IGNORE, reduction="sum")
            ce_sum[i] += float(ce)
            correct[i] += float(((logits.argmax(-1) == lc) & valid).sum())
            count[i] += float(valid.sum())
    return {"ce_sum": ce_sum, "correct": correct, "count": count}
