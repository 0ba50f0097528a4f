"""Model tests: a reference Llama, layout, causality, config validation, init, training sanity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from mtp.config import HEAD_TYPES, ModelConfig, preset
from mtp.errors import MTPError
from mtp.losses import multi_token_targets, naive_loss
from mtp.decode.cache import KVCache, cached_attention
from mtp.model import MTPTransformer

V = 61  # a vocabulary size that matches no other dimension


def make(seed: int = 0, **kw) -> MTPTransformer:
    args = dict(vocab_size=V, dim=32, n_layers=5, n_heads=4, max_seq_len=32, multiple_of=16)
    args.update(kw)
    torch.manual_seed(seed)
    return MTPTransformer(ModelConfig(**args))


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Norm weights start at 1; perturb them so that a swapped/missing norm shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


# ---- an independent reference: Meta's Llama (complex RoPE, hand-made causal mask) -------------
def ref_precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))


def ref_rope(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis[None, :, None, :]  # (1, T, 1, hd/2)
    return torch.view_as_real(xq_ * fc).flatten(3).type_as(xq), torch.view_as_real(xk_ * fc).flatten(3).type_as(xk)


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RefAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c.n_heads, c.n_kv_heads, c.dim // c.n_heads
        self.wq = nn.Linear(c.dim, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(c.dim, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(c.dim, self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, c.dim, bias=False)

    def forward(self, x, freqs_cis, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.hd)
        k = self.wk(x).view(B, T, self.nkv, self.hd)
        v = self.wv(x).view(B, T, self.nkv, self.hd)
        q, k = ref_rope(q, k, freqs_cis)
        rep = self.nh // self.nkv  # Meta's repeat_kv
        k = k[:, :, :, None, :].expand(B, T, self.nkv, rep, self.hd).reshape(B, T, self.nh, self.hd)
        v = v[:, :, :, None, :].expand(B, T, self.nkv, rep, self.hd).reshape(B, T, self.nh, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd) + mask
        out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class RefFFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        hidden = int(2 * (4 * c.dim) / 3)
        if c.ffn_dim_multiplier is not None:
            hidden = int(c.ffn_dim_multiplier * hidden)
        hidden = c.multiple_of * ((hidden + c.multiple_of - 1) // c.multiple_of)
        self.w1 = nn.Linear(c.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention, self.feed_forward = RefAttention(c), RefFFN(c)
        self.attention_norm, self.ffn_norm = RefRMSNorm(c.dim, c.norm_eps), RefRMSNorm(c.dim, c.norm_eps)

    def forward(self, x, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class RefLlama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(RefBlock(c) for _ in range(c.n_layers))
        self.norm = RefRMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.freqs_cis = ref_precompute_freqs_cis(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)

    def forward(self, tokens):
        T = tokens.shape[1]
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cis[:T], mask)
        return self.output(self.norm(h))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(n_kv_heads=2),  # GQA
        dict(n_kv_heads=1, n_heads=4),  # MQA
        dict(tie_embeddings=True),
        dict(n_kv_heads=2, tie_embeddings=True, ffn_dim_multiplier=1.3, rope_theta=500.0, n_layers=3),
    ],
    ids=["plain", "gqa", "mqa", "tied", "gqa-tied-ffnmult"],
)
def test_matches_reference_llama(kw):
    model = make(**kw)
    randomize_norms(model)
    ref = RefLlama(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    if model.config.tie_embeddings:
        assert ref.output.weight is ref.tok_embeddings.weight
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        expected = ref(x)
        assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert_close(model(x, return_all_heads=True)[:, :, 0], expected, rtol=1e-5, atol=1e-5)
        # a prefix gives the prefix's logits (no dependence on T other than via the mask)
        assert_close(model(x[:, :11]), expected[:, :11], rtol=1e-5, atol=1e-5)
    # the comparison is not vacuous: a different seed's weights do not match
    other = make(seed=123, **kw)
    with torch.no_grad():
        assert (other(x) - expected).abs().max() > 1e-3


PLAIN_LLAMA_NAMES = {
    "tok_embeddings.weight", "norm.weight", "output.weight",
    *(f"layers.{i}.{s}.weight" for i in range(5) for s in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")),
}


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_n_future_1_is_a_plain_model(head_type):
    model = make(n_future=1, head_type=head_type)
    assert set(model.state_dict()) == PLAIN_LLAMA_NAMES
    assert len(model.extra_heads) == 0
    randomize_norms(model)
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        all_heads = model(x, return_all_heads=True)
        assert all_heads.shape == (2, 16, 1, V)
        assert_close(model(x), all_heads[:, :, 0], rtol=0, atol=0)
        ref = RefLlama(model.config)
        ref.load_state_dict(model.state_dict())
        assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_layout_is_parameter_matched(head_type):
    model = make(n_future=4, n_layers=5, head_type=head_type)
    if head_type == "linear":
        assert len(model.layers) == 5
        assert len(model.extra_heads) == 3
        assert all(isinstance(h, nn.Linear) and h.weight.shape == (32, 32) for h in model.extra_heads)
        assert model.head_module(0) is None
    else:
        assert len(model.layers) == 5 - 3
        assert len(model.extra_heads) == 3
        assert len(model.layers) + len(model.extra_heads) == 5
        assert len(model.trunk_blocks) == 1
        assert model.head_module(0) is model.layers[-1]
    assert [model.head_module(i) for i in (1, 2, 3)] == list(model.extra_heads)


def test_parameter_names_follow_meta():
    model = make(n_future=3, n_layers=4, head_type="parallel")
    names = set(model.state_dict())
    for expected in [
        "tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "layers.1.ffn_norm.weight",
        "extra_heads.0.attention.wq.weight", "extra_heads.1.feed_forward.w2.weight",
        "extra_heads.1.ffn_norm.weight", "norm.weight", "output.weight",
    ]:
        assert expected in names, expected
    assert "layers.2.attention.wq.weight" not in names and "extra_heads.2.attention.wq.weight" not in names
    # nothing but those names: no rope buffers or other state in the checkpoint
    allowed_prefixes = ("tok_embeddings.", "layers.", "extra_heads.", "norm.", "output.")
    assert all(n.startswith(allowed_prefixes) for n in names)
    assert not any("rope" in n for n in names)


def expected_parents(head_type: str, n: int) -> list[int]:
    """Written from the paper's / DESIGN's description, independently of model._parents."""
    if head_type in ("causal", "sequential"):
        return [-1] + [i - 1 for i in range(1, n)]
    if head_type == "anticausal":
        return [i + 1 for i in range(n - 1)] + [-1]
    return [-1] * n


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_heads_compose_as_documented(head_type):
    n = 4
    model = make(n_future=n, n_layers=5, head_type=head_type)
    randomize_norms(model)
    if head_type == "linear":
        with torch.no_grad():
            for h in model.extra_heads:  # move off the identity init
                h.weight.add_(0.05 * torch.randn_like(h.weight))
    assert model.parents == expected_parents(head_type, n)
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        all_heads = model(x, return_all_heads=True)
        assert all_heads.shape == (2, 16, n, V)
        h = model.trunk(x)
        parents = expected_parents(head_type, n)
        outs = {-1: h}
        order = [n - 1 - k for k in range(n)] if head_type == "anticausal" else list(range(n))
        for i in order:
            outs[i] = model.run_head(i, outs[parents[i]], x)
        for i in range(n):
            assert_close(all_heads[:, :, i], model.logits(outs[i]), rtol=1e-5, atol=1e-6)
        # model(x) is the next-token head
        assert_close(model(x), all_heads[:, :, 0], rtol=1e-5, atol=1e-6)
        # heads really differ (not n copies of one head)
        for i in range(1, n):
            assert (all_heads[:, :, i] - all_heads[:, :, 0]).abs().max() > 1e-4


def test_parallel_head_i_is_run_head_on_trunk():
    model = make(n_future=4, n_layers=5, head_type="parallel")
    randomize_norms(model)
    x = torch.randint(0, V, (3, 12))
    with torch.no_grad():
        all_heads = model(x, return_all_heads=True)
        h = model.trunk(x)
        for i in range(4):
            assert_close(all_heads[:, :, i], model.logits(model.run_head(i, h)), rtol=1e-5, atol=1e-6)
        # head 0 is the last block of `layers`, applied after the trunk blocks
        manual = model.tok_embeddings(x)
        cos, sin = model.rope(12)
        for block in model.layers:
            manual = block(manual, cos, sin)
        assert_close(model(x), model.output(model.norm(manual)), rtol=1e-5, atol=1e-6)


def test_linear_heads_start_as_the_next_token_head():
    model = make(n_future=3, n_layers=2, head_type="linear")  # n_future > n_layers is fine for linear
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        all_heads = model(x, return_all_heads=True)
    for i in range(1, 3):
        assert_close(all_heads[:, :, i], all_heads[:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_causality(head_type):
    n, T, t = 4, 16, 10
    model = make(n_future=n, n_layers=5, head_type=head_type)
    randomize_norms(model)
    x = torch.randint(0, V, (2, T))
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 7) % V
    with torch.no_grad():
        a, b = model(x, return_all_heads=True), model(x2, return_all_heads=True)
    for i in range(n):
        # sequential head i (0-based) reads the embedding of token s + i at position s
        first = t - i if head_type == "sequential" else t
        assert_close(a[:, :first, i], b[:, :first, i], rtol=0, atol=0)
        assert (a[:, first, i] - b[:, first, i]).abs().max() > 1e-5, f"head {i} did not see token {t}"
        assert (a[:, -1, i] - b[:, -1, i]).abs().max() > 1e-5


# ---- config ------------------------------------------------------------------------------------
BASE = dict(vocab_size=V, dim=32, n_layers=4, n_heads=4, max_seq_len=32)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_future=0),
        dict(n_future=5),
        dict(n_future=5, head_type="causal"),
        dict(n_future=5, head_type="sequential"),
        dict(dim=30),
        dict(dim=24, n_heads=8),  # head dim 3 is odd: no rotary pairs
        dict(n_kv_heads=3),
        dict(n_kv_heads=0),
        dict(head_type="tree"),
        dict(head_type="Parallel"),
        dict(n_future=3, offsets=[2, 3, 4]),
        dict(n_future=3, offsets=[1, 3, 3]),
        dict(n_future=3, offsets=[1, 4, 2]),
        dict(n_future=3, offsets=[1, 2]),
        dict(n_future=2, offsets=[1, 2, 3]),
        dict(n_future=3, offsets=[1, 2, 4], head_type="sequential"),
        dict(n_future=2, offsets=[1, 32]),  # not below max_seq_len
        dict(vocab_size=0),
        dict(n_layers=0),
    ],
)
def test_config_validation(kw):
    with pytest.raises(MTPError, match="invalid model config"):
        ModelConfig(**{**BASE, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_future=4),
        dict(n_future=6, n_layers=2, head_type="linear"),
        dict(n_future=3, offsets=[1, 2, 4], head_type="causal"),
        dict(n_future=3, offsets=[1, 2, 3], head_type="sequential"),
        dict(n_kv_heads=1),
    ],
)
def test_config_valid(kw):
    cfg = ModelConfig(**{**BASE, **kw})
    assert cfg.n_future == kw.get("n_future", 1)
    MTPTransformer(cfg)  # builds
    assert cfg.head_offsets == (kw.get("offsets") or list(range(1, cfg.n_future + 1)))


def test_config_round_trip():
    cfg = ModelConfig(**BASE, n_future=3, head_type="anticausal", offsets=[1, 2, 5], n_kv_heads=2,
                      tie_embeddings=True, ffn_dim_multiplier=1.5)
    d = cfg.to_dict()
    assert d["offsets"] == [1, 2, 5] and d["n_kv_heads"] == 2
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert back.to_dict() == d
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_config_json_round_trip(tmp_path):
    import json

    cfg = ModelConfig(**BASE, n_future=2)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(p) == cfg
    p.write_text("[1, 2]")
    with pytest.raises(MTPError):
        ModelConfig.from_json(p)
    p.write_text("{not json")
    with pytest.raises(MTPError):
        ModelConfig.from_json(p)


def test_config_from_dict_unknown_keys():
    with pytest.raises(MTPError, match="n_futures"):
        ModelConfig.from_dict({**BASE, "n_futures": 4})
    with pytest.raises(MTPError):
        ModelConfig.from_dict({**BASE, "dim": None})


@pytest.mark.parametrize("bad", [{"dim": "abc"}, {"offsets": "1,2"}])
def test_config_from_dict_malformed_values(bad):
    with pytest.raises(MTPError):
        ModelConfig.from_dict({**BASE, **bad})


def test_presets():
    cfg = preset("gpt2-124m", vocab_size=50304, n_future=4)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.n_future) == (768, 12, 12, 50304, 4)
    assert cfg.n_layer_blocks == 9 and cfg.n_trunk == 8
    assert cfg.ffn_hidden == 2048  # Meta's rule: int(2 * 4 * 768 / 3) = 2048, multiple of 256
    assert preset("7b", n_future=4).ffn_hidden == 11008  # Llama-2 7B's hidden size
    assert preset("tiny", head_type=None).head_type == "parallel"  # None overrides are ignored
    with pytest.raises(MTPError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(MTPError):
        preset("tiny", n_future=5)  # 5 heads, 4 blocks


# ---- initialisation and training sanity --------------------------------------------------------
@pytest.mark.parametrize(
    "head_type",
    HEAD_TYPES,
)
def test_init_stable_with_8_heads(head_type):
    model = make(n_future=8, n_layers=9, dim=64, head_type=head_type, vocab_size=V)
    torch.manual_seed(1)
    window = torch.randint(0, V, (4, 33))
    x = window[:, :-1]
    with torch.no_grad():
        h = model.trunk(x)
        outs = model.heads_hidden(h, x)
        ratios = [float(o.std() / h.std()) for o in outs]
        out = naive_loss(model, window, [1.0] * 8)
    assert all(0.5 < r < 2.0 for r in ratios), ratios
    for ce in out.per_head:
        assert abs(ce - math.log(V)) < 0.5, out.per_head


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_every_parameter_gets_a_gradient_and_training_reduces_the_loss(head_type):
    model = make(n_future=4, n_layers=5, head_type=head_type)
    torch.manual_seed(2)
    window = torch.randint(0, V, (4, 17))
    weights = [1.0] * 4
    out = naive_loss(model, window, weights)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
    first = float(out.loss.detach())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt.step()
    for _ in range(7):
        opt.zero_grad(set_to_none=True)
        naive_loss(model, window, weights).loss.backward()
        opt.step()
    with torch.no_grad():
        last = naive_loss(model, window, weights)
    assert float(last.loss) < first - 1.0, (first, float(last.loss))
    # every head learned, not only the next-token head
    assert all(l < f - 0.2 for l, f in zip(last.per_head, out.per_head)), (out.per_head, last.per_head)


def test_trunk_rejects_too_long_input():
    model = make(max_seq_len=16)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_labels_line_up_with_model_inputs():
    """Sanity link between targets and the model: with a memorising window, head i's labels at t are
    the input tokens at t + offset_i."""
    window = torch.arange(17)[None]  # (1, 17)
    labels = multi_token_targets(window, [1, 2, 4])
    x = window[:, :-1]
    assert torch.equal(labels[0, :12, 2], x[0, 4:16])


# ---- decoding kernels: what torch.compile runs equals what eager runs ----------------------------
def test_kv_cache_writes_the_same_when_compiled():
    """Compiled, the cache is written with index_put_ (in place for inductor), eager with scatter_."""
    torch.manual_seed(0)
    pos = torch.tensor([[3, 4, 5], [9, 10, 11]])
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    eager, compiled = KVCache(2, 2, 16, 4), KVCache(2, 2, 16, 4)
    ke, ve = eager.update(pos, k, v, 12)
    kc, vc = torch.compile(compiled.update, backend="aot_eager", fullgraph=True)(pos, k, v, 12)
    assert torch.equal(eager.k, compiled.k) and torch.equal(eager.v, compiled.v)
    assert torch.equal(ke, kc) and torch.equal(ve, vc)
    assert torch.equal(eager.k[1, :, 9:12], k[1]) and eager.k[1, :, :9].abs().sum() == 0


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cached_attention_compiled_on_cpu_matches_sdpa(n_kv_heads):
    """Compiled for a CPU, attention over the cache is written out (for inductor to fuse); it must
    equal scaled_dot_product_attention, grouped-query heads and masked positions included."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, n_kv_heads, 16, 8), torch.randn(2, n_kv_heads, 16, 8)
    pos = torch.tensor([[5, 6, 7], [10, 11, 12]])
    mask = torch.arange(16)[None, None, None, :] <= pos[:, None, :, None]
    eager = cached_attention(q, k, v, mask)
    compiled = torch.compile(cached_attention, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    k2 = k.clone()
    k2[:, :, 13:] = 1e3  # positions past every query's own: masked out
    assert_close(cached_attention(q, k2, v, mask), eager)
