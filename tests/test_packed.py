"""Prepacked linear weights for CPU decoding (mtp.decode.packed) compute what F.linear computes, follow
weight changes, leave the model as it was, and decode the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mtp.decode import packed
from mtp.config import ModelConfig
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate
from mtp.model import MTPTransformer

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch build has no oneDNN")


def model_for(head_type="parallel", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=24, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, max_seq_len=64, multiple_of=16,
                      n_future=3, head_type=head_type, init_std=0.2)
    return MTPTransformer(cfg).eval()


@torch.no_grad()
def test_packed_layers_compute_what_linear_computes():
    model = model_for()
    x = torch.randint(0, 24, (3, 11))
    ref = model(x, return_all_heads=True)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    with packed.packed_linears(model) as n:
        assert n == n_linear
        assert all("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
        got = model(x, return_all_heads=True)
        lin = nn.Linear(32, 7, bias=True)  # a bias and a non-contiguous input go through too
        with packed.packed_linears(lin):
            xt = torch.randn(5, 2, 32).transpose(0, 1)
            torch.testing.assert_close(lin(xt), xt @ lin.weight.T + lin.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is as it was
    assert torch.equal(model(x, return_all_heads=True), ref)


@torch.no_grad()
def test_packed_copies_follow_weight_changes():
    model = model_for()
    x = torch.randint(0, 24, (2, 9))
    with packed.packed_linears(model):
        before = model(x)
    model.output.weight.mul_(2)  # in place: a new version
    model.layers[0].attention.wq.weight = nn.Parameter(torch.randn_like(model.layers[0].attention.wq.weight))
    ref = model(x)
    with packed.packed_linears(model):
        after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    packed.release(model)
    assert model not in packed._packed_weights


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_is_the_same_with_and_without_packing(head_type, temperature):
    model = model_for(head_type, seed=2)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 24, (n,), generator=g).tolist() for n in (4, 1, 8)]
    for k in (1, 3):
        outs = [generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=k, temperature=temperature,
                                                          seed=5, pack_weights=p)) for p in (True, False)]
        assert outs[0].tokens == outs[1].tokens, f"k={k}"
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_packing_does_not_apply_off_the_cpu_float_path():
    model = model_for().to(torch.float64)
    with packed.packed_linears(model) as n:
        assert n == 0


def test_only_models_too_big_for_the_cache_are_packed_by_default(monkeypatch):
    model = model_for()
    assert not packed.worth_packing(model)  # a few KB of weights: oneDNN's cost per call would dominate
    monkeypatch.setattr(packed, "MIN_BYTES", 1)
    assert packed.worth_packing(model)
    assert not packed.worth_packing(model.to(torch.float64))


@torch.no_grad()
def test_bfloat16_weights_are_packed_where_the_cpu_can():
    model = model_for().to(torch.bfloat16)
    x = torch.randint(0, 24, (2, 9))
    ref = model(x).float()
    if not packed.dtype_supported(torch.bfloat16):
        # the probe agrees with oneDNN: packing a bfloat16 weight really fails on this CPU
        with pytest.raises(RuntimeError, match="bf16"):
            torch.ops.mkldnn._reorder_linear_weight(model.output.weight, None)
        with packed.packed_linears(model) as n:
            assert n == 0
        pytest.skip("this CPU's oneDNN cannot pack bfloat16 (no AVX-512 BW/VL/DQ or AVX-NE-CONVERT); "
                    "the fallback is tested in test_packing_falls_back_where_the_cpu_cannot")
    with packed.packed_linears(model) as n:
        assert n > 0
        got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)


def test_packing_falls_back_where_the_cpu_cannot(monkeypatch):
    """A CPU whose oneDNN cannot pack bfloat16 (AVX2 only): auto decodes unpacked with the same
    tokens, on is refused with a reason, and nothing is packed."""
    model = model_for(seed=3).to(torch.bfloat16)
    prompts = [[1, 2, 3], [4]]
    ref = generate(model, prompts, GenerationConfig(max_new_tokens=8, speculative=2, pack_weights=False))
    assert packed.will_pack(model_for(), True)  # float32 packs
    supported = packed.dtype_supported
    monkeypatch.setattr(packed, "dtype_supported", lambda dtype: dtype != torch.bfloat16 and supported(dtype))
    monkeypatch.setattr(packed, "MIN_BYTES", 1)  # auto would pack this model if the CPU could
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", None, raising=False)  # packing would crash
    assert not packed.worth_packing(model) and not packed.will_pack(model, None)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=8, speculative=2))
    assert out.tokens == ref.tokens
    with pytest.raises(MTPError, match="cannot pack bfloat16"):
        packed.will_pack(model, True)
    with pytest.raises(MTPError, match="--pack-weights on"):
        generate(model, prompts, GenerationConfig(max_new_tokens=8, pack_weights=True))


def test_the_probe_asks_onednn(monkeypatch):
    packed.dtype_supported.cache_clear()
    calls = []

    def refuse(w, *args):
        calls.append(w.dtype)
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    try:
        assert not packed.dtype_supported(torch.bfloat16) and calls == [torch.bfloat16]
        assert not packed.dtype_supported(torch.float64)  # not a packing dtype: oneDNN is not asked
        assert calls == [torch.bfloat16]
    finally:
        packed.dtype_supported.cache_clear()


@torch.no_grad()
def test_measured_policy_takes_the_kernel_measured_for_each_row_count(monkeypatch):
    """measured: each product takes the kernel measured fastest for its number of rows (a count
    between two measured ones: the larger's); the results agree with F.linear's whichever it takes."""
    model = model_for()
    calls = []
    real = packed.packed_matmul
    monkeypatch.setattr(packed, "packed_matmul", lambda x, p, b: calls.append(x.shape) or real(x, p, b))
    monkeypatch.setattr(packed, "_chosen", {})
    assert packed.measured_kernels(model) is None
    with packed.packed_linears(model, measured=True):
        found = packed.measured_kernels(model)
    assert set(found) == set(packed.ROWS) and all(found[r] in packed.candidates(model, r) for r in packed.ROWS)
    assert calls  # the measurement ran packed passes
    packed._chosen[packed._model_key(model)] = {1: "linear", 2: "linear", 4: "linear", 8: "packed", 16: "packed",
                                                32: "packed"}  # as if measured
    x1, x8, x40 = (torch.randint(0, 24, s) for s in ((1, 1), (1, 8), (1, 40)))  # the heads' logits: 3x the rows
    refs = [model(x, return_all_heads=True) for x in (x1, x8, x40)]
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    with packed.packed_linears(model, measured=True):
        calls.clear()
        got1 = model(x1, return_all_heads=True)
        assert calls == []  # 1 row, and 3 (the 4-row kernel): F.linear everywhere
        got8 = model(x8, return_all_heads=True)
        assert len(calls) == n_linear  # 8 rows, and 24 (the 32-row kernel): packed
        calls.clear()
        got40 = model(x40, return_all_heads=True)
        assert len(calls) == n_linear  # more rows than measured: the largest count's kernel
    assert torch.equal(got1, refs[0])  # the very kernel of the plain model
    torch.testing.assert_close(got8, refs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got40, refs[2], rtol=1e-5, atol=1e-5)
    with packed.packed_linears(model):  # not measured: packed at every row count
        calls.clear()
        model(x1, return_all_heads=True)
        assert len(calls) == n_linear


def test_measurement_picks_the_fastest_kernel_per_row_count(monkeypatch):
    """_measure times whole passes with each candidate kernel and keeps the fastest at each count."""
    model = model_for()
    policy = packed.Policy()
    rows = [0]
    # a clock under which packed passes are fastest from 4 tokens on, F.linear below
    speed = {"linear": lambda r: 1.0, "packed": lambda r: 0.5 if r >= 4 else 2.0, "rowdot": lambda r: 1.5}
    monkeypatch.setattr(packed, "_time", lambda fn: speed[policy.fixed](rows[0]))
    real_zeros = torch.zeros

    def zeros(shape, **kw):
        rows[0] = shape[1]
        return real_zeros(shape, **kw)
    monkeypatch.setattr(packed.torch, "zeros", zeros)
    assert packed._measure(model, policy) == {1: "linear", 2: "linear", 4: "packed", 8: "packed", 16: "packed",
                                              32: "packed"}
    assert policy.fixed is None
