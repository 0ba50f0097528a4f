"""Loss tests: targets, weights, and the memory-efficient backward against the naive reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from mtp.config import HEAD_TYPES, ModelConfig
from mtp.errors import MTPError
from mtp.losses import (
    IGNORE, fused_linear_cross_entropy, head_metrics, mtp_loss_backward, multi_token_targets, naive_loss,
    parse_loss_weights,
)
from mtp.model import MTPTransformer

WEIGHTINGS = ["uniform", "main:0.3", "geometric:0.5", "nth", "1,0.5,0.25,0.125"]
V = 61


def make(seed: int = 0, **kw) -> MTPTransformer:
    args = dict(vocab_size=V, dim=32, n_layers=5, n_heads=4, max_seq_len=32, multiple_of=16, n_future=4)
    args.update(kw)
    torch.manual_seed(seed)
    model = MTPTransformer(ModelConfig(**args))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move off the symmetric init so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for h in model.extra_heads:
            if isinstance(h, torch.nn.Linear):
                h.weight.add_(0.1 * torch.randn(h.weight.shape, generator=g))
    return model


def windows(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def assert_grads_close(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    nonzero = 0
    for name in ref:
        g, r = got[name], ref[name]
        if g is None and r is None:
            continue
        if g is None or r is None:
            present = r if g is None else g
            assert present.abs().max() == 0, f"{name}: grad is None in one path but nonzero in the other"
            continue
        scale = float(r.abs().max())
        assert_close(g, r, rtol=rtol, atol=max(1e-5 * scale, 1e-8), msg=lambda m: f"{name}: {m}")
        nonzero += scale > 0
    assert nonzero > 0


def run_both(model, window, weights, **kw):
    ref_model = copy.deepcopy(model)
    ref = naive_loss(ref_model, window, weights)
    ref.loss.backward()
    got = mtp_loss_backward(model, window, weights, **kw)
    return got, ref, grads(model), grads(ref_model)


# ---- targets ------------------------------------------------------------------------------------
def test_multi_token_targets_by_hand():
    window = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])  # T = 5
    labels = multi_token_targets(window, [1, 2, 3])
    I = IGNORE
    expected = torch.tensor([
        [[11, 12, 13], [12, 13, 14], [13, 14, 15], [14, 15, I], [15, I, I]],
        [[21, 22, 23], [22, 23, 24], [23, 24, 25], [24, 25, I], [25, I, I]],
    ])
    assert labels.dtype == torch.long
    assert torch.equal(labels, expected)
    assert IGNORE == -100


def test_multi_token_targets_far_offsets_are_ignored_not_wrapped():
    T = 16
    window = torch.arange(100, 100 + T + 1)[None].repeat(2, 1)
    labels = multi_token_targets(window, [1, 2, 4, 128])
    assert labels.shape == (2, T, 4)
    for i, o in enumerate([1, 2, 4]):
        for t in range(T):
            expect = 100 + t + o if t + o <= T else IGNORE
            assert labels[0, t, i] == expect and labels[1, t, i] == expect
    assert (labels[:, :, 3] == IGNORE).all()
    # offset exactly T: one label; offset T + 1: none
    lab = multi_token_targets(window, [T, T + 1])
    assert lab[0, 0, 0] == 100 + T and (lab[:, 1:, 0] == IGNORE).all() and (lab[:, :, 1] == IGNORE).all()


# ---- weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("uniform", 4, [1.0, 1.0, 1.0, 1.0]),
        (" uniform ", 2, [1.0, 1.0]),
        ("uniform", 1, [1.0]),
        ("main", 4, [1.0, 0.1, 0.1, 0.1]),
        ("main:0.3", 4, [1.0, 0.1, 0.1, 0.1]),
        ("main:0.6", 3, [1.0, 0.3, 0.3]),
        ("geometric", 4, [1.0, 0.5, 0.25, 0.125]),
        ("geometric:0.5", 4, [1.0, 0.5, 0.25, 0.125]),
        ("geometric:0.8", 3, [1.0, 0.8, 0.64]),
        ("nth", 4, [1.0, 0.0, 0.0, 1.0]),
        ("nth", 2, [1.0, 1.0]),
        ("nth", 1, [1.0]),
        ("1,0.5,0.25,0.125", 4, [1.0, 0.5, 0.25, 0.125]),
        ("0,1", 2, [0.0, 1.0]),
        ("2", 1, [2.0]),
    ],
)
def test_parse_loss_weights(spec, n, expected):
    got = parse_loss_weights(spec, n)
    assert len(got) == n
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_parse_loss_weights_main_single_head():
    assert parse_loss_weights("main:0.3", 1) == [1.0]


@pytest.mark.parametrize(
    "spec, n",
    [("1,2,3", 4), ("1,2,3,4,5", 4), ("1,-1,1,1", 4), ("0,0,0,0", 4), ("bogus", 4), ("", 4),
     ("uniform:2", 4), ("nth:3", 4), ("main:x", 4), ("geometric:y", 4),
     ("1;2;3;4", 4), ("1,,2,3", 4)],
)
def test_parse_loss_weights_errors(spec, n):
    with pytest.raises(MTPError):
        parse_loss_weights(spec, n)


@pytest.mark.parametrize("spec", ["main:-1", "geometric:-0.5", "1,nan,1,1", "main:nan"])
def test_parse_loss_weights_rejects_negative_or_nan(spec):
    with pytest.raises(MTPError):
        parse_loss_weights(spec, 4)


# ---- the central test: memory-efficient == naive ------------------------------------------------
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_memory_efficient_matches_naive(head_type, weighting):
    model = make(head_type=head_type)
    window = windows(3, 12)  # B * T = 36, not a multiple of the chunk 7
    weights = parse_loss_weights(weighting, 4)
    got, ref, g, r = run_both(model, window, weights, chunk=7)
    assert_close(got.loss.float(), ref.loss.detach().float(), rtol=1e-5, atol=1e-6)
    assert abs(float(ref.loss.detach()) - sum(w * c for w, c in zip(weights, ref.per_head))) < 1e-4
    for i, (a, b) in enumerate(zip(got.per_head, ref.per_head)):
        if math.isnan(a):  # a zero-weight head's loss is not computed (it may still be run)
            assert weights[i] == 0
        else:
            assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (i, a, b)
    assert_grads_close(g, r)


VARIANTS = {
    "gqa": dict(n_kv_heads=2),
    "tied": dict(tie_embeddings=True),
    "gqa-tied": dict(n_kv_heads=1, tie_embeddings=True),
    "far-offsets": dict(offsets=[1, 2, 4, 20]),  # 20 > T = 16: that head has no target at all
    "no-trunk-blocks": dict(n_layers=4),  # n_future == n_layers: the trunk is the embedding alone
    "two-heads": dict(n_future=2, n_layers=3),
}


@pytest.mark.parametrize("weighting", ["uniform", "main:0.3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_memory_efficient_matches_naive_variants(head_type, variant, weighting):
    kw = VARIANTS[variant]
    if head_type == "sequential" and "offsets" in kw:
        pytest.skip("sequential heads predict consecutive offsets only")
    if head_type == "linear" and variant == "no-trunk-blocks":
        kw = dict(n_layers=1)
    model = make(head_type=head_type, **kw)
    n = model.config.n_future
    window = windows(2, 16, seed=3)
    weights = parse_loss_weights(weighting, n)
    got, ref, g, r = run_both(model, window, weights, chunk=7)
    assert_close(got.loss.float(), ref.loss.detach().float(), rtol=1e-5, atol=1e-6)
    if variant == "far-offsets":
        assert ref.per_head[3] == 0.0 and got.per_head[3] == 0.0
    assert_grads_close(g, r)


@pytest.mark.parametrize("chunk", [1, 5, 32, 33, 4096])
def test_memory_efficient_chunk_sizes(chunk):
    model = make(head_type="causal")
    window = windows(2, 16, seed=4)
    got, ref, g, r = run_both(model, window, [1.0, 0.5, 0.25, 0.125], chunk=chunk)
    assert_close(got.loss.float(), ref.loss.detach().float(), rtol=1e-5, atol=1e-6)
    assert_grads_close(g, r)


def test_memory_efficient_accumulates_into_existing_grads():
    model = make(head_type="parallel", tie_embeddings=True)
    window = windows(2, 16, seed=5)
    ref_model = copy.deepcopy(model)
    for m in (model, ref_model):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.01)
    naive_loss(ref_model, window, [1.0] * 4).loss.backward()
    mtp_loss_backward(model, window, [1.0] * 4, chunk=7)
    assert_grads_close(grads(model), grads(ref_model))


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_gradient_accumulation(head_type):
    model = make(head_type=head_type, tie_embeddings=head_type == "parallel")
    w1, w2 = windows(2, 16, seed=6), windows(2, 16, seed=7)
    weights = parse_loss_weights("geometric:0.5", 4)
    ref_model = copy.deepcopy(model)
    l1 = naive_loss(ref_model, w1, weights).loss
    l2 = naive_loss(ref_model, w2, weights).loss
    ((l1 + l2) / 2).backward()
    a = mtp_loss_backward(model, w1, weights, chunk=7, grad_scale=0.5)
    b = mtp_loss_backward(model, w2, weights, chunk=7, grad_scale=0.5)
    # the reported loss is the micro-batch's own loss, unscaled
    assert_close(a.loss.float(), l1.detach(), rtol=1e-5, atol=1e-6)
    assert_close(b.loss.float(), l2.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(ref_model))


# ---- fused unembedding + cross-entropy ----------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_linear_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    N, D = 30, 16
    z = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 3, 4, 29]] = IGNORE
    labels[7:14] = IGNORE  # with chunk 7: one chunk of IGNORE rows only
    scale = 0.37
    ce_sum, dz, dw = fused_linear_cross_entropy(z, weight, labels, scale=scale, chunk=chunk)

    zr, wr = z.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(zr @ wr.T, labels, ignore_index=IGNORE, reduction="sum")
    (scale * ref).backward()
    assert ce_sum.dtype == torch.float32 and ce_sum.shape == ()
    assert_close(ce_sum, ref.detach(), rtol=1e-5, atol=1e-5)
    assert dz.shape == z.shape and dw.shape == weight.shape and dw.dtype == torch.float32
    assert_close(dz, zr.grad, rtol=1e-5, atol=1e-6)
    assert_close(dw, wr.grad, rtol=1e-5, atol=1e-6)
    assert (dz[7:14] == 0).all() and (dz[[0, 3, 4, 29]] == 0).all()
    # inputs are left alone
    assert z.grad is None and weight.grad is None


def test_fused_linear_cross_entropy_all_ignored():
    z, weight = torch.randn(9, 8), torch.randn(V, 8)
    labels = torch.full((9,), IGNORE)
    ce_sum, dz, dw = fused_linear_cross_entropy(z, weight, labels, scale=1.0, chunk=4)
    assert float(ce_sum) == 0.0 and (dz == 0).all() and (dw == 0).all()
    assert torch.isfinite(dz).all()


# ---- compiled blocks --------------------------------------------------------------------------------
def test_compiled_blocks_match_eager():
    torch._dynamo.reset()
    model = make(head_type="parallel", n_layers=5)
    eager = copy.deepcopy(model)
    for b in list(model.layers) + list(model.extra_heads):
        b.compile(backend="aot_eager", dynamic=False)
    window = windows(2, 16, seed=8)
    weights = parse_loss_weights("main:0.3", 4)
    from torch._dynamo.utils import counters

    counters.clear()
    got = mtp_loss_backward(model, window, weights, chunk=7)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really went through the compiler
    assert counters["aot_autograd"]["total"] >= 1
    ref = mtp_loss_backward(eager, window, weights, chunk=7)
    assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(eager))
    # and against the naive reference
    ref_model = copy.deepcopy(eager)
    for p in ref_model.parameters():
        p.grad = None
    naive_loss(ref_model, window, weights).loss.backward()
    assert_grads_close(grads(model), grads(ref_model))
    torch._dynamo.reset()


# ---- held-out metrics ---------------------------------------------------------------------------
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_head_metrics(head_type):
    offsets = None if head_type == "sequential" else [1, 2, 3, 14]
    model = make(head_type=head_type, offsets=offsets)
    window = windows(3, 12, seed=9)
    m = head_metrics(model, window, chunk=5)
    ref = naive_loss(model, window, [1.0] * 4)
    labels = multi_token_targets(window, model.config.head_offsets)
    with torch.no_grad():
        logits = model(window[:, :-1], return_all_heads=True)
    for key in ("ce_sum", "correct", "count"):
        assert m[key].shape == (4,)
    for i in range(4):
        lab = labels[:, :, i]
        valid = lab != IGNORE
        assert m["count"][i] == int(valid.sum())
        assert m["correct"][i] == int(((logits[:, :, i].argmax(-1) == lab) & valid).sum())
        if m["count"][i] > 0:
            assert abs(float(m["ce_sum"][i] / m["count"][i]) - ref.per_head[i]) < 1e-5
        else:
            assert m["ce_sum"][i] == 0
    assert m["count"].tolist() == ([36, 33, 30, 27] if offsets is None else [36, 33, 30, 0])


def test_head_metrics_counts_correct_predictions():
    """A model forced to predict token 0: correct counts equal token 0's frequency in the labels."""
    model = make(head_type="parallel")
    with torch.no_grad():
        model.norm.weight.zero_()  # every normed hidden state is 0 -> all logits 0 -> argmax is token 0
    window = windows(2, 12, seed=10)
    window[0, 1:5] = 0
    m = head_metrics(model, window)
    labels = multi_token_targets(window, [1, 2, 3, 4])
    for i in range(4):
        assert m["correct"][i] == int((labels[:, :, i] == 0).sum())
        assert abs(float(m["ce_sum"][i]) - m["count"][i].item() * math.log(V)) < 1e-4


# ---- memory: never more than one chunk of logits --------------------------------------------------
class MaxVocabTensor(TorchDispatchMode):
    """Records the largest op output that has a vocabulary-sized dimension."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.shape = vocab, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and self.vocab in t.shape:
                if t.numel() > self.largest:
                    self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def saved_shapes():
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape) if t.is_floating_point() else ())
        return t

    return shapes, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@pytest.mark.parametrize("head_type", ["parallel", "causal", "sequential"])
def test_memory_efficient_never_holds_more_than_a_chunk_of_logits(head_type):
    Vm, chunk = 97, 40  # chunk >= dim, so (V, dim) weight-sized tensors stay under chunk * V
    model = make(head_type=head_type, vocab_size=Vm, tie_embeddings=head_type == "causal")
    window = torch.randint(0, Vm, (4, 25), generator=torch.Generator().manual_seed(11))  # 96 tokens
    limit = chunk * Vm
    weights = [1.0] * 4

    mode = MaxVocabTensor(Vm)
    shapes, hooks = saved_shapes()
    with hooks, mode:
        mtp_loss_backward(model, window, weights, chunk=chunk)
    assert mode.largest > 0
    assert mode.largest <= limit, f"op output of shape {mode.shape} exceeds {chunk} x {Vm}"
    big_saved = [s for s in shapes if Vm in s and math.prod(s) > limit]
    assert not big_saved, big_saved

    # the check can fail: the naive loss does exceed it, by far
    model.zero_grad(set_to_none=True)
    mode = MaxVocabTensor(Vm)
    shapes, hooks = saved_shapes()
    with hooks, mode:
        naive_loss(model, window, weights).loss.backward()
    assert mode.largest >= 96 * 4 * Vm, mode.shape
    assert any(Vm in s and math.prod(s) > limit for s in shapes)


def test_compiled_cross_entropy_chunk_matches_eager():
    """The inductor-compiled chunk (what `--compile` uses) gives the eager loss and gradients."""
    from mtp.losses import fused_linear_cross_entropy

    torch.manual_seed(0)
    z, weight = torch.randn(50, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (50,))
    labels[3] = IGNORE
    eager = fused_linear_cross_entropy(z, weight, labels, scale=0.1, chunk=16)
    compiled = fused_linear_cross_entropy(z, weight, labels, scale=0.1, chunk=16, compile=True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # a different scale reuses the compiled code (scale is a tensor input) and scales the grads
    half = fused_linear_cross_entropy(z, weight, labels, scale=0.05, chunk=16, compile=True)
    torch.testing.assert_close(half[1], eager[1] / 2, rtol=1e-5, atol=1e-6)


# ---- frozen parameters (fine-tuning) ----------------------------------------------------------
def test_fused_linear_cross_entropy_skips_unneeded_grads():
    g = torch.Generator().manual_seed(1)
    z, weight = torch.randn(20, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = torch.randint(0, V, (20,), generator=g)
    ce, dz, dw = fused_linear_cross_entropy(z, weight, labels, scale=1.0, chunk=6)
    ce2, dz2, dw2 = fused_linear_cross_entropy(z, weight, labels, scale=1.0, chunk=6, input_grad=False,
                                               weight_grad=False)
    assert dz2 is None and dw2 is None and torch.equal(ce, ce2)
    _, dz3, dw3 = fused_linear_cross_entropy(z, weight, labels, scale=1.0, chunk=6, weight_grad=False)
    assert dw3 is None and torch.equal(dz3, dz)


FROZEN = {
    "trunk-parallel": (dict(head_type="parallel"), "trunk"),
    "trunk-causal": (dict(head_type="causal"), "trunk"),
    "trunk-sequential-tied": (dict(head_type="sequential", tie_embeddings=True), "trunk"),
    "trunk-linear": (dict(head_type="linear"), "trunk"),
    "output-only": (dict(head_type="parallel"), ("output.",)),
    "norm-and-head0": (dict(head_type="causal"), ("norm.", "layers.1.")),
}


@pytest.mark.parametrize("case", list(FROZEN))
def test_memory_efficient_with_frozen_parameters(case, monkeypatch):
    """Frozen parameters get no gradient (output.weight's is written by hand: not when frozen),
    the others the naive reference's; a frozen trunk runs under no_grad."""
    from mtp.finetune import apply_freeze

    kw, frozen = FROZEN[case]
    model = make(**kw)
    if frozen == "trunk":
        apply_freeze(model, "trunk")
        weights = [0.0, 1.0, 0.5, 0.25]
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
        weights = [1.0, 1.0, 0.5, 0.25]
    window = windows(2, 12, seed=9)
    ref_model = copy.deepcopy(model)
    naive_loss(ref_model, window, weights).loss.backward()
    trunk, grad_modes = model.trunk, []

    def spy(*a, **k):
        grad_modes.append(torch.is_grad_enabled())
        return trunk(*a, **k)

    monkeypatch.setattr(model, "trunk", spy)
    got = mtp_loss_backward(model, window, weights, chunk=7)
    assert grad_modes == [frozen != "trunk"]
    g, r = grads(model), grads(ref_model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert g[name] is None and r[name] is None, name
    assert model.output.weight.grad is None or model.output.weight.requires_grad
    assert_grads_close(g, r)
    if frozen == "trunk":
        assert math.isnan(got.per_head[0])
    assert_close(got.loss.float(), naive_loss(ref_model, window, weights).loss.detach(), rtol=1e-5, atol=1e-6)


# ---- gradient interference: cosine of the heads' gradients at the trunk output ------------------
def naive_grad_cosine(model, window, weights):
    """Per trunk-reading head c: autograd.grad of the weighted loss of c and the heads behind it
    with respect to the trunk output, then pairwise cosines (NaN for heads without one)."""
    x = window[:, :-1]
    labels = multi_token_targets(window, model.config.head_offsets)
    h = model.trunk(x)
    logits = model.logits(torch.stack(model.heads_hidden(h, x), dim=-2))  # (B, T, n, V)
    n = logits.shape[2]
    ce = [F.cross_entropy(logits[:, :, i].flatten(0, 1), labels[:, :, i].flatten(), ignore_index=IGNORE)
          for i in range(n)]

    def root(i):
        while model.parents[i] != -1:
            i = model.parents[i]
        return i

    g = {}
    for c in range(n):
        if model.parents[c] == -1:
            sub = [i for i in range(n) if root(i) == c and weights[i] > 0]
            if sub:
                g[c] = torch.autograd.grad(sum(weights[i] * ce[i] for i in sub), h, retain_graph=True)[0].flatten()
    cos = torch.full((n, n), float("nan"))
    for a in g:
        for b in g:
            cos[a, b] = F.cosine_similarity(g[a], g[b], dim=0)
    return cos


@pytest.mark.parametrize("head_type, weighting", [("parallel", "uniform"), ("parallel", "1,0,0.5,0.25"),
                                                  ("linear", "main:0.3"), ("causal", "uniform")])
def test_grad_cosine_matches_autograd_per_head(head_type, weighting):
    model = make(head_type=head_type)
    window = windows(2, 12, seed=10)
    weights = parse_loss_weights(weighting, 4)
    ref = naive_grad_cosine(copy.deepcopy(model), window, weights)
    plain = copy.deepcopy(model)
    got = mtp_loss_backward(model, window, weights, chunk=7, grad_cosine=True)
    assert got.grad_cosine.shape == (4, 4)
    assert torch.equal(got.grad_cosine.isnan(), ref.isnan())
    assert_close(got.grad_cosine.nan_to_num(), ref.nan_to_num(), rtol=1e-4, atol=1e-5)
    assert (ref.isnan().sum() < 16) and (head_type != "parallel" or not ref[0, 2:].isnan().any())
    # the flag changes nothing else
    mtp_loss_backward(plain, window, weights, chunk=7)
    assert_grads_close(grads(model), grads(plain))
    assert mtp_loss_backward(plain, window, weights, chunk=7).grad_cosine is None
