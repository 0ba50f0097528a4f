"""mtp selfdata: the model's own continuations of training-split prompts, as a resumable corpus."""

import json

import pytest

from mtp.bench import corpus_prompts
from mtp.cli import main
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, generate
from mtp.selfdata import SelfDataConfig, write_self_data
from mtp.tokenizers import ByteTokenizer


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_lines_are_prompt_plus_the_greedy_continuation(ckpt, tmp_path):
    _, model = ckpt
    tok = ByteTokenizer()
    prompts = [list(b"def f(x):\n    return "), list(b"class A:\n"), list(b"import os\n")]
    cfg = SelfDataConfig(n_prompts=3, prompt_len=8, max_new_tokens=12, batch_size=2)
    res = write_self_data(model, tok, prompts, tmp_path / "self.jsonl", cfg, progress=False)
    rows = _lines(tmp_path / "self.jsonl")
    assert res["lines"] == 3 and len(rows) == 3
    for p, row in zip(prompts, rows):
        plain = generate(model, [p], GenerationConfig(max_new_tokens=12, speculative=1, eot_id=tok.eot_id))
        cont = [t for t in plain.tokens[0] if t != tok.eot_id]
        assert row["text"] == tok.decode(p + cont)
        assert row["prompt_tokens"] == len(p) and row["new_tokens"] == len(cont)
    assert res["new_tokens"] == sum(r["new_tokens"] for r in rows)


def test_a_torn_file_resumes_to_the_same_lines_and_other_settings_are_refused(ckpt, tmp_path):
    _, model = ckpt
    tok = ByteTokenizer()
    prompts = [list(f"x{i} = ".encode()) for i in range(5)]
    cfg = SelfDataConfig(n_prompts=5, prompt_len=4, max_new_tokens=6, batch_size=2, temperature=0.8, seed=3)
    whole = tmp_path / "whole.jsonl"
    write_self_data(model, tok, prompts, whole, cfg, progress=False)
    # a crash after three lines, in the middle of writing the fourth
    torn = tmp_path / "torn.jsonl"
    write_self_data(model, tok, prompts, torn, cfg, progress=False)
    kept = whole.read_text().splitlines(keepends=True)
    torn.write_text("".join(kept[:3]) + kept[3][:7])
    res = write_self_data(model, tok, prompts, torn, cfg, progress=False)
    assert res["resumed_from"] == 3 and res["lines"] == 5
    assert torn.read_text() == whole.read_text()  # sampled too: each batch has its own seed
    with pytest.raises(MTPError, match="other settings"):
        write_self_data(model, tok, prompts, torn, SelfDataConfig(n_prompts=5, prompt_len=4, max_new_tokens=7,
                                                                  batch_size=2), progress=False)


def test_training_split_prompts_are_not_the_held_out_ones(ckpt, corpus):
    tok = ByteTokenizer()
    train = corpus_prompts([str(corpus)], tok, 4, 16, 0.2, split="train")
    val = corpus_prompts([str(corpus)], tok, 4, 16, 0.2)
    assert len(train) == 4 and all(len(p) == 16 for p in train)
    assert not set(map(tuple, train)) & set(map(tuple, val))
    with pytest.raises(ValueError):
        corpus_prompts([str(corpus)], tok, 4, 16, 0.2, split="test")


def test_cli_writes_a_corpus_that_finetune_reads(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = tmp_path / "self.jsonl"
    assert main(["selfdata", str(path), "--out", str(out), "--n-prompts", "3", "--prompt-len", "12",
                 "--max-new-tokens", "10", "--batch-size", "2", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["lines"] == 3 and len(_lines(out)) == 3
    meta = json.loads((tmp_path / "self.jsonl.meta.json").read_text())
    assert meta["config"]["max_new_tokens"] == 10 and meta["source"]["corpus"]
    assert main(["finetune", str(path), str(out), "--out", str(tmp_path / "ft"), "--mode", "heads",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                 "--val-fraction", "0.3", "--no-progress", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 2 and (tmp_path / "ft" / "checkpoint").exists()
