"""`mtp generate` and `mtp bench` end to end on a tiny byte-level checkpoint, and bad input."""

from __future__ import annotations

import json

import pytest

from mtp.cli import main
from mtp.generate import GenerationConfig, generate
from mtp.decode.packed import available as packed_available
from mtp.tokenizers import ByteTokenizer


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_is_greedy(capsys, ckpt):
    path, model = ckpt
    tok = ByteTokenizer()
    code, out, err = run_cli(capsys, "generate", path, "--prompt", "def f(x):", "--max-new-tokens", "20", "--json")
    assert code == 0, err
    res = json.loads(out)
    ref = generate(model, [tok.encode("def f(x):")], GenerationConfig(max_new_tokens=20, speculative=1))
    assert res["tokens"] == ref.tokens[0] and res["text"] == tok.decode(ref.tokens[0])
    assert res["stats"]["k"] == 3  # all heads by default
    assert res["stats"]["new_tokens"] == 20 and res["stop_reason"] == "length"
    assert set(res["stats"]) >= {"forward_passes", "tokens_per_forward", "acceptance_by_head", "tokens_per_s"}


def test_generate_streams_text(capsys, ckpt):
    path, _ = ckpt
    code, out, err = run_cli(capsys, "generate", path, "--prompt", "def f(x):", "--max-new-tokens", "20", "--json")
    text = json.loads(out)["text"]
    code, out, err = run_cli(capsys, "generate", path, "--prompt", "def f(x):", "--max-new-tokens", "20",
                             "--speculative", "1")
    assert code == 0, err
    assert out == text + "\n"
    assert "20 tokens" in err and "k=1" in err


def test_generate_sampling_and_prompt_file(capsys, ckpt, tmp_path):
    path, _ = ckpt
    (tmp_path / "p.txt").write_text("import os\n")
    args = ["generate", path, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "16", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--json"]
    first, second = (json.loads(run_cli(capsys, *args)[1]) for _ in range(2))
    assert first["tokens"] == second["tokens"] and first["prompt_tokens"] == 10


def test_generate_many_prompts_in_batches(capsys, ckpt, tmp_path):
    """--prompts: rows of different lengths decoded together give each prompt's own greedy output."""
    path, model = ckpt
    tok = ByteTokenizer()
    texts = ["def f(x):", "import os", "x = [1, 2, 3]\nprint(", "class A:"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    code, out, err = run_cli(capsys, "generate", path, "--prompts", tmp_path / "p.jsonl", "--batch-size", "3",
                             "--max-new-tokens", "12", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["index"] for r in res["results"]] == [0, 1, 2, 3] and len(res["batches"]) == 2
    for t, r in zip(texts, res["results"]):
        alone = generate(model, [tok.encode(t)], GenerationConfig(max_new_tokens=12, speculative=1))
        assert r["tokens"] == alone.tokens[0] and r["text"] == tok.decode(alone.tokens[0])
    code, out, err = run_cli(capsys, "generate", path, "--prompts", tmp_path / "p.jsonl", "--max-new-tokens", "12")
    assert code == 0 and out.startswith("### 0\n") and "### 3\n" in out


def test_bench_json(capsys, ckpt):
    path, _ = ckpt
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1,3", "--max-new-tokens", "12",
                             "--prompt-len", "24", "--n-prompts", "4", "--repeats", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = report["results"]
    assert [(r["batch_size"], r["k"]) for r in rows] == [(1, 2), (1, 3), (3, 2), (3, 3)]
    assert [r["batches"] for r in rows] == [4, 4, 2, 2]  # every prompt at every batch size
    for r in rows:
        assert r["identical"] is True
        assert r["speedup"] == pytest.approx(r["spec_tok_s"] / r["greedy_tok_s"])
        assert len(r["acceptance_by_head"]) == r["k"] - 1 and r["tokens_per_forward"] >= 1
        assert r["step_cost"] > 0
    assert report["n_prompts"] == 4 and report["prompt_tokens_mean"] == 24
    assert report["packed_weights"] is False  # a tiny model: not worth packing


def test_bench_sums_the_calls_of_a_setting():
    """Per-call statistics combine into the setting's: tokens per forward over all row forwards,
    acceptance weighted by each call's decode steps."""
    from types import SimpleNamespace

    from mtp.bench import _sum_passes
    from mtp.generate import GenerationStats

    def call(tokens, batch, new, row_forwards, acc, seconds):
        stats = GenerationStats(batch_size=batch, k=3, prompt_tokens=0, new_tokens=new, forward_passes=7,
                                tokens_per_forward=new / row_forwards, acceptance_by_head=acc, seconds=seconds,
                                tokens_per_s=new / seconds)
        return SimpleNamespace(tokens=tokens, stats=stats)

    # call 1: 1 row, 10 forwards (9 decode steps); call 2: 2 rows, 12 row forwards (10 steps)
    total = _sum_passes([call([[1]], 1, 20, 10, [0.5, 0.2], 1.0), call([[2], [3]], 2, 30, 12, [0.1, 0.0], 3.0)], 3)
    assert total.tokens == [[1], [2], [3]] and total.new_tokens == 50 and total.forward_passes == 14
    assert total.tokens_per_forward == pytest.approx(50 / 22) and total.tokens_per_s == pytest.approx(50 / 4)
    assert total.acceptance_by_head == pytest.approx([(0.5 * 9 + 0.1 * 10) / 19, (0.2 * 9) / 19])


def test_packed_weights_decode_the_same_tokens(capsys, ckpt):
    path, _ = ckpt
    outs = []
    for mode in ("on", "off"):
        code, out, err = run_cli(capsys, "generate", path, "--prompt", "def f(x):", "--max-new-tokens", "16",
                                 "--pack-weights", mode, "--json")
        assert code == 0, err
        outs.append(json.loads(out)["tokens"])
    assert outs[0] == outs[1]
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1", "--max-new-tokens", "8", "--prompt-len", "16",
                             "--repeats", "1", "--pack-weights", "on", "--json")
    assert code == 0, err
    assert json.loads(out)["packed_weights"] is packed_available()


def test_bench_prompt_file_and_table(capsys, ckpt, tmp_path):
    path, _ = ckpt
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "def g(y):"}) + "\n" + json.dumps({"text": "x = 1"}) + "\n")
    code, out, err = run_cli(capsys, "bench", path, "--prompts", tmp_path / "p.jsonl", "--batch-sizes", "2",
                             "--k", "2", "--max-new-tokens", "8", "--plot", tmp_path / "bench.png")
    assert code == 0, err
    assert out.splitlines()[0].startswith("| batch | k | greedy tok/s") and "| 2 | 2 |" in out
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_with_a_draft_vocab(capsys, ckpt):
    """--draft-vocab: the heads draft among the corpus's most frequent tokens, the output stays greedy's."""
    path, _ = ckpt
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1", "--k", "3", "--max-new-tokens", "10",
                             "--prompt-len", "16", "--repeats", "1", "--draft-vocab", "8", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["draft_vocab"] == 8  # tokens: the corpus has more distinct ones
    assert all(r["identical"] for r in report["results"])
    code, out, err = run_cli(capsys, "bench", path, "--draft-vocab", "0")
    assert code == 2 and "--draft-vocab must be at least 1, got 0" in err


def test_bench_against_transformers(capsys, ckpt):
    pytest.importorskip("transformers")
    path, _ = ckpt
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1,2", "--k", "3", "--max-new-tokens", "10",
                             "--prompt-len", "16", "--hf", "--json")
    assert code == 0, err
    for r in json.loads(out)["results"]:
        assert r["hf_identical"] is True and r["hf_greedy_tok_s"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x" * 96], "no room in the model's context of 96"),
    (["--prompt", "x", "--speculative", "4"], "more than the model's 3 heads"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "0"], r"top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-p", "1.5"], r"top-p must be in \(0, 1\]"),
    ([], "give one of --prompt TEXT, --prompt-file FILE or --prompts FILE"),
    (["--prompt", "x", "--prompts", "p.jsonl"], "give one of --prompt TEXT"),
    (["--prompts", "/nonexistent/p.jsonl"], "prompt file not found"),
    (["--prompts", "p.jsonl", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--prompt-file", "/nonexistent/p.txt"], "cannot read --prompt-file"),
])
def test_generate_bad_input(capsys, ckpt, argv, match):
    import re

    code, out, err = run_cli(capsys, "generate", ckpt[0], *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(match, err)


def test_not_a_checkpoint(capsys, tmp_path):
    for cmd in ("generate", "bench"):
        code, out, err = run_cli(capsys, cmd, tmp_path, "--prompt", "x") if cmd == "generate" else \
            run_cli(capsys, cmd, tmp_path)
        assert code == 2 and "is not a checkpoint" in err and len(err.strip().splitlines()) == 1


def test_bench_bad_input(capsys, ckpt):
    path, _ = ckpt
    for argv, match in ([["--k", "4"], "k in 2..3"], [["--batch-sizes", "1,x"], "comma-separated integers"],
                        [["--prompt-len", "90", "--max-new-tokens", "10"], "exceed the model's context of 96"]):
        code, out, err = run_cli(capsys, "bench", path, *argv)
        assert code == 2 and match in err, err


def test_generate_and_bench_with_prompt_lookup(capsys, ckpt):
    """--lookup: the greedy tokens, in fewer forward passes on a prompt that repeats itself; bench
    adds the lookup settings (alone and beside each k) to the chains, every one identical."""
    path, model = ckpt
    tok = ByteTokenizer()
    prompt = "def f(x):\n    return x + 1\ndef f(x):\n    return x + 1\ndef f(x):\n"
    ref = generate(model, [tok.encode(prompt)], GenerationConfig(max_new_tokens=24, speculative=1))
    for k in ("1", "3"):
        code, out, err = run_cli(capsys, "generate", path, "--prompt", prompt, "--max-new-tokens", "24",
                                 "--speculative", k, "--lookup", "8", "--json")
        assert code == 0, err
        res = json.loads(out)
        assert res["tokens"] == ref.tokens[0]
    code, out, err = run_cli(capsys, "generate", path, "--prompt", prompt, "--lookup", "4", "--temperature", "0.5")
    assert code == 2 and "greedy" in err
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1,2", "--max-new-tokens", "12",
                             "--prompt-len", "24", "--n-prompts", "2", "--repeats", "1", "--k", "3",
                             "--lookup", "6", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [(r["batch_size"], r["k"], r.get("lookup")) for r in rows] == [
        (1, 3, None), (1, 1, 6), (1, 3, 6), (2, 3, None), (2, 1, 6), (2, 3, 6)]
    assert all(r["identical"] for r in rows)
    code, out, err = run_cli(capsys, "bench", path, "--batch-sizes", "1", "--max-new-tokens", "8",
                             "--prompt-len", "24", "--n-prompts", "1", "--repeats", "1", "--k", "2", "--lookup", "4")
    assert code == 0, err
    assert "| 1 | 1 + lookup 4 |" in out and "| 1 | 2 + lookup 4 |" in out
