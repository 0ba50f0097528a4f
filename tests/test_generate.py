"""Decoding: cached = uncached greedy, speculative greedy = plain greedy for every head type at
batch 1 and ragged batches, speculative sampling = plain sampling (chi-square), stops, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from mtp.config import HEAD_TYPES, ModelConfig
from mtp.decode import packed, rowdot
from mtp.decode.compile import kept_decoders
from mtp.decode.sampling import greedy_accept, process_logits
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate, usable_heads
from mtp.losses import naive_loss
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer

V = 32


def markov_batch(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """Rows of a partly predictable chain: x -> 5x + 3 mod V, except after tokens >= 27, which
    are followed by a random token. A briefly trained model drafts some of it right, some wrong."""
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (B,), generator=g)
    for t in range(1, T):
        rand = torch.randint(0, V, (B,), generator=g)
        x[:, t] = torch.where(x[:, t - 1] >= 27, rand, (5 * x[:, t - 1] + 3) % V)
    return x


@functools.lru_cache(maxsize=None)
@torch.enable_grad()  # its first caller may be a test under no_grad (the order of tests varies with xdist)
def trained(head_type: str, n_kv_heads: int = 2) -> MTPTransformer:
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=V, dim=32, n_layers=5, n_heads=4, n_kv_heads=n_kv_heads,
                                       max_seq_len=64, multiple_of=16, n_future=4, head_type=head_type))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        loss = naive_loss(model, markov_batch(g, 16, 33), [1.0] * 4).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_copy(head_type: str) -> MTPTransformer:
    """A fresh copy of trained(head_type), for a test that changes it or keeps compiled decoders
    on it (the cached model is shared by every test)."""
    model = MTPTransformer(trained(head_type).config).eval()
    model.load_state_dict(trained(head_type).state_dict())
    return model


def prompts_for(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [markov_batch(g, 1, n)[0].tolist() for n in lengths]


@torch.no_grad()
def reference_greedy(model, prompt, n_new, eot=None):
    """Plain greedy decoding without any cache: the whole sequence through the model each step."""
    toks = list(prompt)
    for _ in range(n_new):
        toks.append(int(model(torch.tensor([toks]))[0, -1].argmax()))
        if toks[-1] == eot:
            break
    return toks[len(prompt):]


RAGGED = (5, 1, 11, 3)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cached_greedy_equals_uncached(head_type, n_kv_heads):
    model = trained(head_type, n_kv_heads)
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 20) for p in prompts]
    for bucket in (128, 4):  # attention over the whole cache, or cut to a multiple of 4 positions
        out = generate(model, prompts, GenerationConfig(max_new_tokens=20, speculative=1, kv_bucket=bucket))
        assert out.tokens == refs
        assert out.stats.tokens_per_forward == 1.0 and out.stats.forward_passes == 20
        assert out.stop_reasons == ["length"] * 4


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_greedy_equals_plain_greedy(head_type):
    model = trained(head_type)
    for prompts in (prompts_for([7]), prompts_for(RAGGED)):
        refs = [reference_greedy(model, p, 24) for p in prompts]
        for k in (2, 3, 4):
            counts = []
            out = generate(model, prompts, GenerationConfig(max_new_tokens=24, speculative=k, kv_bucket=8),
                           on_step=lambda toks: counts.append([len(t) for t in toks]))
            assert out.tokens == refs, f"k={k}"
            assert [sum(c) for c in zip(*counts)] == [24] * len(prompts)  # the stream is the output
            assert max(max(c) for c in counts) > 1  # drafts were accepted ...
            assert out.stats.forward_passes > 24 / k  # ... and rejected
            if len(prompts) > 1:  # rows accepted different numbers of tokens in the same step
                assert any(len(set(c)) > 1 for c in counts)


@torch.no_grad()
def reference_drafts(model, seq, k):
    """What heads 2..k draft after the committed tokens seq, computed without any cache: every
    head on the whole sequence; sequential heads read token t + i, the last ones being drafts."""
    x = torch.tensor([seq[:-1]])  # the verifier's last input is seq[-2]; it produced seq[-1]
    if model.config.head_type != "sequential":
        logits = model(x, return_all_heads=True)[0, -1]  # (n, V)
        return logits[1:k].argmax(-1).tolist()
    h = model.run_head(0, model.trunk(x))
    ext, drafts = list(seq), []
    for i in range(1, k):
        h = model.run_head(i, h, future_tokens=torch.tensor([ext[i : i + x.shape[1]]]))
        drafts.append(int(model.logits(h[0, -1]).argmax()))
        ext.append(drafts[-1])
    return drafts


@torch.no_grad()
def reference_speculative(model, prompt, n_new, k):
    """Self-speculative greedy decoding without caches: tokens committed at each step."""
    seq = list(prompt) + [int(model(torch.tensor([prompt]))[0, -1].argmax())]
    counts = [1]
    while len(seq) - len(prompt) < n_new:
        drafts = reference_drafts(model, seq, k)
        verify = model(torch.tensor([seq + drafts]))[0, -k:].argmax(-1).tolist()
        a = 0
        while a < k - 1 and drafts[a] == verify[a]:
            a += 1
        new = (drafts[:a] + [verify[a]])[: n_new - (len(seq) - len(prompt))]
        seq += new
        counts.append(len(new))
    return seq[len(prompt):], counts


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_drafts_and_acceptance_match_an_uncached_reference(head_type):
    """The heads' caches are right: each step accepts exactly as many tokens as speculative
    decoding that recomputes everything from scratch (output equality alone would not show it).
    A random model over 8 tokens accepts drafts by chance and is sensitive to stale cache entries
    (a sequential-head window one position short fails here); the trained one accepts often."""
    torch.manual_seed(0)
    random_model = MTPTransformer(ModelConfig(vocab_size=8, dim=32, n_layers=5, n_heads=4, max_seq_len=64,
                                              multiple_of=16, n_future=4, head_type=head_type, init_std=0.3)).eval()
    g = torch.Generator().manual_seed(0)
    cases = [(trained(head_type), prompts_for([6], seed=4)[0])]
    cases += [(random_model, torch.randint(0, 8, (6,), generator=g).tolist()) for _ in range(3)]
    for model, prompt in cases:
        for k in (2, 4):
            ref_tokens, ref_counts = reference_speculative(model, prompt, 24, k)
            counts = []
            out = generate(model, [prompt], GenerationConfig(max_new_tokens=24, speculative=k),
                           on_step=lambda toks: counts.append(len(toks[0])))
            assert out.tokens == [ref_tokens]
            assert counts == ref_counts, f"k={k}"


def test_speculative_accepts_most_drafts_when_heads_are_right():
    """On the deterministic part of the chain the heads are right: many tokens per forward."""
    model = trained("parallel")
    g = torch.Generator().manual_seed(5)
    prompt = [3]
    while len(prompt) < 6:  # a prompt inside the deterministic part of the chain
        prompt.append((5 * prompt[-1] + 3) % V)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=24, speculative=4))
    assert out.tokens == [reference_greedy(model, prompt, 24)]
    del g
    assert out.stats.tokens_per_forward > 1.3


def test_one_head_is_plain_decoding():
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=V, dim=32, n_layers=3, n_heads=4, max_seq_len=64,
                                       multiple_of=16, n_future=1)).eval()
    prompts = prompts_for(RAGGED)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10))
    assert out.stats.k == 1 and out.stats.acceptance_by_head == []
    assert out.tokens == [reference_greedy(model, p, 10) for p in prompts]
    with pytest.raises(MTPError, match="more than the model's 1 head"):
        generate(model, prompts, GenerationConfig(speculative=2))


def test_end_of_text_stops_each_row():
    model = trained("parallel")
    prompts = prompts_for(RAGGED)
    free = [reference_greedy(model, p, 30) for p in prompts]
    eot = free[0][4]  # a token the first row produces early
    for k in (1, 4):
        out = generate(model, prompts, GenerationConfig(max_new_tokens=30, speculative=k, eot_id=eot))
        assert out.tokens == [reference_greedy(model, p, 30, eot=eot) for p in prompts]
        assert out.stop_reasons[0] == "eot" and out.tokens[0][-1] == eot
        for toks, reason in zip(out.tokens, out.stop_reasons):
            assert reason == ("eot" if eot in toks else "length")


def test_stop_strings_cut_the_text():
    tok = ByteTokenizer()
    torch.manual_seed(3)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=4, n_heads=4, max_seq_len=64,
                                       multiple_of=16, n_future=2)).eval()
    prompt = tok.encode("def f(x):")
    free = reference_greedy(model, prompt, 20)
    free_text = tok.decode(free)
    stop = free_text[6:8]
    for k in (1, 2):
        out = generate(model, [prompt], GenerationConfig(max_new_tokens=20, speculative=k, stop=[stop]),
                       tokenizer=tok)
        cut = free_text.find(stop)
        assert out.texts == [free_text[:cut]]
        assert out.stop_reasons == ["stop"]
        assert out.tokens[0] == free[: len(out.tokens[0])] and stop in tok.decode(out.tokens[0])
        assert stop not in tok.decode(out.tokens[0][:-1])


def test_context_limit_stops_rows():
    model = trained("parallel")
    prompts = prompts_for([60, 50])
    out = generate(model, prompts, GenerationConfig(max_new_tokens=30, speculative=3))
    assert [len(t) for t in out.tokens] == [4, 14]  # max_seq_len 64
    assert out.stop_reasons == ["context", "context"]
    assert out.tokens == [reference_greedy(model, p, 64 - len(p)) for p in prompts]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1] * 64]), "no room in the model's context of 64"),
    (dict(prompts=[[1, 99]]), "outside the model's vocabulary"),
    (dict(speculative=5), "more than the model's 4 heads"),
    (dict(speculative=0), "at least 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
    (dict(top_k=0), "top-k must be at least 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(stop=["x"]), "stop strings need a tokenizer"),
])
def test_bad_input(kwargs, match):
    model = trained("parallel")
    prompts = kwargs.pop("prompts", [[1, 2]])
    with pytest.raises(MTPError, match=match):
        generate(model, prompts, GenerationConfig(**kwargs))


def test_far_offsets_limit_speculation():
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=V, dim=32, n_layers=5, n_heads=4, max_seq_len=64,
                                       multiple_of=16, n_future=4, offsets=[1, 2, 4, 8])).eval()
    assert usable_heads(model) == 2
    out = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8))
    assert out.stats.k == 2
    with pytest.raises(MTPError, match="heads 1..3 must predict offsets 1..3"):
        generate(model, [[1, 2, 3]], GenerationConfig(speculative=3))


# ---- sampling ---------------------------------------------------------------------------------
def test_process_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.allclose(process_logits(logits, 1.0, None, 1.0), torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.allclose(process_logits(logits, 1.0, 2, 1.0), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    # top-p 0.7: the smallest set of tokens holding 0.7 is {0.5, 0.25}
    assert torch.allclose(process_logits(logits, 1.0, None, 0.7), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    assert torch.allclose(process_logits(logits, 1.0, None, 0.75), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    assert torch.allclose(process_logits(logits, 1.0, None, 0.76), torch.tensor([[0.5, 0.25, 0.15, 0]]) / 0.9)
    hot = process_logits(logits, 2.0, None, 1.0)
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))


SV, N_SAMPLES = 5, 6000


def sampling_model(head_type: str) -> MTPTransformer:
    torch.manual_seed(11)
    return MTPTransformer(ModelConfig(vocab_size=SV, dim=16, n_layers=4, n_heads=2, max_seq_len=16,
                                      multiple_of=16, n_future=3, head_type=head_type, init_std=0.5)).eval()


@torch.no_grad()
def exact_joint(model, prompt, n, temperature, top_k, top_p) -> torch.Tensor:
    """P(x1..xn | prompt) of plain sampling, for every continuation (index x1 * V^(n-1) + ...)."""
    seqs, probs = torch.tensor([prompt]), torch.ones(1)
    for _ in range(n):
        p = process_logits(model(seqs)[:, -1], temperature, top_k, top_p)  # (M, V)
        probs = (probs[:, None] * p).reshape(-1)
        nxt = torch.arange(SV).repeat(seqs.shape[0])[:, None]
        seqs = torch.cat([seqs.repeat_interleave(SV, 0), nxt], 1)
    return probs


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    small = expected < 5  # pool the rare outcomes into one bin
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert obs[~keep].sum() == 0, "samples fell where plain sampling has no mass"
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    assert dof >= 4, "too few outcomes for a meaningful test"
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def sample_counts(model, prompt, k, n, **kw) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=n, speculative=k, seed=1234, **kw)
    out = generate(model, [prompt] * N_SAMPLES, cfg)
    codes = torch.tensor([sum(t * SV ** (n - 1 - i) for i, t in enumerate(toks)) for toks in out.tokens])
    return torch.bincount(codes, minlength=SV ** n), out


@pytest.mark.parametrize("head_type, k, kw", [
    ("parallel", 1, dict(temperature=1.0)),
    ("parallel", 3, dict(temperature=1.0)),
    ("sequential", 3, dict(temperature=1.0)),
    ("parallel", 3, dict(temperature=1.5, top_k=4, top_p=0.9)),
])
def test_speculative_sampling_matches_plain_sampling(head_type, k, kw):
    model, prompt, n = sampling_model(head_type), [1, 3, 0], 3
    counts, out = sample_counts(model, prompt, k, n, **kw)
    probs = exact_joint(model, prompt, n, kw["temperature"], kw.get("top_k"), kw.get("top_p", 1.0))
    if k > 1:  # drafts were both accepted and rejected, so both branches were tested
        assert 0.05 < out.stats.acceptance_by_head[0] < 0.95
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_chi_square_catches_a_wrong_residual(monkeypatch):
    """The same test fails when a rejected draft is replaced by a sample from p instead of
    from normalize(max(p - q, 0)): the test can tell the right residual from a wrong one."""
    import mtp.decode.sampling as gen

    model, prompt, n = sampling_model("parallel"), [1, 3, 0], 3
    probs = exact_joint(model, prompt, n, 1.0, None, 1.0)
    monkeypatch.setattr(gen, "residual_distribution", lambda p, q: p)
    counts, _ = sample_counts(model, prompt, 3, n, temperature=1.0)
    assert chi_square_pvalue(counts, probs) < 1e-6


def test_sampling_is_reproducible_with_a_seed():
    model = trained("parallel")
    prompts = prompts_for(RAGGED)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7, speculative=3)
    a, b = generate(model, prompts, cfg), generate(model, prompts, cfg)
    c = generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8, speculative=3))
    assert a.tokens == b.tokens and a.tokens != c.tokens


@pytest.mark.skipif(not rowdot.available(), reason="mtp's rowdot kernel does not build here")
@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_compiled_decoding_on_rowdot_equals_eager(head_type, monkeypatch):
    """Where the eager decoder would pack (here asked for), a float32 CPU step is compiled with its
    products of 2-16 rows on mtp's rowdot kernel: the same tokens as greedy, the same drafts as
    eager, and later calls reuse the graphs (nothing is traced again)."""
    import mtp.decode.compile as C

    plans = []
    real = C.with_rowdot
    monkeypatch.setattr(C, "with_rowdot", lambda dec, wrap: plans.append(dec.k) or real(dec, wrap))
    model = trained_copy(head_type)
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 12) for p in prompts]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=12, speculative=3))
    cfg = GenerationConfig(max_new_tokens=12, speculative=3, compile=True, pack_weights=True)
    out = generate(model, prompts, cfg)
    assert plans == [3]
    assert out.tokens == refs
    assert out.stats.forward_passes == eager.stats.forward_passes
    frames = dict(torch._dynamo.utils.counters["frames"])
    again = generate(model, prompts, cfg)
    assert again.tokens == refs
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # nothing traced again
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is as it was


@pytest.mark.parametrize("head_type", ["causal", "parallel"])  # parallel: the stacked heads compiled
def test_compiled_decoding_equals_eager(head_type):
    """torch.compile'd decode steps (CUDA graphs on GPU; frozen weights and C++ GEMMs on CPU) give
    the same tokens, a second call reuses the compiled decoder, and changed weights are followed."""
    model = trained_copy(head_type)  # its weights are changed below
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 16) for p in prompts]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3))
    for _ in range(2):
        out = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3, compile=True))
        assert out.tokens == refs
        # the same drafts too: wrong drafts leave the tokens right (the verifier decides) but cost speed
        assert out.stats.forward_passes == eager.stats.forward_passes
        assert out.stats.acceptance_by_head == pytest.approx(eager.stats.acceptance_by_head)
    assert len(kept_decoders(model)) == 1
    # the kept decoder with other budgets (the same graphs): its state is read afresh, not
    # compiled in with the first call's values (the budget once was, on a CPU: frozen with the weights)
    for n in (24, 5):
        out_n = generate(model, prompts, GenerationConfig(max_new_tokens=n, speculative=3, compile=True))
        assert out_n.tokens == [reference_greedy(model, p, n) for p in prompts], n
    assert len(kept_decoders(model)) == 1
    if head_type == "parallel":
        # on a CPU the weights are compiled in as constants: changed weights must be compiled again
        with torch.no_grad():
            for p in [*model.layers[0].parameters(), *model.extra_heads[0].parameters()]:
                p.mul_(-1.5)
        refs = [reference_greedy(model, p, 16) for p in prompts]
        assert refs != out.tokens
        out = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3, compile=True))
        assert out.tokens == refs


@pytest.mark.skipif(not packed.applies(nn.Linear(4, 4)), reason="this torch build or CPU cannot pack float32 weights")
def test_compiled_prepacked_decoding_equals_eager(monkeypatch):
    """Where the eager decoder would pack the weights (here asked for: --pack-weights on), the
    CPU's compiled step has inductor prepack them into oneDNN's layout: the same tokens as
    greedy, the same drafts as eager, and that plan was the one compiled."""
    import mtp.decode.compile as C

    plans = []
    real = C.compile_plan
    monkeypatch.setattr(C, "compile_plan", lambda device, prepack=False: plans.append(prepack) or real(device, prepack))
    monkeypatch.setattr(C, "uses_rowdot", lambda model, pack_weights: False)  # where rowdot is not built
    model = trained_copy("parallel")
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 12) for p in prompts]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=12, speculative=3))
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12, speculative=3, compile=True, pack_weights=True))
    assert plans == [True]
    assert real(torch.device("cpu"), True)[0]["options"]["cpp.weight_prepack"] is True
    assert out.tokens == refs
    assert out.stats.forward_passes == eager.stats.forward_passes
    # auto on a model this small (its weights stay in cache): the plan whose graphs are cached
    generate(model, prompts, GenerationConfig(max_new_tokens=12, speculative=3, compile=True))
    assert plans == [True, False]


@pytest.mark.parametrize("head_type", ["causal", "parallel"])
def test_gpu_compile_plan_on_cpu_equals_eager(head_type, monkeypatch):
    """The GPU's compile plan (weights as graph inputs, mode reduce-overhead, whose CUDA graphs a
    CPU leaves out) run on a CPU: greedy and sampled tokens equal eager decoding's, so the step
    graphs that update the decoder's state in place are checked before a GPU ever runs them."""
    import mtp.decode.compile as C

    monkeypatch.setattr(C, "compile_plan", lambda device, prepack=False: (dict(mode="reduce-overhead"), lambda fn: fn, False))
    model = trained_copy(head_type)  # it keeps this plan's decoders
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 16) for p in prompts]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3))
    out = generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3, compile=True))
    assert out.tokens == refs
    assert out.stats.forward_passes == eager.stats.forward_passes
    assert kept_decoders(model) and all(d.weights is None for d in kept_decoders(model).values())
    sampled = [generate(model, prompts, GenerationConfig(max_new_tokens=16, speculative=3, temperature=0.8,
                                                         seed=5, compile=c)).tokens for c in (False, True)]
    assert sampled[0] == sampled[1]


def test_greedy_accept_takes_the_longest_matching_prefix():
    """a = drafts accepted before the first mismatch; the committed tokens are those drafts, then the
    verifier's own token after them (compared with a plain loop over random cases)."""
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        target = torch.randint(0, 3, (200, k), generator=g)  # 3 symbols: every prefix length occurs
        drafts = torch.randint(0, 3, (200, k - 1), generator=g) if k > 1 else None
        new, a = greedy_accept(target, drafts)
        for b in range(200):
            n = 0
            while n < k - 1 and int(drafts[b, n]) == int(target[b, n]):
                n += 1
            assert int(a[b]) == n
            assert new[b, : n + 1].tolist() == target[b, : n + 1].tolist()
        if k == 4:
            assert set(a.tolist()) == {0, 1, 2, 3}


def test_decoding_keeps_nothing_on_the_model(monkeypatch):
    """What decoding keeps between calls (compiled decoders, stacked heads' weights, packed
    weights) is kept for the model, not in it, and goes when the model goes."""
    import gc
    import weakref

    import mtp.decode.compile as C
    from mtp.decode import packed, stacked

    # dynamo traces the step functions, nothing is compiled: the registry is what is tested
    monkeypatch.setattr(C, "compile_plan", lambda device, prepack=False: (dict(backend="eager"), lambda fn: fn, False))
    model = trained_copy("parallel")
    before = set(model.__dict__)
    prompts = prompts_for(RAGGED)
    refs = [reference_greedy(model, p, 8) for p in prompts]
    for compiled, pack in ((True, False), (False, packed.available())):
        out = generate(model, prompts, GenerationConfig(max_new_tokens=8, speculative=3, compile=compiled,
                                                        pack_weights=pack))
        assert out.tokens == refs
    assert set(model.__dict__) == before
    assert len(C.kept_decoders(model)) == 1 and model in stacked._stacked
    gone = weakref.ref(model)
    del model, out
    gc.collect()
    assert gone() is None  # nothing kept for it holds it
