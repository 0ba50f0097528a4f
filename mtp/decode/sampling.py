"""Distributions and acceptance rules: what a decode step keeps of the drafts it verified.

- Greedy (`greedy_accept`): a draft is accepted when it equals the verifier's argmax, so the
  output is token for token the model's greedy output.
- Sampling (`accept`): speculative sampling (Leviathan et al. 2023, Chen et al. 2023) with the
  heads' distributions as the proposal q: accept draft x with probability min(1, p(x) / q(x)),
  else sample from the normalised residual max(p - q, 0) (`residual_distribution`); the output is
  distributed exactly as plain sampling from the next-token head (p after temperature, top-k and
  top-p, `process_logits`).

Either way a step commits the accepted drafts and one token of the verifier's
(`tokens_to_commit`). Everything here stays on the device: no host sync.
"""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """The sampling distribution (float32 probabilities, (..., V)) after temperature, top-k, top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (..., V): argmax of p / E with E ~ Exp(1) (no host sync)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement comes from: normalize(max(p - q, 0)). It has no mass
    only when p == q, and then no draft is ever rejected; p is returned there."""
    r = (p - q).clamp_(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def tokens_to_commit(drafts: torch.Tensor | None, bonus: torch.Tensor, n_accepted: torch.Tensor) -> torch.Tensor:
    """Tokens to commit (B, k): each row's first n_accepted (B,) drafts (B, k - 1), then its
    bonus token (B,) (the verifier's own, or the replacement of the first rejected draft); the
    rest is padding."""
    k = 1 if drafts is None else drafts.shape[1] + 1
    new = bonus[:, None] if drafts is None else torch.cat([drafts, bonus[:, None]], 1)
    return torch.where(torch.arange(k, device=bonus.device)[None, :] < n_accepted[:, None], new, bonus[:, None])


def greedy_accept(target: torch.Tensor, drafts: torch.Tensor | None):
    """target (B, k): the verifier's argmax after each fed token; drafts (B, k - 1) -> (tokens
    to commit (B, k), n_accepted (B,): the longest prefix of drafts equal to the verifier's choices)."""
    B, k = target.shape
    if k > 1:  # the first mismatch (a cumprod of matches would be an opaque call when compiled)
        miss = drafts != target[:, :-1]
        n_accepted = torch.where(miss.any(1), miss.int().argmax(1), k - 1)
    else:
        n_accepted = torch.zeros(B, dtype=torch.long, device=target.device)
    bonus = target[torch.arange(B, device=target.device), n_accepted]
    return tokens_to_commit(drafts, bonus, n_accepted), n_accepted


def accept(dec, logits: torch.Tensor, drafts: torch.Tensor | None, proposals: torch.Tensor | None):
    """Acceptance outside the fused greedy step (sampling; sequential heads). dec: what holds the
    settings and the random generator (`dec.cfg`, `dec.generator`: a Decoder, or a request's own);
    logits (B, k, V): the verifier's after each fed token; drafts (B, k - 1) and, when sampling,
    their proposal distributions (B, k - 1, V) -> (tokens to commit (B, k), n_accepted (B,))."""
    cfg = dec.cfg
    if cfg.greedy:
        return greedy_accept(logits.argmax(-1), drafts)
    B, k = logits.shape[:2]
    p = process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # (B, k, V)
    bonus = sample(p[:, -1], dec.generator)  # every draft accepted: a sample of p after the last
    n_accepted = torch.zeros(B, dtype=torch.long, device=logits.device)
    if k > 1:
        p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        q_d = proposals.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(p_d.shape, generator=dec.generator, device=logits.device)
        n_accepted = (u * q_d < p_d).long().cumprod(1).sum(1)  # accept with probability min(1, p / q)
        fixes = sample(residual_distribution(p[:, :-1], proposals), dec.generator)  # (B, k-1)
        bonus = torch.where(n_accepted == k - 1, bonus, fixes.gather(1, n_accepted.clamp(max=k - 2)[:, None])[:, 0])
    return tokens_to_commit(drafts if k > 1 else None, bonus, n_accepted), n_accepted
