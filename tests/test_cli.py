"""The `mtp` command end to end on a tiny config, and its handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtp.cli import main

TINY = ["--preset", "tiny", "--n-future", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
        "--eval-batches", "1", "--log-every", "1", "--no-progress"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_info_json_end_to_end(tmp_path, corpus):
    """`python -m mtp` as a user runs it: stdout holds exactly one JSON object."""
    env = {**os.environ, "MTP_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mtp", "train", str(corpus), "--out", str(out), *TINY,
                           "--steps", "4", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 4 and len(summary["eval_loss"]) == 2
    proc = subprocess.run([sys.executable, "-m", "mtp", "info", str(out), "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["n_future"] == 2 and info["step"] == 4
    assert info["params"]["trunk"] > 0 and info["params"]["per_head"] > 0
    assert info["trunk_blocks"] == 2  # tiny preset: 4 blocks, 2 heads -> trunk of 4 - 2 blocks


def test_resume_continues_from_checkpoint(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", corpus, "--out", out, *TINY, "--steps", "3")[0] == 0
    code, stdout, err = run_cli(capsys, "train", corpus, "--out", out, "--resume", "--steps", "5", "--no-progress",
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 5
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_tokenizer_train_and_use(capsys, tmp_path, corpus):
    tok = tmp_path / "tok.json"
    code, stdout, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", "300", "--out", tok, "--json")
    assert code == 0, err
    vocab = json.loads(stdout)["vocab_size"]  # a tiny corpus may run out of merges before 300
    assert 257 < vocab <= 300 and tok.is_file()
    code, _, err = run_cli(capsys, "train", corpus, "--out", tmp_path / "bpe", *TINY, "--steps", "2",
                           "--tokenizer", tok)
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "bpe", "--json")
    assert json.loads(stdout)["tokenizer"] == {"type": "bpe", "vocab_size": vocab, "prompt_start_ids": []}


def _bad_cases(tmp_path, corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new"
    return {
        "missing corpus": (["train", tmp_path / "nope", "--out", out, *TINY], "not found"),
        "empty corpus": (["train", empty, "--out", out, *TINY], str(empty)),
        "too many heads": (["train", corpus, "--out", out, *TINY, "--n-future", "5"], "n_future=5"),
        "dim vs heads": (["train", corpus, "--out", out, *TINY, "--dim", "30"], "not divisible"),
        "seq over context": (["train", corpus, "--out", out, *TINY, "--seq-len", "4096"], "exceeds"),
        "bad weights": (["train", corpus, "--out", out, *TINY, "--loss-weights", "1,2,3"], "weights"),
        "bad head type": (["train", corpus, "--out", out, *TINY, "--head-type", "star"], "head_type"),
        "unknown option": (["train", corpus, "--out", out, "--bogus"], "--bogus"),
        "steps and tokens": (["train", corpus, "--out", out, "--steps", "2", "--tokens", "100"], "not both"),
        "resume nothing": (["train", corpus, "--out", out, "--resume"], "not found"),
        "not a checkpoint": (["info", corpus], "is not a checkpoint"),
        "unknown preset": (["train", corpus, "--out", out, "--preset", "huge"], "unknown preset"),
        "no heads": (["train", corpus, "--out", out, *TINY, "--n-future", "0"], "n_future must be >= 1"),
        "resume and overwrite": (["train", corpus, "--out", out, *TINY, "--resume", "--overwrite"], "not found"),
        "out is a file": (["train", corpus, "--out", corpus / "f0.py", *TINY], "is a file"),
        "offset past window": (["train", corpus, "--out", out, *TINY, "--offsets", "1,40"], "offset 40"),
    }


BAD_CASES = ["missing corpus", "empty corpus", "too many heads", "dim vs heads", "seq over context", "bad weights",
             "bad head type", "unknown option", "steps and tokens", "resume nothing", "not a checkpoint",
             "unknown preset", "no heads", "resume and overwrite", "out is a file", "offset past window"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, corpus, case):
    argv, needle = _bad_cases(tmp_path, corpus)[case]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtp: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "new" / "checkpoint").exists()


def test_existing_and_corrupt_checkpoints(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", corpus, "--out", out, *TINY, "--steps", "2")[0] == 0
    weights = out / "checkpoint" / "model.safetensors"
    before = weights.read_bytes()
    code, _, err = run_cli(capsys, "train", corpus, "--out", out, *TINY, "--steps", "2")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, "train", corpus, "--out", out, "--resume", "--n-future", "3", "--steps", "4")
    assert code == 2 and "n_future 2 -> 3" in err
    assert weights.read_bytes() == before
    code, _, err = run_cli(capsys, "train", corpus, "--out", out, "--resume", "--steps", "2", "--no-progress")
    assert code == 2 and "already at step 2" in err
    code, _, err = run_cli(capsys, "train", corpus, "--out", out, "--resume", "--overwrite", "--steps", "4")
    assert code == 2 and "cannot be combined" in err
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    code, _, err = run_cli(capsys, "train", corpus, "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert code == 2 and "corrupt checkpoint" in err and "trainer_state.pt" in err
    weights.write_bytes(before[: len(before) // 2])
    code, _, err = run_cli(capsys, "info", out)
    assert code == 2 and "corrupt checkpoint" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_trains_on_jsonl_text_fields_not_json_syntax(capsys, tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    rows = [json.dumps({"text": f"alpha beta gamma {i % 7}", "meta": "zzzz"}) for i in range(300)]
    (d / "docs.jsonl").write_text("\n".join(rows) + "\n")
    tok = tmp_path / "tok.json"
    code, _, err = run_cli(capsys, "tokenizer", "train", d, "--vocab-size", "300", "--out", tok)
    assert code == 0, err
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    learned = [t for t in vocab if len(t) > 1 and t != "<|endoftext|>"]
    assert any("alpha" in t or "gamma" in t for t in learned)  # merges of the documents' text
    assert not any("text" in t or "zz" in t or '"' in t for t in learned)  # none of the JSON around it


def test_info_checks_weights_against_config_without_loading(capsys, tmp_path):
    from mtp.checkpoint import save_checkpoint
    from mtp.config import ModelConfig
    from mtp.model import MTPTransformer
    from mtp.tokenizers import ByteTokenizer

    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=3, n_heads=4, n_future=2, tie_embeddings=True)
    ckpt = save_checkpoint(tmp_path / "ck", MTPTransformer(cfg), ByteTokenizer(), step=7)
    code, stdout, err = run_cli(capsys, "info", ckpt, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["step"] == 7 and info["params"]["unembedding"] == 0
    assert info["params"]["total"] == sum(p.numel() for p in MTPTransformer(cfg).parameters())
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["n_layers"] = 4  # the weights hold 3 blocks
    (ckpt / "config.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "info", ckpt)
    assert code == 2 and "does not match its config" in err
