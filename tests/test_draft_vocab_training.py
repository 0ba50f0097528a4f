"""Heads trained over a draft vocabulary (ModelConfig.draft_vocab, mtp.losses): the memory-efficient
loss against a reference spelled out from the definition, with and without self-distillation,
with a frozen and a training unembedding; the held-out metrics; decoding's default; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mtp.cli import main
from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.finetune import apply_freeze
from mtp.generate import GenerationConfig, generate
from mtp.losses import IGNORE, Distill, head_metrics, mtp_loss_backward, multi_token_targets, naive_loss
from tests.test_finetune import cli_n1
from tests.test_losses import V, assert_grads_close, grads, make, windows

IDS = sorted({3, 7, 8, 12, 19, 20, 33, 40, 41, 47, 52, 60, 0, 25, 26, 27, 28, 29})


def explicit(model, window, weights, distill=None, ids=IDS):
    """From the definition: head i >= 1 scores only the rows `ids`; its CE sums the targets among
    them and divides by all of its targets; its teacher is softmax over the same rows of the
    next-token head's logits at t + o - 1. ids=None: the whole vocabulary (the negative control)."""
    x = window[:, :-1]
    T = x.shape[1]
    logits = model(x, return_all_heads=True).float()
    teacher = logits[:, :, 0].detach()
    total = 0.0
    for i, o in enumerate(model.config.head_offsets):
        n_valid = T - o + 1
        student, target = logits[:, :n_valid, i], window[:, o:]
        tl = teacher[:, o - 1 :]
        if i > 0 and ids is not None:
            sel = torch.tensor(ids)
            student, tl = student[..., sel], tl[..., sel]
            pos = torch.full((V,), -1)
            pos[sel] = torch.arange(len(ids))
            target = pos[target]
        logp = F.log_softmax(student, -1)
        inside = target >= 0
        ce = -(logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * inside).sum() / target.numel()
        term = ce
        if distill is not None and i > 0:
            q = F.softmax(tl / distill.temperature, -1)
            kl = (q * (q.log() - logp)).sum(-1).mean()
            term = (1 - distill.weight) * ce + distill.weight * kl
        total = total + weights[i] * term
    return total


def restricted(seed=0, **kw):
    model = make(seed, **kw)
    model.config.draft_vocab = list(IDS)
    return model


def run(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    return out, grads(model)


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("distill", [None, Distill(weight=0.6, temperature=1.5)])
def test_restricted_loss_and_grads_match_the_definition(head_type, frozen, distill):
    model = restricted(head_type=head_type)
    if frozen:
        apply_freeze(model, "trunk")
    window = windows(3, 12)
    w = [0.0 if frozen else 1.0, 1.0, 0.5, 0.25]
    model.zero_grad(set_to_none=True)
    ref = explicit(model, window, w, distill)
    ref.backward()
    g_ref = grads(model)
    naive, g_naive = run(model, lambda: naive_loss(model, window, w, distill=distill))
    naive.loss.backward()
    g_naive = grads(model)
    assert_close(naive.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(g_naive, g_ref)
    got, g_got = run(model, lambda: mtp_loss_backward(model, window, w, chunk=7, distill=distill))
    assert_close(got.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(g_got, g_ref)
    if not frozen:  # the unembedding's gradient: the heads' share lands only on the draft rows
        assert model.output.weight.grad is not None


def test_the_comparison_sees_a_missing_restriction():
    """Negative control: the whole-vocabulary loss of the same model is far outside the tolerance,
    in value and in gradients (so the test above can fail)."""
    model = restricted()
    apply_freeze(model, "trunk")
    window = windows(3, 12)
    w, d = [0.0, 1.0, 1.0, 1.0], Distill(weight=0.5)
    got, g_got = run(model, lambda: mtp_loss_backward(model, window, w, chunk=7, distill=d))
    model.zero_grad(set_to_none=True)
    whole = explicit(model, window, w, d, ids=None)
    whole.backward()
    assert abs(float(whole.detach()) - float(got.loss)) > 1e-2
    with pytest.raises(AssertionError):
        assert_grads_close(g_got, grads(model))


@torch.no_grad()
def test_head_metrics_predict_among_the_draft_vocab():
    model = restricted()
    window = windows(4, 16, seed=3)
    m = head_metrics(model, window, chunk=5)
    labels = multi_token_targets(window, model.config.head_offsets)
    logits = model(window[:, :-1], return_all_heads=True)
    sel = torch.tensor(IDS)
    for i in range(4):
        lab = labels[:, :, i]
        valid = lab != IGNORE
        pred = logits[:, :, i].argmax(-1) if i == 0 else sel[logits[:, :, i][..., sel].argmax(-1)]
        assert m["count"][i] == valid.sum()
        assert m["correct"][i] == ((pred == lab) & valid).sum()
    # the next-token head keeps the whole vocabulary: its figures are the unrestricted model's
    plain = head_metrics(make(), window, chunk=5)
    assert plain["correct"][0] == m["correct"][0] and plain["ce_sum"][0] == pytest.approx(float(m["ce_sum"][0]))


def test_decoding_uses_the_model_s_draft_vocab_by_default():
    from test_generate import prompts_for, reference_greedy, trained

    model = trained("parallel")
    prompts = prompts_for([7, 5])
    refs = [reference_greedy(model, p, 24) for p in prompts]
    used = sorted({t for r in refs for t in r})
    others = [t for t in range(model.config.vocab_size) if t not in used]
    cfg = GenerationConfig(max_new_tokens=24, speculative=3)
    try:
        model.config.draft_vocab = others  # heads restricted to tokens greedy never writes
        none = generate(model, prompts, cfg)
        assert none.tokens == refs and max(none.stats.acceptance_by_head) == 0
        given = generate(model, prompts, GenerationConfig(max_new_tokens=24, speculative=3, draft_vocab=used))
        assert given.tokens == refs and max(given.stats.acceptance_by_head) > 0  # the call's own wins
    finally:
        model.config.draft_vocab = None
    plain = generate(model, prompts, cfg)
    assert plain.tokens == refs and max(plain.stats.acceptance_by_head) > 0


@pytest.mark.parametrize("ids, match", [([], "non-empty"), ([0, V], "must lie in"), ([2, 2], "twice"),
                                        ("abc", "list of token ids")])
def test_config_refuses_a_bad_draft_vocab(ids, match):
    with pytest.raises(MTPError, match=match):
        ModelConfig(vocab_size=V, dim=32, n_layers=3, n_heads=4, n_future=2, draft_vocab=ids)


def test_finetune_cli_draft_vocab(corpus, tmp_path, capsys):
    from mtp.checkpoint import read_meta
    from mtp.decode.draft_vocab import corpus_draft_vocab
    from mtp.tokenizers import ByteTokenizer

    n1 = tmp_path / "n1"
    common = cli_n1(corpus, n1, capsys, steps=2)
    out = tmp_path / "dv"
    assert main(["finetune", str(n1), "--out", str(out), "--n-future", "3", "--mode", "heads", "--distill",
                 "--draft-vocab", "12", "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["draft_vocab"] == 12
    cfg = read_meta(out)["model"]
    assert cfg.draft_vocab == corpus_draft_vocab([str(corpus)], ByteTokenizer(), 12, cfg.vocab_size)
    assert main(["info", str(out)]) == 0
    assert "extra heads over 12 tokens" in capsys.readouterr().out
    # the run's model keeps it: resuming must not be told another one
    assert main(["finetune", str(n1), "--out", str(out), "--resume", "--steps", "3", "--draft-vocab", "8",
                 "--no-progress"]) == 2
    assert "drop --draft-vocab" in capsys.readouterr().err
