"""Self-distillation of the extra heads: the memory-efficient distilled loss against an explicit
full-logits reference, and the trunk cache against the uncached path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mtp.errors import MTPError
from mtp.finetune import apply_freeze
from mtp.losses import IGNORE, Distill, fused_linear_distill_loss, mtp_loss_backward, naive_loss
from tests.test_losses import V, assert_grads_close, grads, make, windows


def explicit_reference(model, window, weights, distill, shift=-1, temp_on_teacher=True):
    """Spelled out from the definition, one head and one position-offset at a time: head i at
    position t is pulled towards softmax(L0[t + o + shift] / T). shift=-1 is right; the others
    are the mistakes the test must be able to see."""
    x = window[:, :-1]
    T = x.shape[1]
    logits = model(x, return_all_heads=True).float()  # (B, T, n, V)
    teacher = logits[:, :, 0].detach()
    total = 0.0
    for i, o in enumerate(model.config.head_offsets):
        n_valid = T - o + 1
        student = logits[:, :n_valid, i]
        ce = F.cross_entropy(student.reshape(-1, V), window[:, o:].reshape(-1))
        if i == 0:
            total = total + weights[0] * ce
            continue
        idx = (torch.arange(n_valid) + o + shift).clamp(max=T - 1)
        tl = teacher[:, idx] / (distill.temperature if temp_on_teacher else 1.0)
        q = F.softmax(tl, -1)
        kl = (q * (q.log() - F.log_softmax(student, -1))).sum(-1).mean()
        total = total + weights[i] * ((1 - distill.weight) * ce + distill.weight * kl)
    return total


def run(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    return out, grads(model)


@pytest.mark.parametrize("head_type", ["parallel", "causal", "sequential"])
@pytest.mark.parametrize("frozen", [True, False])
def test_distilled_loss_and_grads_match_references(head_type, frozen):
    model = make(head_type=head_type)
    if frozen:
        apply_freeze(model, "trunk")
    window = windows(3, 12)
    d = Distill(weight=0.7, temperature=1.7)
    w = [0.0 if frozen else 1.0, 1.0, 0.5, 0.25]
    ref, g_ref = run(model, lambda: naive_loss(model, window, w, distill=d))
    ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    explicit = explicit_reference(model, window, w, d)
    explicit.backward()
    assert_close(explicit.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), g_ref)
    got, g_got = run(model, lambda: mtp_loss_backward(model, window, w, chunk=7, distill=d))
    assert_close(got.loss, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close(torch.tensor(got.per_head_kl[1:]), torch.tensor(ref.per_head_kl[1:]), rtol=1e-5, atol=1e-6)
    assert_grads_close(g_got, g_ref)


@pytest.mark.parametrize("mistake", [dict(shift=0), dict(shift=-2), dict(temp_on_teacher=False)])
def test_reference_sees_a_wrong_offset_or_temperature(mistake):
    """The comparison above has power: a teacher one position off, or without its temperature,
    gives gradients far outside the tolerance the test uses."""
    model = make()
    apply_freeze(model, "trunk")
    window = windows(3, 12)
    d = Distill(weight=1.0, temperature=2.0)
    w = [0.0, 1.0, 1.0, 1.0]
    _, g_got = run(model, lambda: mtp_loss_backward(model, window, w, chunk=7, distill=d))
    model.zero_grad(set_to_none=True)
    explicit_reference(model, window, w, d, **mistake).backward()
    with pytest.raises(AssertionError):
        assert_grads_close(g_got, grads(model))


def test_distill_weight_zero_is_the_corpus_loss_and_one_ignores_labels():
    model = make()
    apply_freeze(model, "trunk")
    window = windows(2, 10)
    w = [0.0, 1.0, 1.0, 1.0]
    plain, g_plain = run(model, lambda: mtp_loss_backward(model, window, w, chunk=5))
    zero, g_zero = run(model, lambda: mtp_loss_backward(model, window, w, chunk=5, distill=Distill(weight=0.0)))
    assert_close(zero.loss, plain.loss)
    assert_grads_close(g_zero, g_plain)
    # weight 1: the corpus labels do not matter (only the window's inputs, which stay the same)
    other = window.clone()
    other[:, -1] = (other[:, -1] + 1) % V  # the last token is a label only, never an input
    one, g_one = run(model, lambda: mtp_loss_backward(model, window, w, distill=Distill(weight=1.0)))
    one2, g_one2 = run(model, lambda: mtp_loss_backward(model, other, w, distill=Distill(weight=1.0)))
    assert_close(one.loss, one2.loss)
    assert_grads_close(g_one2, g_one)
    assert one.per_head != one2.per_head  # the corpus CE (still reported) did change


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fused_distill_loss_matches_explicit(chunk):
    g = torch.Generator().manual_seed(0)
    N, D = 13, 8
    z = torch.randn(N, D, generator=g)
    zt = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 9]] = IGNORE
    d = Distill(weight=0.4, temperature=0.5)
    ce, kl, dz, dw = fused_linear_distill_loss(z, zt, weight, labels, scale=0.3, distill=d, chunk=chunk)
    zr, wr = z.clone().requires_grad_(), weight.clone().requires_grad_()
    valid = labels != IGNORE
    logits = zr @ wr.T
    q = F.softmax((zt @ weight.T) / d.temperature, -1)
    ce_r = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    kl_r = ((q * (q.log() - F.log_softmax(logits, -1))).sum(-1) * valid).sum()
    (0.3 * ((1 - d.weight) * ce_r + d.weight * kl_r)).backward()
    assert_close(ce, ce_r.detach(), rtol=1e-5, atol=1e-5)
    assert_close(kl, kl_r.detach(), rtol=1e-5, atol=1e-5)
    assert_close(dz, zr.grad, rtol=1e-5, atol=1e-6)
    assert_close(dw, wr.grad, rtol=1e-5, atol=1e-6)


def test_distill_rejects_bad_settings():
    with pytest.raises(MTPError, match="weight"):
        Distill(weight=1.5)
    with pytest.raises(MTPError, match="temperature"):
        Distill(temperature=0.0)
    model = make()  # nothing frozen: a precomputed trunk output would drop the trunk's gradient
    window = windows(2, 8)
    with pytest.raises(MTPError, match="frozen trunk"):
        mtp_loss_backward(model, window, [1.0] * 4, trunk_out=model.trunk(window[:, :-1]).detach())


# ---- the trunk cache ------------------------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402

from mtp.cli import main  # noqa: E402
from mtp.distill import TrunkCache, pool_indices, pool_windows, window_pool  # noqa: E402
from tests.test_finetune import cli_n1, ft_config, rows, source  # noqa: E402,F401  (source: a fixture)


def test_pool_indices_cover_every_window_once_per_epoch():
    N, B = 10, 3
    seen = np.concatenate([pool_indices(N, B, seed=1, step=s) for s in range(10)])  # 30 draws: 3 epochs
    for e in range(3):
        assert sorted(seen[e * N : (e + 1) * N]) == list(range(N))
    assert not np.array_equal(seen[:N], seen[N : 2 * N])  # each epoch in its own order
    # micro-batches and ranks take consecutive slices of the same walk
    a = pool_indices(N, B, seed=1, step=1, micro=1, grad_accum=2, rank=1, world_size=2)
    assert np.array_equal(a, np.concatenate([pool_indices(N, B, seed=1, step=s) for s in range(10)])[21:24])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_cached_states_give_the_uncached_loss_and_grads(tmp_path, dtype, tol):
    model = make(head_type="parallel")
    apply_freeze(model, "trunk")
    tokens = windows(1, 200, seed=4)[0].numpy()
    starts = window_pool(tokens, 6, 12, seed=0)
    cache = TrunkCache(tmp_path, model, tokens, starts, 12, teacher=True, dtype=dtype)
    idx = np.array([4, 1, 3])
    batch = pool_windows(tokens, starts, idx, 12)
    w, d = [0.0, 1.0, 1.0, 1.0], Distill(weight=0.5, temperature=1.5)
    ref, g_ref = run(model, lambda: mtp_loss_backward(model, batch, w, distill=d))
    h, t = cache.states(model, idx, batch)  # computed and written
    assert (cache.hits, cache.misses) == (0, 3)
    h2, t2 = cache.states(model, idx, batch)  # read back
    assert (cache.hits, cache.misses) == (3, 3) and torch.equal(h, h2) and torch.equal(t, t2)
    # a new cache object on the same directory finds the states (a later run)
    again = TrunkCache(tmp_path, model, tokens, starts, 12, teacher=True, dtype=dtype)
    again.states(model, np.array([1]), batch[1:2])
    assert (again.hits, again.misses) == (1, 0)
    got, g_got = run(model, lambda: mtp_loss_backward(model, batch, w, distill=d, trunk_out=h2, teacher_out=t2))
    assert_close(got.loss, ref.loss, rtol=tol, atol=tol)
    if dtype == "float32":
        assert_grads_close(g_got, g_ref)
    else:  # bfloat16 storage: each gradient within a relative norm error the rounding implies
        trained = [n for n, g in g_ref.items() if g is not None]
        assert trained and all(g_got[n] is not None for n in trained)
        errs = {n: float((g_got[n] - g_ref[n]).norm() / g_ref[n].norm()) for n in trained}
        assert max(errs.values()) < tol, errs
    if dtype == "bfloat16":  # the storage rounding is real, and bounded by the tolerance above
        assert not torch.equal(h2.float(), model.trunk(batch[:, :-1]).detach())
    # other weights: another cache directory
    with torch.no_grad():
        model.layers[0].attention.wq.weight.add_(0.01)
    assert TrunkCache(tmp_path, model, tokens, starts, 12, teacher=True, dtype=dtype).dir != cache.dir


def test_training_from_the_cache_repeats_the_computed_run(corpus, tmp_path, source):
    """Run 1 computes the trunk states (first epoch) and reads them (later epochs); run 2, with
    the cache already filled, reads every window: the same losses (float32 storage)."""
    kw = dict(freeze="trunk", distill=True, distill_weight=0.5, trunk_cache_windows=4,
              trunk_cache_dtype="float32", steps=6, init_n_future=3)
    from mtp.train import train
    train(ft_config(corpus, tmp_path / "a", source, **kw), progress=False)
    train(ft_config(corpus, tmp_path / "b", source, **kw), progress=False)
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["trunk_cache"] for r in a][-1] == {"hits": 8, "misses": 4}  # 12 windows drawn, 4 computed
    assert [r["trunk_cache"] for r in b][-1] == {"hits": 12, "misses": 0}
    assert_close(torch.tensor([r["per_head"][1:] for r in b]), torch.tensor([r["per_head"][1:] for r in a]),
                 rtol=1e-6, atol=1e-6)
    assert_close(torch.tensor([r["per_head_kl"][1:] for r in b]), torch.tensor([r["per_head_kl"][1:] for r in a]),
                 rtol=1e-6, atol=1e-6)
    assert all(r["per_head_kl"][0] is None and r["per_head_kl"][1] > 0 for r in a)


def test_finetune_cli_distill_flags(corpus, tmp_path, capsys):
    n1 = tmp_path / "n1"
    common = cli_n1(corpus, n1, capsys, steps=2)
    out = tmp_path / "kd"
    assert main(["finetune", str(n1), "--out", str(out), "--n-future", "3", "--mode", "heads", "--distill",
                 "--distill-weight", "0.8", "--distill-temperature", "2", "--trunk-cache-windows", "3",
                 "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["distill"] == {"weight": 0.8, "temperature": 2.0} and summary["trunk_cache_windows"] == 3
    assert rows(out)[-1]["per_head_kl"][1] > 0
    bad = [
        (["--n-future", "3", "--mode", "full", "--distill"], "--mode heads"),
        (["--n-future", "3", "--distill-weight", "0.5"], "need --distill"),
        (["--n-future", "3", "--distill", "--distill-weight", "2"], "distill_weight"),
        (["--n-future", "3", "--mode", "full", "--trunk-cache-windows", "4"], "--mode heads"),
    ]
    for extra, match in bad:
        assert main(["finetune", str(n1), "--out", str(tmp_path / "x"), *extra, *common]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (extra, err)
    assert not (tmp_path / "x").exists()
