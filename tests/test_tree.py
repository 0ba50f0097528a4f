"""Tree verification (mtp.decode.tree): greedy output identical to plain greedy for every head
type that drafts in parallel, at batch 1 and ragged batches; a chain-shaped tree is the chain;
rank > 0 candidates really are accepted; the accepted nodes' keys and values end up where a
plain pass would have written them; tree sampling = plain sampling (chi-square, with a negative
control); the tree chosen from acceptance and cost; bad input."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from mtp.config import ModelConfig
from mtp.decode import tree as T
from mtp.decode.tree import Tree, TreeSteps, choose_tree, measure_acceptance, measure_step_cost
from mtp.errors import MTPError
from mtp.decode.decoder import Decoder
from mtp.generate import GenerationConfig, generate
from mtp.losses import naive_loss
from mtp.model import MTPTransformer
from test_generate import (RAGGED, chi_square_pvalue, exact_joint, prompts_for, reference_greedy, sample_counts,
                           sampling_model, trained)

PARALLEL_TYPES = ["parallel", "linear", "causal", "anticausal"]
WIDE = "0;1;2;0,0;0,1;1,0;0,0,0;0,0,1;1,0,0"


# ---- the tree itself ------------------------------------------------------------------------
def test_tree_spec():
    t = Tree.parse("0,1; 1 ;0;0,0")
    assert t.paths == ((0,), (1,), (0, 0), (0, 1))  # by depth, then ranks
    assert t.spec() == "0;1;0,0;0,1" and Tree.parse(t.spec()) == t
    assert t.parents == [0, 0, 1, 1] and t.depth == 2 and t.size == 4 and t.ranks_needed() == 2
    assert Tree.parse("chain:3").paths == ((0,), (0, 0), (0, 0, 0))
    assert Tree.parse("").size == 0 and Tree.parse([(0,), (0, 1)]).spec() == "0;0,1"
    assert t.expected_tokens([[0.5, 0.25], [0.5, 0.1]]) == pytest.approx(1 + 0.5 + 0.25 + 0.25 + 0.05)
    for bad, match in [("0;1,0", "no parent 1"), ("0;0", "given twice"), ("a;b", "rank paths"),
                       ("0;-1", "ranks >= 0"), ("chain:x", "whole number")]:
        with pytest.raises(MTPError, match=match):
            Tree.parse(bad)


# ---- greedy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type", PARALLEL_TYPES)
def test_tree_greedy_equals_plain_greedy(head_type):
    model = trained(head_type)
    for prompts in (prompts_for([7]), prompts_for(RAGGED)):
        refs = [reference_greedy(model, p, 24) for p in prompts]
        for spec in ("0;1", WIDE, "0;0,0;0,1;0,2;0,0,0"):
            for stack in ((True, False) if head_type == "parallel" else (True,)):
                counts = []
                out = generate(model, prompts, GenerationConfig(max_new_tokens=24, tree=spec, kv_bucket=8,
                                                                stack_heads=stack),
                               on_step=lambda toks: counts.append([len(t) for t in toks]))
                assert out.tokens == refs, (spec, stack)
                assert [sum(c) for c in zip(*counts)] == [24] * len(prompts)
                assert out.stats.k == Tree.parse(spec).depth + 1
                if head_type != "linear":  # the trained model's linear heads rarely draft right
                    assert max(max(c) for c in counts) > 1  # candidates were accepted ...
                assert out.stats.forward_passes > 24 / out.stats.k  # ... and rejected
                if len(prompts) > 1 and head_type != "linear":  # rows took paths of different lengths
                    assert any(len(set(c)) > 1 for c in counts)


@pytest.mark.parametrize("head_type", ["parallel", "causal"])
def test_chain_shaped_tree_is_the_chain(head_type):
    """A tree of rank-0 nodes only is the chain: the same steps, each accepting the same drafts."""
    model = trained(head_type)
    prompts = prompts_for(RAGGED)
    for depth in (1, 3):
        chain = generate(model, prompts, GenerationConfig(max_new_tokens=20, speculative=depth + 1))
        tree = generate(model, prompts, GenerationConfig(max_new_tokens=20, tree=f"chain:{depth}"))
        assert tree.tokens == chain.tokens
        assert tree.stats.forward_passes == chain.stats.forward_passes
        assert tree.stats.acceptance_by_head == pytest.approx(chain.stats.acceptance_by_head)


FV = 16


def fork_batch(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """Tokens alternate between a in 0..7 and b in 8..15. After a comes b = 8 + (a + j) % 8 with
    j = 0, 1, 2 at probabilities 0.4, 0.3, 0.3; after (a, b) comes (a + 1) % 8 if j = 0, else
    (a + 5) % 8. The verifier picks j = 0 and then a + 1; head 2 at a sees a + 5 as the likelier
    (0.6): its rank-0 candidate is wrong where greedy goes, its rank-1 candidate right."""
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, 8, (B,), generator=g)
    for t in range(1, T):
        if t % 2:
            j = torch.multinomial(torch.tensor([0.4, 0.3, 0.3]), B, replacement=True, generator=g)
            x[:, t] = 8 + (x[:, t - 1] + j) % 8
        else:
            a, j = x[:, t - 2], (x[:, t - 1] - 8 - x[:, t - 2]) % 8
            x[:, t] = torch.where(j == 0, (a + 1) % 8, (a + 5) % 8)
    return x


@functools.lru_cache(maxsize=None)
@torch.enable_grad()  # trained on first use, whatever grad mode its caller is in
def fork_model() -> MTPTransformer:
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=FV, dim=32, n_layers=4, n_heads=4, max_seq_len=64,
                                       multiple_of=16, n_future=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = naive_loss(model, fork_batch(g, 16, 33), [1.0] * 2).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_tree_accepts_the_second_candidate_the_chain_misses():
    """Where the next token is one of two, head 2's top two hold the verifier's choice: the tree
    0;1 accepts a draft at nearly every step, the chain at far fewer; the output is greedy's."""
    model = fork_model()
    g = torch.Generator().manual_seed(3)
    prompts = [fork_batch(g, 1, n)[0].tolist() for n in (6, 3, 9)]
    refs = [reference_greedy(model, p, 30) for p in prompts]
    chain = generate(model, prompts, GenerationConfig(max_new_tokens=30, speculative=2))
    tree = generate(model, prompts, GenerationConfig(max_new_tokens=30, tree="0;1"))
    assert chain.tokens == refs and tree.tokens == refs
    assert tree.stats.acceptance_by_head[0] > 0.9
    assert chain.stats.acceptance_by_head[0] < 0.8
    assert tree.stats.tokens_per_forward > chain.stats.tokens_per_forward + 0.2


# ---- the keys and values of the accepted path -----------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("head_type, stack", [("parallel", True), ("parallel", False), ("causal", True)])
def test_accepted_nodes_keys_and_values_move_to_their_positions(head_type, stack, monkeypatch):
    """Candidates forced so that the accepted path is nodes 2 and 5 of the tree 0;1;0,0;1,0;1,1
    (slots L + 1 and L + 4): after the step every cache (trunk, heads) holds at slots 0..L + 1
    what a plain prefill of the committed tokens writes there. Without the move it does not."""
    model = trained(head_type)
    tree = Tree.parse("0;1;0,0;1,0;1,1")
    prompts = prompts_for([5, 9])
    B, L = 2, torch.tensor([5, 9])
    greedy = [reference_greedy(model, p, 4) for p in prompts]  # g1..g4 of each row

    def run(move):
        monkeypatch.setattr(T, "move_accepted", move)
        cfg = GenerationConfig(max_new_tokens=8, tree=tree, stack_heads=stack)
        dec = Decoder(model, 3, B, 32, cfg).reset(cfg)
        dec.start(prompts, [8, 8])
        dec.forward(dec.seq[:, :9], torch.arange(9).expand(B, -1), 32)  # prefill (row 0 past its end: rewritten)
        dec.lengths.copy_(L + 1)
        dec.seq[torch.arange(B), L] = torch.tensor([g[0] for g in greedy])  # the first token, committed
        steps = TreeSteps(dec, tree)
        # the root is g1: nodes 1 (0), 3 (0,0) and 4 (1,0) wrong, 2 (1) = g2, 5 (1,1) = g3
        wrong = [min(set(range(32)) - {g[1], g[2]}) for g in greedy]
        steps.nodes = torch.tensor([[w, g[1], w, w, g[2]] for w, g in zip(wrong, greedy)])
        host = steps.advance(int(L.max()) + 1, None)  # attention reads all 32 slots
        return dec, host

    dec, host = run(T.move_accepted)
    assert host[:, 0].tolist() == [3, 3]  # two nodes accepted, then the verifier's token
    assert host[:, 1:4].tolist() == [g[1:4] for g in greedy]
    committed = [p + g[:3] for p, g in zip(prompts, greedy)]  # fed so far: prompt, g1 (root), g2, g3

    def caches(d):
        return [c for c in T._distinct_caches(d.cache)]

    def reference():
        cfg = GenerationConfig(stack_heads=stack)
        ref = Decoder(model, 3, B, 32, cfg).reset(cfg)
        n = max(len(c) for c in committed)
        toks = torch.tensor([c + [0] * (n - len(c)) for c in committed])
        ref.forward(toks, torch.arange(n).expand(B, -1), 32)
        return ref

    ref = reference()

    def matches(d):
        ok = True
        for got, want in zip(caches(d), caches(ref)):
            rep = got.k.shape[0] // B
            for r in range(rep * B):
                n = len(committed[r % B])
                ok &= torch.allclose(got.k[r, :, :n], want.k[r, :, :n], atol=1e-5)
                ok &= torch.allclose(got.v[r, :, :n], want.v[r, :, :n], atol=1e-5)
        return ok

    assert len(caches(dec)) >= 2 and matches(dec)
    dec, _ = run(lambda *a: None)
    assert not matches(dec)


# ---- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type, spec, kw", [
    ("parallel", "0;1;2;0,0;0,1;1,0", dict(temperature=1.0)),
    ("causal", "0;1;0,0;0,1", dict(temperature=1.0)),
    ("parallel", "0;1;0,0;1,0", dict(temperature=1.5, top_k=4, top_p=0.9)),
])
def test_tree_sampling_matches_plain_sampling(head_type, spec, kw):
    """Candidates drawn i.i.d. from the heads (duplicates included: 5 tokens), recursive
    rejection sampling over each node's children: the output is distributed as plain sampling."""
    model, prompt, n = sampling_model(head_type), [1, 3, 0], 3
    counts, out = sample_counts(model, prompt, None, n, tree=spec, **kw)
    probs = exact_joint(model, prompt, n, kw["temperature"], kw.get("top_k"), kw.get("top_p", 1.0))
    assert 0.05 < out.stats.acceptance_by_head[0] < 0.95  # children accepted and rejected
    assert out.stats.acceptance_by_head[1] > 0.01  # second-depth nodes too
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_chi_square_catches_a_tree_without_the_residual_update(monkeypatch):
    """The same test fails when a rejected child leaves the target p as it was (the next child and
    the final sample then see p instead of normalize(max(p - q, 0)))."""
    model, prompt, n = sampling_model("parallel"), [1, 3, 0], 3
    probs = exact_joint(model, prompt, n, 1.0, None, 1.0)
    monkeypatch.setattr(T, "residual_distribution", lambda p, q: p)
    counts, _ = sample_counts(model, prompt, None, n, tree="0;1;2;0,0;0,1;1,0", temperature=1.0)
    assert chi_square_pvalue(counts, probs) < 1e-6


# ---- choosing the tree ----------------------------------------------------------------------
ACC = [[0.6, 0.2, 0.1, 0.05], [0.4, 0.15, 0.1, 0.05], [0.3, 0.1, 0.05, 0.02]]


def test_choose_tree_follows_the_cost_curve():
    flat = [1.0] * 41  # verifying more tokens is free (a GPU at batch 1)
    tree, expected = choose_tree(ACC, flat, 32)
    assert tree.size == 32 and tree.depth == 3
    assert sum(p[-1] > 0 for p in tree.paths) >= 10  # wide: many second and later candidates
    assert expected == pytest.approx(tree.expected_tokens(ACC))
    # nodes by decreasing path probability: the 32 most probable paths of all 4 + 16 + 64
    probs = sorted((T._path_prob(p, ACC) for p in tree.paths), reverse=True)
    everything = sorted((T._path_prob(p, ACC) for p in Tree.parse(";".join(
        [f"{a}" for a in range(4)] + [f"{a},{b}" for a in range(4) for b in range(4)]
        + [f"{a},{b},{c}" for a in range(4) for b in range(4) for c in range(4)])).paths), reverse=True)
    assert probs == pytest.approx(everything[:32])

    steep = [float(t) for t in range(1, 42)]  # cost proportional to the tokens verified
    tree, expected = choose_tree(ACC, steep, 32)
    assert tree.size == 0 and expected == 1.0

    moderate = [1.0] + [1.0 + 0.4 * t for t in range(1, 41)]  # a CPU: each token costs 0.4 of a step
    tree, expected = choose_tree(ACC, moderate, 32)
    assert tree.paths == ((0,),) and expected == pytest.approx(1.6)  # 1.6 / 1.4 beats 1.84 / 1.8

    cpu = [1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0] + [3.0] * 34  # cheap up to a few tokens, then steep
    tree, _ = choose_tree(ACC, cpu, 32)
    gpu = [1.0] * 20 + [1.5] * 21
    wide, _ = choose_tree(ACC, gpu, 32)
    assert 1 <= tree.size < wide.size
    assert choose_tree(ACC, flat, 5)[0].size == 5  # max_nodes bounds it
    assert choose_tree([], flat, 5)[0].size == 0


@torch.no_grad()
def test_measure_acceptance_counts_what_a_loop_counts():
    model = trained("parallel")
    texts = prompts_for([20, 20, 13], seed=9)
    acc = measure_acceptance(model, texts, 3, 2)
    hits = [[0, 0] for _ in range(3)]
    counts = [0, 0, 0]
    for t in texts:
        logits = model(torch.tensor([t]), return_all_heads=True)[0]  # (T, n, V)
        for d in range(1, 4):
            for pos in range(len(t) - d):
                verifier = int(logits[pos + d, 0].argmax())
                ranked = logits[pos, d].argsort(descending=True).tolist()
                counts[d - 1] += 1
                for r in range(2):
                    hits[d - 1][r] += ranked[r] == verifier
    want = [[h / c for h in row] for row, c in zip(hits, counts)]
    assert [a for row in acc for a in row] == pytest.approx([w for row in want for w in row])
    assert want[0][0] > 0.2  # the trained heads draft right at some positions


def test_non_decreasing_fit():
    assert T._non_decreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert T._non_decreasing([5.0, 1.0, 1.0]) == pytest.approx([7 / 3] * 3)
    assert T._non_decreasing([1.0, 2.0]) == [1.0, 2.0]


def test_measure_step_cost_is_relative_to_a_greedy_step():
    cost = measure_step_cost(trained("parallel"), batch=2, max_tokens=6, k=3, repeats=2)
    assert len(cost) == 6 and cost[0] == 1.0 and all(c > 0 for c in cost)
    assert all(a <= b for a, b in zip(cost[1:], cost[2:]))  # never falls with more tokens


def test_auto_tree_gives_a_tree_generate_runs():
    model = trained("parallel")
    choice = T.auto_tree(model, prompts_for([30, 30, 30], seed=2), batch=1, max_nodes=6, repeats=1)
    assert choice.tree.size <= 6 and choice.tree.depth <= 3 and len(choice.cost) == 7
    assert choice.expected_tokens_per_step == pytest.approx(choice.tree.expected_tokens(choice.acceptance))
    prompts = prompts_for(RAGGED)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10, tree=choice.tree))
    assert out.tokens == [reference_greedy(model, p, 10) for p in prompts]


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type, kwargs, match", [
    ("sequential", dict(tree="0;1"), "sequential heads .* keep the chain"),
    ("parallel", dict(tree="0;0,0;0,0,0;0,0,0,0"), "4 deep, but only 3 heads can draft"),
    ("parallel", dict(tree="0;0,0", speculative=2), "2 deep, but only 1 head can draft"),
    ("parallel", dict(tree="0;40"), "beyond the vocabulary of 32"),
    ("parallel", dict(tree="0", compile=True), "drop --compile"),
    ("parallel", dict(tree="auto"), "auto_tree"),
])
def test_bad_trees(head_type, kwargs, match):
    with pytest.raises(MTPError, match=match):
        generate(trained(head_type), [[1, 2]], GenerationConfig(max_new_tokens=4, **kwargs))


def test_an_empty_tree_is_plain_decoding():
    model = trained("parallel")
    out = generate(model, prompts_for([4]), GenerationConfig(max_new_tokens=6, tree=""))
    assert out.stats.k == 1 and out.tokens == [reference_greedy(model, prompts_for([4])[0], 6)]


# ---- the command line -----------------------------------------------------------------------
def cli(capsys, *argv):
    from mtp.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_and_bench_with_trees(capsys, ckpt):
    import json

    from mtp.tokenizers import ByteTokenizer

    path, model = ckpt
    tok = ByteTokenizer()
    prompt = tok.encode_prompt("def f(x):")
    greedy = generate(model, [prompt], GenerationConfig(max_new_tokens=12, speculative=1)).tokens[0]
    for tree in ("0;1;0,0", "auto"):
        code, out, err = cli(capsys, "generate", path, "--prompt", "def f(x):", "--max-new-tokens", 12, "--tree", tree,
                             "--tree-max-nodes", 4, "--json")
        assert code == 0, err
        assert json.loads(out)["tokens"] == greedy
    assert "[tree: " in err  # auto says which tree it chose
    code, out, err = cli(capsys, "bench", path, "--batch-sizes", "1,2", "--k", "2", "--max-new-tokens", 8,
                         "--prompt-len", 16, "--n-prompts", 2, "--repeats", 1, "--tree", "0;1;0,0", "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = report["results"]
    assert [(r["batch_size"], r.get("tree")) for r in rows] == [(1, None), (1, "0;1;0,0"), (2, None), (2, "0;1;0,0")]
    for r in rows:
        assert r["identical"] is True and r["tokens_per_forward"] >= 1 and r["step_cost"] > 0
        assert r["tokens_per_forward_expected"] >= 1  # acceptance measured on held-out text
    tree_row = rows[1]
    assert tree_row["tree_nodes"] == 3 and tree_row["k"] == 3 and tree_row["chain_k"] == 2
    assert tree_row["tree_vs_chain"] == pytest.approx(tree_row["spec_tok_s"] / rows[0]["spec_tok_s"])
    code, out, err = cli(capsys, "bench", path, "--batch-sizes", "1", "--k", "2", "--max-new-tokens", 8,
                         "--prompt-len", 16, "--n-prompts", 1, "--repeats", 1, "--tree", "auto", "--tree-max-nodes", 3)
    assert code == 0, err
    assert "| 1 | tree " in out or "tree chosen" in err


@pytest.mark.parametrize("argv, match", [
    (["--tree", "0;2,0"], "no parent 2"),
    (["--tree", "0;0,0", "--speculative", "2"], "2 deep, but only 1 head"),
    (["--tree", "0", "--compile"], "drop --compile"),
    (["--tree", "auto", "--compile"], "drop --compile"),
    (["--tree", "0", "--tree-max-nodes", "0"], "--tree-max-nodes must be at least 1"),
])
def test_cli_bad_trees(capsys, ckpt, argv, match):
    from helpers import assert_one_line_error

    path, _ = ckpt
    code, out, err = cli(capsys, "generate", path, "--prompt", "x", "--max-new-tokens", 4, *argv)
    assert_one_line_error(code, err)
    assert re.search(match, err), err
