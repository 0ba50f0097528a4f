"""Export to Hugging Face transformers' Llama: same logits, same greedy tokens, save/load."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtp import ModelConfig, MTPError, MTPTransformer  # noqa: E402
from mtp.interop.hf import hf_llama_config, save_hf_llama, to_hf_llama  # noqa: E402

V = 96


def make_model(head_type="parallel", n_future=1, n_kv_heads=4, tie=False, n_layers=4, seed=0):
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads,
                      n_future=n_future, head_type=head_type, tie_embeddings=tie, max_seq_len=64,
                      multiple_of=16, rope_theta=500.0)
    torch.manual_seed(seed)
    model = MTPTransformer(cfg).eval()
    with torch.no_grad():  # weights far from init, so that any mix-up (rotary order, norms) shows
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # RMSNorm gains
            else:
                p.normal_(0.0, 0.15)
    return model


def tokens(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


CASES = [  # head_type, n_future, n_kv_heads, tied embeddings
    ("parallel", 1, 4, False),
    ("parallel", 1, 2, True),
    ("parallel", 3, 4, True),
    ("parallel", 3, 2, False),
    ("causal", 2, 2, False),
    ("sequential", 3, 2, True),
    ("linear", 3, 4, False),
    ("linear", 2, 2, True),
    ("anticausal", 1, 2, False),
]


@pytest.mark.parametrize("head_type,n_future,n_kv_heads,tie", CASES)
def test_same_logits(head_type, n_future, n_kv_heads, tie):
    model = make_model(head_type, n_future, n_kv_heads, tie)
    hf = to_hf_llama(model)
    assert not hf.training
    expected_layers = 4 if head_type == "linear" else 4 - n_future + 1
    assert hf.config.num_hidden_layers == expected_layers == len(model.layers)
    assert hf.config.num_key_value_heads == n_kv_heads
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1.0  # logits big enough for atol to mean something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_config_shapes():
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, n_future=2, multiple_of=16,
                      norm_eps=1e-6, rope_theta=1234.0, max_seq_len=48, tie_embeddings=True)
    c = hf_llama_config(cfg)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 3, 4, 2)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (cfg.ffn_hidden, V, 48)
    assert c.rms_norm_eps == 1e-6 and c.tie_word_embeddings and c.hidden_act == "silu"
    assert not c.attention_bias and not c.mlp_bias
    theta = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", None)}
    assert theta["rope_theta"] == 1234.0


def test_anticausal_refused():
    model = make_model("anticausal", n_future=3)
    with pytest.raises(MTPError, match="next-token path") as err:
        to_hf_llama(model)
    assert "\n" not in str(err.value)
    with pytest.raises(MTPError, match="next-token path"):
        hf_llama_config(model.config)


def test_missing_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MTPError, match=r"pip install 'mtp\[hf\]'"):
        to_hf_llama(make_model())


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = make_model("parallel", n_future=2, n_kv_heads=2, tie=tie)
    out = save_hf_llama(model, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_type,n_kv_heads", [("parallel", 2), ("linear", 4)])
def test_greedy_generate_matches(head_type, n_kv_heads):
    model = make_model(head_type, n_future=2, n_kv_heads=n_kv_heads, tie=True)
    hf = to_hf_llama(model)
    prompt, new = tokens(B=2, T=7, seed=3), 8
    seq = prompt
    with torch.no_grad():
        for _ in range(new):  # plain greedy decoding with our model, full recompute each step
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, use_cache=True)
    assert torch.equal(out, seq)
