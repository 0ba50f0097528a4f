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

Self-distillation (`Distill`, `mtp_loss_backward(..., distill=...)`): head i >= 1 (offset o) is
also trained towards the model's own next-token distribution for the token it predicts,
q = softmax(L0[t + o - 1] / temperature), where L0 are the next-token head's logits at position
t + o - 1 of the same window (detached: the teacher gets no gradient). Head i's objective becomes
(1 - weight) * CE(corpus) + weight * KL(q || softmax(L_i[t])); the student is at temperature 1
(what decoding uses), so no T^2 factor. The next-token head keeps its corpus loss. The teacher's
logits are recomputed chunk by chunk from its normalised hidden states inside the fused loss, so
at most one head's logits chunk and the teacher's chunk exist at a time.

A draft vocabulary (`ModelConfig.draft_vocab`: the N token ids the extra heads draft among when
decoding, mtp.decode.draft_vocab) restricts the extra heads' training the same way: head i >= 1
scores only those N rows of the unembedding, its corpus cross-entropy counts the targets inside
the draft vocabulary (a target outside it adds nothing; the mean still divides by all of the
head's targets, so no count has to be read back from the device), and its teacher is the
next-token head's distribution over the same N rows (the teacher's distribution conditioned on the
draft vocabulary). The heads' unembedding then costs N / V of the full one, forward and backward.
The next-token head always keeps the whole vocabulary.
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


@dataclass(frozen=True)
class Distill:
    """Self-distillation of the extra heads (see the module docstring): weight 1 trains them on
    the teacher alone, 0 on the corpus alone; temperature softens (> 1) or sharpens (< 1) the
    teacher's distribution."""

    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and 0 <= self.weight <= 1):
            raise MTPError(f"distillation weight must be in [0, 1], got {self.weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise MTPError(f"distillation temperature must be a finite number > 0, got {self.temperature}")


@dataclass
class LossOutput:
    loss: torch.Tensor  # weighted total (detached for the memory-efficient path)
    per_head: list[float]  # each head's mean cross-entropy (NaN for a zero-weight head, not computed)
    # (n, n) cosine similarity of the heads' gradients at the trunk output, on the device, NaN for
    # heads that do not read the trunk directly or get no gradient (mtp_loss_backward(grad_cosine=True))
    grad_cosine: torch.Tensor | None = None
    # with distillation: each head's mean KL(teacher || head) (NaN for head 0 and skipped heads);
    # a distilled head's term in `loss` is (1 - weight) * per_head[i] + weight * per_head_kl[i]
    per_head_kl: list[float] | None = None


def draft_rows(model: MTPTransformer, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's draft vocabulary as (ids (N,), remap (V,)): remap[token] is the token's row in
    ids, IGNORE outside it. None when the heads use the whole vocabulary."""
    ids = model.config.draft_vocab
    if ids is None:
        return None
    return _draft_rows(tuple(ids), model.config.vocab_size, str(device))


@functools.lru_cache(maxsize=4)
def _draft_rows(ids: tuple[int, ...], vocab_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.tensor(ids, dtype=torch.long, device=device)
    remap = torch.full((vocab_size,), IGNORE, dtype=torch.long, device=device)
    remap[idx] = torch.arange(len(ids), device=device)
    return idx, remap


def restrict_labels(labels: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Labels as rows of a draft vocabulary (draft_rows' remap): IGNORE outside it (and where
    they were IGNORE already)."""
    return torch.where(labels == IGNORE, labels, remap[labels.clamp(min=0)])


def naive_loss(model: MTPTransformer, window: torch.Tensor, weights: list[float],
               distill: Distill | None = None) -> LossOutput:
    """Reference: all heads' logits at once, one autograd graph. Call .loss.backward().
    With `distill`, the extra heads' terms mix in the KL to the (detached) next-token head's
    distribution at position t + offset - 1, from the full (B, T, V) logits. With a draft
    vocabulary, the extra heads' logits (and their teacher's) are those rows of the full ones."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)  # (B, T, n)
    logits = model(x, return_all_heads=True)  # (B, T, n, V)
    rows = draft_rows(model, x.device)
    counts = (labels != IGNORE).sum(dim=(0, 1)).clamp(min=1)  # (n,)
    sums = []  # each head's CE sum: head 0 over the whole vocabulary, the others over the draft rows
    for i in range(labels.shape[-1]):
        li, lab = logits[:, :, i].float(), labels[:, :, i]
        if rows is not None and i > 0:
            li, lab = li[..., rows[0]], restrict_labels(lab, rows[1])
        sums.append(F.cross_entropy(li.flatten(0, 1), lab.flatten(), ignore_index=IGNORE, reduction="sum"))
    per_head = torch.stack(sums) / counts  # (n,) mean CE of each head
    if distill is None:
        total = (per_head * torch.tensor(weights, device=per_head.device)).sum()
        return LossOutput(total, per_head.detach().tolist())
    T = x.shape[1]
    teacher = logits[:, :, 0].detach().float()  # (B, T, V) next-token logits
    total = weights[0] * per_head[0]
    kls = [torch.tensor(float("nan"))]
    for i, o in enumerate(model.config.head_offsets[1:], start=1):
        if o > T:
            kls.append(torch.tensor(float("nan")))
            continue
        t_i, s_i = teacher[:, o - 1 :], logits[:, : T - o + 1, i].float()
        if rows is not None:
            t_i, s_i = t_i[..., rows[0]], s_i[..., rows[0]]
        q_log = F.log_softmax(t_i / distill.temperature, dim=-1)  # (B, T - o + 1, V)
        p_log = F.log_softmax(s_i, dim=-1)
        kl = (q_log.exp() * (q_log - p_log)).sum(-1).mean()
        kls.append(kl.detach())
        total = total + weights[i] * ((1 - distill.weight) * per_head[i] + distill.weight * kl)
    return LossOutput(total, per_head.detach().tolist(), per_head_kl=[float(k) for k in kls])


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


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (c, V) tensors without a (c, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _soft_ce_chunk(zc: torch.Tensor, zt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                   kl_valid: torch.Tensor, mix: torch.Tensor, inv_temp: torch.Tensor, scale: torch.Tensor):
    """One chunk of the distilled loss: student logits zc @ w.T, teacher logits zt @ w.T.
    Returns (CE sum against the labels, KL(q || p) sum over the kl_valid rows, gradient of
    scale * sum((1 - mix) * CE + mix * KL) with respect to the student logits). Two (c, V)
    tensors live at a time: the student's logits (then gradient) and the teacher's q."""
    cf = (labels != IGNORE).float()  # rows with a corpus target
    vf = kl_valid.float()  # rows with a teacher (all of them but past the window's end)
    safe = labels.clamp(min=0)
    t = (zt @ w.T).float().mul_(inv_temp)  # (c, V) teacher logits / T
    lse_t = torch.logsumexp(t, dim=-1)  # (c,)
    q = torch.sub(t, lse_t[:, None]).exp_()  # (c, V) softmax(teacher / T)
    neg_ent = _rowdot(q, t) - lse_t  # sum_v q log q
    del t  # freed before the student's logits exist: two (c, V) blocks at a time
    logits = (zc @ w.T).float()  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    ce_sum = ((lse - picked) * cf).sum()
    kl_sum = ((neg_ent - _rowdot(q, logits) + lse) * vf).sum()  # sum q log q - sum q log p
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.mul_(((1 - mix) * cf + mix * vf)[:, None])  # each term's share of the softmax
    grad.sub_(q.mul_((mix * vf)[:, None]))  # - mix * q
    grad.scatter_add_(1, safe[:, None], -(1 - mix) * cf[:, None])  # - (1 - mix) * onehot
    grad.mul_(scale)
    return ce_sum, kl_sum, grad.to(zc.dtype)


@functools.cache
def _compiled_soft_ce_chunk():
    return torch.compile(_soft_ce_chunk, dynamic=False)


def fused_linear_distill_loss(
    z: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float,
    distill: Distill, chunk: int | None = None, compute_dtype: torch.dtype | None = None, compile: bool = False,
    dweight: torch.Tensor | None = None, input_grad: bool = True, weight_grad: bool = True,
    kl_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """fused_linear_cross_entropy with soft targets: teacher (N, D) holds the normalised hidden
    states whose logits (teacher @ weight.T, divided by the temperature) give row r's target
    distribution, aligned with z's rows. Returns (CE sum, KL sum, dz, dweight) of
    scale * sum((1 - w) * CE + w * KL), chunk by chunk: at most one (chunk, V) block of student
    logits and one of teacher probabilities exist at a time. The teacher gets no gradient.
    kl_valid (N,) bool: the rows with a teacher (default: those whose label is not IGNORE; a
    draft vocabulary ignores labels outside it but keeps their teacher)."""
    cdt = compute_dtype or z.dtype
    chunk = chunk or min(default_chunk(weight.shape[0]), max(1, -(-z.shape[0] // 2)))
    w = weight.detach().to(cdt)
    teacher = teacher.detach()
    dz = torch.empty_like(z) if input_grad else None
    dw = None
    if weight_grad:
        dw = dweight if dweight is not None else torch.zeros(weight.shape, dtype=torch.float32, device=z.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=z.device)
    kl_sum = torch.zeros((), dtype=torch.float32, device=z.device)
    f32 = dict(dtype=torch.float32, device=z.device)
    mix, inv_temp, scale_t = (torch.tensor(v, **f32) for v in (distill.weight, 1 / distill.temperature, scale))
    step = _compiled_soft_ce_chunk() if compile else _soft_ce_chunk
    kl_valid = labels != IGNORE if kl_valid is None else kl_valid
    with torch.autocast(z.device.type, enabled=False):
        for s in range(0, z.shape[0], chunk):
            zc = z[s : s + chunk].to(cdt)
            ce, kl, g = step(zc, teacher[s : s + chunk].to(cdt), w, labels[s : s + chunk], kl_valid[s : s + chunk],
                             mix, inv_temp, scale_t)
            ce_sum += ce
            kl_sum += kl
            if dz is not None:
                dz[s : s + chunk] = (g @ w).to(z.dtype)
            if dw is not None:
                dw += (g.T @ zc).float()
    return ce_sum, kl_sum, dz, dw


def teacher_states(model: MTPTransformer, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The next-token head's hidden output (before the shared norm) on trunk output h, without
    gradient: the self-distillation teacher's states (B, T, D)."""
    with torch.no_grad():
        for i in model.graph.path_to(0):
            h = model.run_head(i, h, tokens)
    return h


def shift_teacher(zt: torch.Tensor, offset: int) -> torch.Tensor:
    """Teacher rows aligned with a head of the given offset: row t holds zt[t + offset - 1],
    zeros where that lies past the window. zt (B, T, D) -> (B, T, D)."""
    if offset == 1:
        return zt
    out = torch.zeros_like(zt)
    T = zt.shape[1]
    if offset <= T:
        out[:, : T - offset + 1] = zt[:, offset - 1 :]
    return out


def mtp_loss_backward(
    model: MTPTransformer, window: torch.Tensor, weights: list[float], *,
    chunk: int | None = None, grad_scale: float = 1.0, compute_dtype: torch.dtype | None = None,
    compile_ce: bool = False, on_backward: Callable[[int], None] | None = None, grad_cosine: bool = False,
    distill: Distill | None = None, trunk_out: torch.Tensor | None = None,
    teacher_out: torch.Tensor | None = None,
) -> LossOutput:
    """Memory-efficient loss: computes the loss and accumulates grad_scale * d loss / d params
    into .grad (so it composes with gradient accumulation). Same result as naive_loss.
    compile_ce=True compiles the per-chunk cross-entropy (use it with compiled blocks).
    on_backward(i) is called just before head i's backward and on_backward(TRUNK) just before
    the trunk's (FSDP switches gradient reduction on there: mtp.parallel). The unembedding's
    gradient is complete, in .grad, before the trunk's backward starts.
    grad_cosine=True also returns the pairwise cosine similarity of the gradients that the heads
    reading the trunk output send to it (LossOutput.grad_cosine, on the device: no host sync).
    distill: self-distill the extra heads (module docstring; same result as naive_loss(distill=)).
    trunk_out / teacher_out: the trunk's output (B, T, D) and the next-token head's hidden output
    for this window, already computed (a cache of a frozen model: mtp.distill.TrunkCache); they
    replace the trunk's forward and the teacher's. Only for a frozen trunk."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)
    graph = model.graph
    n = len(graph.parents)
    children: dict[int, list[int]] = {TRUNK: []}
    for i, p in enumerate(graph.parents):
        children.setdefault(p, []).append(i)
    # heads that matter: a positive weight, or a descendant with one
    needed = [False] * n
    for i in reversed(graph.order):
        needed[i] = weights[i] > 0 or any(needed[c] for c in children.get(i, []))

    out_weight = model.output.weight
    out_trains = out_weight.requires_grad
    trunk_trains = model.tok_embeddings.weight.requires_grad or any(
        p.requires_grad for block in model.trunk_blocks for p in block.parameters())
    w_compute = out_weight.detach().to(compute_dtype or out_weight.dtype)  # cast once for all heads
    dw_total = torch.zeros(out_weight.shape, dtype=torch.float32, device=out_weight.device) if out_trains else None
    rows = draft_rows(model, out_weight.device)  # the extra heads' draft vocabulary, or None
    w_draft = None if rows is None else w_compute.index_select(0, rows[0])  # (N, D), once for all heads
    # every window token is a real token, so head i has B * (T - offset_i + 1) targets (no sync)
    B, T = x.shape
    n_valid_by_head = [B * max(T - o + 1, 0) for o in model.config.head_offsets]
    ce_means: dict[int, torch.Tensor] = {}
    kl_means: dict[int, torch.Tensor] = {}
    if trunk_out is not None and trunk_trains:
        raise MTPError("a precomputed trunk output needs a frozen trunk (its parameters get no gradient)")
    z_teacher = None  # the teacher's normalised states (B, T, D), computed once the trunk has run

    def head_ce_grad(i: int, out: torch.Tensor) -> torch.Tensor | None:
        """CE of head i on its hidden output: backward through the shared norm; returns d/d out
        (None when nothing before `out` trains)."""
        if weights[i] == 0:  # a head only run because a later head reads it: no loss of its own
            return None
        lab = labels[:, :, i].reshape(-1).contiguous()  # same strides for every head (no recompiles)
        n_valid = n_valid_by_head[i]
        out_d = out.detach().requires_grad_(out.requires_grad)
        z = model.norm(out_d)  # (B, T, D)
        restricted = rows is not None and i > 0
        w_i = w_draft if restricted else w_compute
        kl_valid = lab != IGNORE  # every target's position has a teacher, inside the draft vocabulary or not
        if restricted:  # the draft vocabulary's rows: labels renumbered, the weight's gradient scattered back
            lab = restrict_labels(lab, rows[1])
        common = dict(scale=weights[i] * grad_scale / max(n_valid, 1), chunk=chunk, compute_dtype=compute_dtype,
                      compile=compile_ce, dweight=None if restricted else dw_total, input_grad=z.requires_grad,
                      weight_grad=out_trains)
        if distill is not None and i > 0:
            zt = shift_teacher(z_teacher, model.config.head_offsets[i])
            ce_sum, kl_sum, dz, dw = fused_linear_distill_loss(
                z.detach().reshape(-1, z.shape[-1]), zt.reshape(-1, zt.shape[-1]), w_i, lab,
                distill=distill, kl_valid=kl_valid, **common)
            kl_means[i] = kl_sum / max(n_valid, 1)
        else:
            ce_sum, dz, dw = fused_linear_cross_entropy(z.detach().reshape(-1, z.shape[-1]), w_i, lab, **common)
        if restricted and dw is not None:
            dw_total.index_add_(0, rows[0], dw)
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

    if trunk_out is not None:
        h = trunk_out.to(out_weight.dtype)  # (B, T, D), from a cache
    else:
        with nullcontext() if trunk_trains else torch.no_grad():  # a frozen trunk keeps no activations
            h = model.trunk(x)  # (B, T, D)
    if distill is not None:
        t_out = teacher_states(model, h, x) if teacher_out is None else teacher_out.to(out_weight.dtype)
        with torch.no_grad():
            z_teacher = model.norm(t_out)  # (B, T, D)
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
    nan = torch.tensor(float("nan"), device=x.device)
    means = torch.stack([ce_means.get(i, nan) for i in range(n)] + [kl_means.get(i, nan) for i in range(n)])
    flat = means.tolist()
    per_head, per_kl = flat[:n], flat[n:]
    if distill is None:
        total = sum(w * m for w, m in zip(weights, per_head) if w > 0)
        return LossOutput(torch.tensor(total), per_head, cosine)
    terms = [per_head[0]] + [(1 - distill.weight) * c + distill.weight * k for c, k in zip(per_head[1:], per_kl[1:])]
    total = sum(w * m for w, m in zip(weights, terms) if w > 0)
    return LossOutput(torch.tensor(total), per_head, cosine, per_kl)


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
    Returns tensors of shape (n,) under keys ce_sum, correct, count. With a draft vocabulary the
    extra heads predict among its tokens (a target outside it is never correct and adds nothing
    to ce_sum, as in training), and count still counts every target."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)
    outs = model.heads_hidden(model.trunk(x), x)
    n = len(outs)
    chunk = chunk or default_chunk(model.config.vocab_size)
    rows = draft_rows(model, x.device)
    ce_sum, correct, count = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    for i, out in enumerate(outs):
        z = model.norm(out).reshape(-1, out.shape[-1])
        lab = labels[:, :, i].reshape(-1)
        weight = model.output.weight
        if rows is not None and i > 0:
            weight, lab_r = weight[rows[0]], restrict_labels(lab, rows[1])
        else:
            lab_r = lab
        for s in range(0, z.shape[0], chunk):
            logits = F.linear(z[s : s + chunk], weight).float()
            lc, lr = lab[s : s + chunk], lab_r[s : s + chunk]
            ce_sum[i] += float(F.cross_entropy(logits, lr, ignore_index=IGNORE, reduction="sum"))
            correct[i] += float(((logits.argmax(-1) == lr) & (lr != IGNORE)).sum())
            count[i] += float((lc != IGNORE).sum())
    return {"ce_sum": ce_sum, "correct": correct, "count": count}
