"""Meta's multi-token release layout (params.json + consolidated.*.pth + tokenizer.model):
our logits against an independent re-implementation of the release's forward pass, model-parallel
shards, memory-mapped loading, conversion to an mtp checkpoint, and one-line errors."""

import io
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_one_line_error, run_cli
from mtp import MTPError
from mtp.checkpoint import inspect_checkpoint, load_checkpoint, read_meta
from mtp.interop import meta as meta_mod
from mtp.interop.meta import is_meta_dir, load_meta

spm = pytest.importorskip("sentencepiece")

TEXT = """def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
The quick brown fox jumps over the lazy dog, again and again.
Multi-token prediction trains a shared trunk with several independent heads.
import os, sys
for i in range(10): print(i, i * i)
class Stack:
    def push(self, x): self.items.append(x)
""".splitlines()


def train_sp(vocab_size: int) -> bytes:
    """A tiny Llama-like SentencePiece model (unk 0, <s> 1, </s> 2, byte fallback, identity
    normalisation, so any text round-trips), trained here in ~0.1 s."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 4), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_proto():
    return train_sp(320)


V = 320  # the SentencePiece vocabulary above


# ---- an independent re-implementation of the release's forward pass -------------------------
def meta_ffn_hidden(dim, multiple_of, mult):
    hidden = int(2 * (4 * dim) / 3)
    if mult is not None:
        hidden = int(mult * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_meta_state(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim, nh = params["dim"], params["n_heads"]
    nkv = params.get("n_kv_heads") or nh
    hd = dim // nh
    hidden = meta_ffn_hidden(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    nf = params.get("n_future_tokens", 1)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.15

    def gain():
        return 1 + 0.2 * torch.randn(dim, generator=g)

    def block(prefix):
        return {
            f"{prefix}.attention.wq.weight": w(nh * hd, dim), f"{prefix}.attention.wk.weight": w(nkv * hd, dim),
            f"{prefix}.attention.wv.weight": w(nkv * hd, dim), f"{prefix}.attention.wo.weight": w(dim, nh * hd),
            f"{prefix}.feed_forward.w1.weight": w(hidden, dim), f"{prefix}.feed_forward.w2.weight": w(dim, hidden),
            f"{prefix}.feed_forward.w3.weight": w(hidden, dim),
            f"{prefix}.attention_norm.weight": gain(), f"{prefix}.ffn_norm.weight": gain(),
        }

    sd = {"tok_embeddings.weight": w(params["vocab_size"], dim)}
    for i in range(params["n_layers"] - nf + 1):
        sd.update(block(f"layers.{i}"))
    for j in range(nf - 1):
        sd.update(block(f"extra_heads.{j}"))
    sd["norm.weight"] = gain()
    sd["output.weight"] = w(params["vocab_size"], dim)
    return sd


def ref_forward(sd, params, tokens):
    """Meta's llama/model.py forward, written out plainly: complex rotary on interleaved pairs,
    repeat_kv, an explicit causal mask; trunk = layers[:-1]; heads = [layers[-1]] + extra_heads,
    each on the trunk's output; shared norm and output. Returns (B, T, n, V)."""
    dim, nh, eps = params["dim"], params["n_heads"], params["norm_eps"]
    nkv = params.get("n_kv_heads") or nh
    hd, T = dim // nh, tokens.shape[1]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)

    def rms(x, wgt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wgt

    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def block(p, x):
        B = x.shape[0]
        h = rms(x, sd[f"{p}.attention_norm.weight"])
        q = (h @ sd[f"{p}.attention.wq.weight"].T).view(B, T, nh, hd)
        k = (h @ sd[f"{p}.attention.wk.weight"].T).view(B, T, nkv, hd)
        v = (h @ sd[f"{p}.attention.wv.weight"].T).view(B, T, nkv, hd)
        q, k = rot(q), rot(k)
        k = k[:, :, :, None, :].expand(B, T, nkv, nh // nkv, hd).reshape(B, T, nh, hd)
        v = v[:, :, :, None, :].expand(B, T, nkv, nh // nkv, hd).reshape(B, T, nh, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, -1) @ sd[f"{p}.attention.wo.weight"].T
        h = rms(x, sd[f"{p}.ffn_norm.weight"])
        ff = (F.silu(h @ sd[f"{p}.feed_forward.w1.weight"].T) * (h @ sd[f"{p}.feed_forward.w3.weight"].T))
        return x + ff @ sd[f"{p}.feed_forward.w2.weight"].T

    nf = params.get("n_future_tokens", 1)
    n_blocks = params["n_layers"] - nf + 1
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(n_blocks - 1):
        h = block(f"layers.{i}", h)
    heads = [f"layers.{n_blocks - 1}"] + [f"extra_heads.{j}" for j in range(nf - 1)]
    latents = torch.stack([block(p, h) for p in heads], dim=-2)  # (B, T, n, D)
    return rms(latents, sd["norm.weight"]) @ sd["output.weight"].T


PARAMS = dict(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16,
              ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500.0, n_future_tokens=3)


def write_release(root, sp_proto, params=PARAMS, shards=1, seed=0, tokenizer_in_parent=True):
    """A release like facebook/multi-token-prediction: root/tokenizer.model, root/7B_x/{params.json,
    consolidated.0k.pth}. Model-parallel shards are split as fairscale does."""
    d = root / "tiny_mtp"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params))
    (root if tokenizer_in_parent else d).joinpath("tokenizer.model").write_bytes(sp_proto)
    sd = random_meta_state(params, seed)
    for r in range(shards):
        part = {}
        for k, v in sd.items():
            if k == "tok_embeddings.weight" or k.endswith(("wo.weight", "w2.weight")):
                part[k] = v.chunk(shards, dim=1)[r].clone()
            elif v.dim() == 2:
                part[k] = v.chunk(shards, dim=0)[r].clone()
            else:
                part[k] = v.clone()
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    return d, sd


def tokens(B=2, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_future,n_kv_heads", [(3, 2), (1, 4), (2, 1)])
def test_logits_match_reference(tmp_path, sp_proto, n_future, n_kv_heads):
    params = dict(PARAMS, n_future_tokens=n_future, n_kv_heads=n_kv_heads)
    d, sd = write_release(tmp_path, sp_proto, params)
    model, tok, meta = load_meta(d)
    cfg = model.config
    # Meta's n_layers counts every block: n_layers - n + 1 in `layers`, n - 1 extra heads
    assert (cfg.n_layers, cfg.n_future, cfg.head_type) == (5, n_future, "parallel")
    assert len(model.layers) == 5 - n_future + 1 and len(model.extra_heads) == n_future - 1
    x = tokens()
    with torch.no_grad():
        ours, ref = model(x, return_all_heads=True), ref_forward(sd, params, x)
        nxt = model(x)
    assert ours.shape == (2, 20, n_future, V) and ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(nxt, ref[:, :, 0], atol=2e-5, rtol=2e-5)
    assert meta["source"] == "meta" and tok.vocab_size == V


def test_model_parallel_shards_merged(tmp_path, sp_proto):
    d1, sd = write_release(tmp_path / "one", sp_proto, shards=1)
    d2, _ = write_release(tmp_path / "two", sp_proto, shards=2)
    assert len(list(d2.glob("consolidated.*.pth"))) == 2
    m1, _, _ = load_meta(d1)
    m2, _, _ = load_meta(d2)
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(m2(x, return_all_heads=True), ref_forward(sd, PARAMS, x), atol=2e-5, rtol=2e-5)


def test_weights_are_memory_mapped_not_copied(tmp_path, sp_proto, monkeypatch):
    d, _ = write_release(tmp_path, sp_proto)
    calls, loaded = [], {}
    real_load = torch.load

    def spy(f, *a, **kw):
        calls.append(kw)
        sd = real_load(f, *a, **kw)
        loaded.update({k: v.data_ptr() for k, v in sd.items()})
        return sd

    monkeypatch.setattr(meta_mod.torch, "load", spy)
    model, _, _ = load_meta(d)
    assert calls and all(kw.get("mmap") is True and kw.get("weights_only") is True for kw in calls)
    for k, p in model.state_dict().items():
        assert p.data_ptr() == loaded[k], f"{k} was copied"
    # dtype conversion on request
    model16, _, _ = load_meta(d, dtype=torch.bfloat16)
    assert model16.output.weight.dtype == torch.bfloat16


# ---- conversion and direct loading ------------------------------------------------------------
def test_convert_cli_and_sentencepiece_tokenizer(tmp_path, sp_proto, capsys):
    from mtp.tokenizers import SentencePieceTokenizer, load_tokenizer

    d, sd = write_release(tmp_path, sp_proto)
    out = tmp_path / "ckpt"
    rc, stdout, _ = run_cli(["convert", "meta", d, out, "--json"], capsys)
    assert rc == 0
    report = json.loads(stdout)
    assert report["n_layers"] == 5 and report["n_future"] == 3 and report["out"] == str(out)
    model, tok, meta = load_checkpoint(out)
    assert meta["model"].n_future == 3 and meta["format_version"] == 1
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_all_heads=True), ref_forward(sd, PARAMS, x), atol=2e-5, rtol=2e-5)
    # the tokenizer: Llama's SentencePiece, eot = </s>
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(load_tokenizer(out), SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    assert tok.vocab_size == V == sp.get_piece_size()
    assert tok.eot_id == sp.piece_to_id("</s>") == 2
    text = "def fibonacci(n):\n    return n  # émigré ✓"
    ids = tok.encode(text)
    assert ids == sp.encode(text) and tok.eot_id not in ids and 1 not in ids  # no bos / eos added
    assert tok.decode(ids) == text
    assert tok.decode([1] + ids + [tok.eot_id]) == text  # control tokens dropped
    assert tok.eot_id not in tok.encode("a </s> b")  # a special's text is ordinary text
    assert tok.encode_batch(["def", "class"]) == [tok.encode("def"), tok.encode("class")]
    # converting again without --overwrite refuses, and leaves the checkpoint alone
    before = (out / "model.safetensors").stat().st_mtime_ns
    rc, _, err = run_cli(["convert", "meta", d, out], capsys)
    assert_one_line_error(rc, err, "exists", "--overwrite")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert run_cli(["convert", "meta", d, out, "--overwrite", "--dtype", "bfloat16"], capsys)[0] == 0
    assert load_checkpoint(out)[0].output.weight.dtype == torch.float32  # our loader builds float32


def test_load_checkpoint_reads_meta_dir_directly(tmp_path, sp_proto, capsys):
    d, sd = write_release(tmp_path, sp_proto, tokenizer_in_parent=False)
    assert is_meta_dir(d) and not is_meta_dir(tmp_path)
    model, tok, meta = load_checkpoint(d)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_all_heads=True), ref_forward(sd, PARAMS, x), atol=2e-5, rtol=2e-5)
    assert read_meta(d)["model"] == model.config
    shell, tok2, _ = inspect_checkpoint(d)
    assert shell.output.weight.is_meta and tok2.vocab_size == V
    rc, out, err = run_cli(["info", d, "--json"], capsys)
    assert rc == 0, err
    rc, out, err = run_cli(["generate", d, "--prompt", "def fib", "--max-new-tokens", "6"], capsys)
    assert rc == 0, err


def test_convert_meta_max_seq_len(tmp_path, sp_proto, capsys):
    d, _ = write_release(tmp_path, sp_proto)
    out = tmp_path / "c"
    rc, _, err = run_cli(["convert", "meta", d, out, "--max-seq-len", "64"], capsys)
    assert rc == 0, err
    assert load_checkpoint(out)[0].config.max_seq_len == 64


# ---- what must be refused, in one line ---------------------------------------------------------
def test_not_meta_nor_hf_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    rc, _, err = run_cli(["convert", "meta", empty, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "not a Meta checkpoint directory", "params.json")
    rc, _, err = run_cli(["convert", "hf", empty, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "not a Hugging Face model directory")
    rc, _, err = run_cli(["generate", empty, "--prompt", "x"], capsys)
    assert_one_line_error(rc, err, "is not a checkpoint", "Meta")
    assert not (tmp_path / "o").exists()


def test_hf_directory_given_to_convert_meta(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = run_cli(["convert", "meta", hf, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "not a Meta checkpoint directory", "mtp convert hf")


def test_meta_directory_given_to_convert_hf(tmp_path, sp_proto, capsys):
    d, _ = write_release(tmp_path, sp_proto)
    rc, _, err = run_cli(["convert", "hf", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "mtp convert meta")


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads"])
def test_missing_params_fields(tmp_path, sp_proto, capsys, field):
    d, _ = write_release(tmp_path, sp_proto)
    params = dict(PARAMS)
    del params[field]
    (d / "params.json").write_text(json.dumps(params))
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "lacks required fields", field)
    assert not (tmp_path / "o").exists()


def test_bad_params(tmp_path, sp_proto, capsys):
    d, _ = write_release(tmp_path, sp_proto)
    (d / "params.json").write_text(json.dumps(dict(PARAMS, use_scaled_rope=True)))
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "use_scaled_rope")
    (d / "params.json").write_text("{not json")
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "params.json")
    # n_layers read as "blocks in layers only" does not fit the weights: refused, explained
    (d / "params.json").write_text(json.dumps(dict(PARAMS, n_layers=3)))
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "n_layers=3", "the weights hold 3 and 2")
    # a wrong multiple_of changes the SwiGLU width: the shapes disagree
    (d / "params.json").write_text(json.dumps(dict(PARAMS, multiple_of=64)))
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "feed_forward", "shape")


def test_vocab_size_from_weights_when_minus_one(tmp_path, sp_proto):
    d, sd = write_release(tmp_path, sp_proto)
    (d / "params.json").write_text(json.dumps(dict(PARAMS, vocab_size=-1)))  # Llama 2's params.json says -1
    model, _, _ = load_meta(d)
    assert model.config.vocab_size == V


def test_tokenizer_vocab_mismatch(tmp_path, sp_proto, capsys):
    d, _ = write_release(tmp_path, sp_proto)
    (tmp_path / "tokenizer.model").write_bytes(train_sp(340))
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "the tokenizer has 340 ids", f"vocab_size is {V}")
    rc, _, err = run_cli(["generate", d, "--prompt", "x"], capsys)
    assert_one_line_error(rc, err, "the tokenizer has 340 ids")
    assert not (tmp_path / "o").exists()


def test_missing_tokenizer_and_corrupt_weights(tmp_path, sp_proto, capsys):
    d, _ = write_release(tmp_path, sp_proto)
    (tmp_path / "tokenizer.model").unlink()
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "no tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    (d / "consolidated.00.pth").write_bytes(b"not a zip file")
    rc, _, err = run_cli(["convert", "meta", d, tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "cannot load", "consolidated.00.pth")


def test_sentencepiece_missing(tmp_path, sp_proto, monkeypatch):
    from mtp.tokenizers import SentencePieceTokenizer

    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(MTPError, match=r"pip install 'mtp\[gguf\]'"):
        SentencePieceTokenizer.from_file(tmp_path / "tokenizer.model")


def test_get_tokenizer_reads_sentencepiece(tmp_path, sp_proto):
    from mtp.tokenizers import SentencePieceTokenizer, get_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    for spec in (tmp_path / "tokenizer.model", tmp_path):
        tok = get_tokenizer(spec)
        assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == V
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(MTPError, match="cannot load SentencePiece model"):
        get_tokenizer(tmp_path / "bad.model")


def test_meta_prompts_start_with_bos_as_the_release_generates(tmp_path, sp_proto, capsys):
    """Meta's release generates from encode(prompt, bos=True): `mtp generate` on a release
    directory gives the greedy tokens of the independent reference forward pass fed <s> + prompt
    (and not those of the prompt alone), and `mtp info` says so."""
    d, sd = write_release(tmp_path, sp_proto)
    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    text, n_new = "def fib", 8

    def reference_greedy(ids):
        ids = list(ids)
        with torch.no_grad():
            for _ in range(n_new):
                ids.append(int(ref_forward(sd, PARAMS, torch.tensor([ids]))[0, -1, 0].argmax()))
        return ids[-n_new:]

    with_bos, without = reference_greedy([sp.bos_id()] + sp.encode(text)), reference_greedy(sp.encode(text))
    assert with_bos != without  # the test can tell the two apart
    for k in ("1", "3"):
        rc, out, err = run_cli(["generate", d, "--prompt", text, "--max-new-tokens", str(n_new), "--speculative", k,
                                "--json"], capsys)
        assert rc == 0, err
        res = json.loads(out)
        assert res["tokens"] == with_bos and res["prompt_tokens"] == len(sp.encode(text)) + 1, k
    rc, out, err = run_cli(["info", d, "--json"], capsys)
    assert json.loads(out)["tokenizer"]["prompt_start_ids"] == [sp.bos_id()]
    rc, out, err = run_cli(["info", d], capsys)
    assert "prompts: starts with '<s>' (id 1)" in out
