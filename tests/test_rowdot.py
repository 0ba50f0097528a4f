"""mtp's kernel for the products of a decode step's few rows (mtp.decode.rowdot): what F.linear
computes, each row independent of the others, under torch.compile too, and decoding with it gives
the same tokens speculatively as greedily."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.config import ModelConfig
from mtp.decode import packed, rowdot
from mtp.generate import GenerationConfig, generate
from mtp.model import MTPTransformer

pytestmark = pytest.mark.skipif(not rowdot.available(), reason=f"rowdot unavailable: {rowdot.unavailable_reason()}")

# rows beyond one pass (16), inner sizes with a tail past the vector width, outputs past a block
SHAPES = [(1, 64, 40), (3, 37, 100), (4, 576, 129), (16, 24, 9), (17, 70, 33), (40, 8, 5), (0, 16, 8)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_rowdot_computes_what_linear_computes(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(rowdot.rowdot(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rowdot.rowdot(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_each_row_is_computed_alone():
    """A row's result does not depend on the other rows: bit for bit what it gives alone."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 576, generator=g), torch.randn(300, 576, generator=g)
    together = rowdot.rowdot(x, w)
    for i in range(40):
        assert torch.equal(rowdot.rowdot(x[i : i + 1], w)[0], together[i]), i
    # F.linear does not promise this (MKL's kernels round 1 row and 4 rows differently), which
    # is why a speculative step with it may differ from greedy decoding in the last bit


def test_leading_dimensions_and_strided_inputs():
    x = torch.randn(5, 2, 3, 48).transpose(0, 1)  # (2, 5, 3, 48), not contiguous
    w = torch.randn(64, 96)[:, ::2]  # (64, 48), not contiguous
    torch.testing.assert_close(rowdot.rowdot(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="float32"):
        rowdot.rowdot(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        rowdot.rowdot(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="do not fit"):
        rowdot.rowdot(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def test_rowdot_under_torch_compile():
    """Traced by torch.compile it is the custom op mtp::rowdot, with the same results."""
    w, b = torch.randn(33, 40), torch.randn(33)

    def f(x):
        return torch.relu(rowdot.rowdot(x * 2, w, b))
    x = torch.randn(4, 40)
    compiled = torch.compile(f, dynamic=False)
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("m,k,n", SHAPES + [(5, 48, 12), (9, 1536, 13)])
def test_the_packed_layout_gives_the_same_numbers_bit_for_bit(m, k, n):
    """rowdot_packed(x, pack(w)) equals rowdot(x, w) exactly: rows of x past one pass over a block
    (MC) and past 16, columns past the last full vector, weight rows past the last block of 4."""
    g = torch.Generator().manual_seed(m * 7 + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    wp = rowdot.pack(w)
    assert wp.shape == w.shape
    if n >= 4 and k >= 32:  # at least a block of 4 rows and two vectors a row: another order
        assert not torch.equal(wp, w)
    assert torch.equal(rowdot.rowdot_packed(x, wp, b), rowdot.rowdot(x, w, b))
    plain = rowdot.rowdot(x, w)
    assert torch.equal(rowdot.rowdot_packed(x, wp), plain)
    for i in range(m):  # each row alone too
        assert torch.equal(rowdot.rowdot_packed(x[i : i + 1], wp)[0], plain[i]), i


def test_packing_is_folded_into_a_compiled_graph_with_frozen_weights():
    """Compiled with frozen weights, rowdot_packed(x, pack(weight)) packs at compile time: the
    compiled calls run the product only, with the eager result."""
    from torch.profiler import profile

    from mtp.decode.compile import frozen

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(40, 64), nn.Linear(64, 24, bias=False)

        def forward(self, x):
            h = torch.relu(rowdot.rowdot_packed(x, rowdot.pack(self.a.weight), self.a.bias))
            return rowdot.rowdot_packed(h, rowdot.pack(self.b.weight))

    model = Two().eval()
    x = torch.randn(4, 40)
    with torch.no_grad():
        compiled = frozen(torch.compile(model, dynamic=False))
        assert torch.equal(compiled(x), model(x))
        with profile() as prof:
            compiled(x)
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("mtp::")}
    assert calls == {"mtp::rowdot_packed": 2}, calls


def test_the_library_is_built_once_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path))
    path = rowdot._library_path()
    assert path.parent == tmp_path / "kernels"
    rowdot._build(path)
    assert path.exists() and not [p for p in path.parent.iterdir() if p != path]  # no temporary left


def model_for(head_type="parallel", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=24, dim=32, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=96, multiple_of=16,
                      n_future=4, head_type=head_type, init_std=0.3)
    return MTPTransformer(cfg).eval()


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_speculative_decoding_with_rowdot_equals_its_greedy_decoding(head_type, monkeypatch):
    """Every product on rowdot (here forced: decoding's auto policy would measure which kernel is
    fastest): k = 4, ragged prompts, a batch, the same tokens as greedy decoding with rowdot, and
    as greedy decoding with F.linear on this model."""
    model = model_for(head_type)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 24, (n,), generator=g).tolist() for n in (5, 1, 9)]
    plain = generate(model, prompts, GenerationConfig(max_new_tokens=24, pack_weights=False)).tokens
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    calls = []
    real = rowdot.rowdot
    monkeypatch.setattr(rowdot, "rowdot", lambda *a: calls.append(1) or real(*a))
    with packed.packed_linears(model, kernel="rowdot") as n:
        assert n == n_linear
        greedy = generate(model, prompts, GenerationConfig(max_new_tokens=24, pack_weights=False)).tokens
        assert calls
        spec = generate(model, prompts, GenerationConfig(max_new_tokens=24, speculative=4, pack_weights=False)).tokens
    assert spec == greedy
    assert greedy == plain


def test_rowdot_linears_swaps_each_layer_for_the_block_only(monkeypatch):
    """Within rowdot_linears a model's linear layers compute 2..16 rows with rowdot (bit for bit
    the kernel's result), 1 row with F.linear; a layer with its own forward keeps it; after the
    block (an exception too) every layer is as it was."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8, bias=False))
    own = nn.Linear(24, 24)
    own.forward = lambda x: x  # a forward of its own (as packed_linears leaves one)
    model.append(own)
    x = torch.randn(4, 24, generator=g)
    with torch.no_grad(), packed.rowdot_linears(model):
        assert packed.kernel_of(model[0], 4) == "rowdot" and packed.kernel_of(model[0], 1) == "linear"
        assert torch.equal(model[0](x), rowdot.rowdot(x, model[0].weight, model[0].bias))
        assert torch.equal(model[1](model[0](x)), rowdot.rowdot(model[0](x), model[1].weight))
        calls = []
        real = rowdot.rowdot_packed
        monkeypatch.setattr(rowdot, "rowdot_packed", lambda *a: calls.append(1) or real(*a))
        model[0](x)  # 4 rows: on the packed layout (the same numbers, as checked above)
        xx = torch.cat([x, x])
        assert torch.equal(model[0](xx), rowdot.rowdot(xx, model[0].weight, model[0].bias))
        monkeypatch.undo()
        assert calls == [1]  # 8 rows: on the weight as stored
        assert torch.equal(model[0](x[:1]), F.linear(x[:1], model[0].weight, model[0].bias))
        assert model[2](x) is x
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    assert "forward" in own.__dict__
    with pytest.raises(RuntimeError), packed.rowdot_linears(model):
        raise RuntimeError("a step failed")
    assert "forward" not in model[0].__dict__ and packed.kernel_of(model[0], 4) == "linear"
