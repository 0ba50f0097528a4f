"""Bad input across the commands (issue 13, section 4): one `mtp: error:` line on stderr, exit
code 2, no traceback, refused before the work starts, and nothing on disk overwritten."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error
from mtp.checkpoint import save_checkpoint
from mtp.cli import main
from mtp.config import TrainConfig, preset
from mtp.errors import MTPError
from mtp.generate import GenerationConfig
from mtp.tokenizers import ByteTokenizer, pad_vocab

TINY = ["--preset", "tiny", "--n-future", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
        "--log-every", "1", "--no-progress"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ckpt(tmp_path, corpus):
    """A random model of the `tiny` preset (context 128) whose training corpus is `corpus`."""
    import torch

    from mtp.model import MTPTransformer

    torch.manual_seed(0)
    model = MTPTransformer(preset("tiny", vocab_size=pad_vocab(ByteTokenizer().vocab_size), n_future=2))
    path = tmp_path / "run" / "checkpoint"
    save_checkpoint(path, model, ByteTokenizer(), train_config={"corpus": [str(corpus)], "val_fraction": 0.2})
    return path


WORK = ["mtp.train.build_token_data", "mtp.bench.run_bench", "mtp.bench.corpus_prompts", "mtp.evals.run_task",
        "mtp.tokenizers.train_bpe_from_texts", "mtp.evals.sweep.run_sweep", "mtp.commands.tasks.make_corpus",
        "mtp.demo.run_demo", "mtp.commands.common.load_for_decoding", "mtp.checkpoint.load_checkpoint"]


@pytest.fixture
def no_work(monkeypatch):
    """The commands' real work fails the test: bad input must be refused before it starts (and
    the old behaviour, which trained, evaluated or decoded anyway, fails fast)."""
    import importlib
    import pkgutil

    import mtp

    # every module first imported with its real names: a `from mtp.bench import corpus_prompts`
    # run while the patch is in place would keep the stand-in after the test (mtp.demo did)
    for info in pkgutil.walk_packages(mtp.__path__, "mtp."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for target in WORK:
        module, name = target.rsplit(".", 1)

        def started(*args, _name=target, **kwargs):
            raise AssertionError(f"{_name} ran: the bad input was not refused before the work")

        monkeypatch.setattr(importlib.import_module(module), name, started)


# ---- numbers: finite, positive, no silent "0 means the default" --------------------------------
TRAIN_NUMBERS = {
    "lr nan": (["--steps", "2", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
    "lr inf": (["--steps", "2", "--lr", "inf"], "lr must be a finite number > 0, got inf"),
    "tokens nan": (["--tokens", "nan"], "--tokens must be a finite number > 0, got nan"),
    "tokens inf": (["--tokens", "inf"], "--tokens must be a finite number > 0, got inf"),
    "tokens negative": (["--tokens", "-100"], "--tokens must be a finite number > 0"),
    "seq-len 0": (["--steps", "2", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    "seq-len 0 with tokens": (["--tokens", "1000", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    "batch-size 0 with tokens": (["--tokens", "1000", "--batch-size", "0"], "--batch-size must be at least 1"),
    "grad-accum 0 with tokens": (["--tokens", "1000", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    "grad-clip negative": (["--steps", "2", "--grad-clip", "-1"], "grad_clip must be a finite number >= 0"),
    "grad-clip nan": (["--steps", "2", "--grad-clip", "nan"], "grad_clip must be a finite number >= 0"),
    "weight-decay nan": (["--steps", "2", "--weight-decay", "nan"], "weight_decay must be a finite number >= 0"),
    "weight-decay negative": (["--steps", "2", "--weight-decay", "-0.1"], "weight_decay must be"),
    "eval-every negative": (["--steps", "2", "--eval-every", "-1"], "eval_every must be >= 0"),
    "save-every negative": (["--steps", "2", "--save-every", "-5"], "save_every must be >= 0"),
}


@pytest.mark.parametrize("case", TRAIN_NUMBERS)
def test_train_refuses_bad_numbers(capsys, tmp_path, corpus, no_work, case):
    argv, needle = TRAIN_NUMBERS[case]
    out = tmp_path / "new"
    code, stdout, err = run(capsys, "train", corpus, "--out", out, *TINY, *argv)
    assert_one_line_error(code, err, needle)
    assert stdout == "" and not out.exists()


def test_train_config_validates_numbers():
    for bad in (dict(lr=math.nan), dict(lr=math.inf), dict(lr=0.0), dict(grad_clip=-1.0), dict(grad_clip=math.inf),
                dict(grad_clip=math.nan), dict(weight_decay=math.nan), dict(seq_len=0), dict(min_lr_ratio=2.0),
                dict(beta2=1.0), dict(eval_every=-1), dict(save_every=-1)):
        with pytest.raises(MTPError, match="invalid training config"):
            TrainConfig(**bad)
    TrainConfig(grad_clip=0.0, eval_every=0, save_every=0, weight_decay=0.0)  # 0: no clipping, only at the end


def test_train_seq_len_omitted_is_the_models_context(capsys, tmp_path, corpus, monkeypatch):
    """An omitted --seq-len still means the model's context (only a given 0 is refused)."""
    seen = {}

    def fake_train(tcfg, mcfg, **kwargs):
        seen["seq_len"] = tcfg.seq_len
        raise MTPError("stop here")

    monkeypatch.setattr("mtp.train.train", fake_train)
    argv = [a for a in TINY if a not in ("--seq-len", "32")]
    code, _, err = run(capsys, "train", corpus, "--out", tmp_path / "new", *argv, "--max-seq-len", "64")
    assert code == 2 and "stop here" in err and seen == {"seq_len": 64}


def test_eval_loss_refuses_seq_len_zero_and_bad_sandbox_numbers(capsys, ckpt, no_work):
    for argv, needle in ((["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
                         (["--seq-len", "-3"], "--seq-len must be at least 1, got -3"),
                         (["--timeout", "inf"], "--timeout must be a finite number"),
                         (["--timeout", "nan"], "--timeout must be a finite number"),
                         (["--workers", "0"], "--workers must be at least 1")):
        code, stdout, err = run(capsys, "eval", ckpt, "--task", "loss", *argv)
        assert_one_line_error(code, err, needle)
        assert stdout == ""


def test_generate_refuses_an_empty_stop_string(capsys, ckpt, no_work):
    code, stdout, err = run(capsys, "generate", ckpt, "--prompt", "def", "--stop", "\n", "--stop", "")
    assert_one_line_error(code, err, "--stop must not be an empty string")
    assert stdout == ""
    GenerationConfig(stop=("\n",)).validate()
    with pytest.raises(MTPError, match="stop string must not be empty"):
        GenerationConfig(stop=("\n", "")).validate()


def test_bench_and_other_numbers(capsys, tmp_path, ckpt, no_work):
    cases = [(["bench", ckpt, "--repeats", "0"], "--repeats must be at least 1, got 0"),
             (["bench", ckpt, "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
             (["bench", ckpt, "--prompt-len", "0"], "--prompt-len must be at least 1, got 0"),
             (["demo", "--out", tmp_path / "demo", "--steps", "0"], "--steps must be at least 1, got 0"),
             (["sweep", "--task", "loss", "--out", tmp_path / "sw", "--n", ""], "--n lists no number of heads"),
             (["sweep", "--task", "loss", "--out", tmp_path / "sw", "--temperature", "nan"], "--temperature"),
             (["sweep", "--task", "loss", "--out", tmp_path / "sw", "--limit", "0"], "--limit must be at least 1"),
             (["sweep", "--task", "loss", "--out", tmp_path / "sw", "--eval-batch-size", "0"], "--eval-batch-size")]
    for argv, needle in cases:
        code, stdout, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
        assert stdout == ""
    assert not (tmp_path / "demo").exists() and not (tmp_path / "sw").exists()


def test_prompt_files_that_are_not_text(capsys, tmp_path, ckpt):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xd0\xff\xfe not utf-8\n")
    numbers = tmp_path / "prompts.jsonl"
    numbers.write_text('{"prompt": 3}\n')
    for cmd in ("generate", "bench"):
        code, _, err = run(capsys, cmd, ckpt, "--prompts", binary)
        assert_one_line_error(code, err, "cannot read prompt file", "prompts.txt")
        code, _, err = run(capsys, cmd, ckpt, "--prompts", numbers)
        assert_one_line_error(code, err, "prompts.jsonl:1", "string field")


# ---- output paths that cannot be written: refused before the work -----------------------------
def _unwritable(tmp_path, kind: str):
    """A directory that no one can create files in, root included: under a regular file, or in
    /proc (Linux), which takes no new files whatever the permissions."""
    if kind == "under a file":
        blocker = tmp_path / "a_file"
        blocker.write_text("keep me\n")
        return blocker
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    return Path("/proc")


def _output_cases(base, ckpt, corpus):
    return {
        "train --out": ["train", corpus, "--out", base / "run", *TINY, "--steps", "2"],
        "finetune --out": ["finetune", ckpt, corpus, "--out", base / "ft", "--steps", "2", "--no-progress"],
        "bench --plot": ["bench", ckpt, "--plot", base / "plot.png"],
        "eval --out": ["eval", ckpt, "--task", "loss", "--out", base / "loss.json"],
        "tokenizer train --out": ["tokenizer", "train", corpus, "--vocab-size", "300", "--out", base / "tok.json"],
        "sweep --out": ["sweep", "--task", "loss", "--corpus", corpus, "--out", base / "sweep"],
        "tasks make --out": ["tasks", "make", "induction", "--out", base / "task"],
        "demo --out": ["demo", "--out", base / "demo"],
        "convert OUT": ["convert", "to-hf", ckpt, base / "hf"],
    }


OUTPUTS = ["train --out", "finetune --out", "bench --plot", "eval --out", "tokenizer train --out", "sweep --out",
           "tasks make --out", "demo --out", "convert OUT"]


@pytest.mark.parametrize("kind", ["under a file", "in /proc"])
@pytest.mark.parametrize("case", OUTPUTS)
def test_unwritable_output_is_refused_before_the_work(capsys, tmp_path, ckpt, corpus, no_work, case, kind):
    base = _unwritable(tmp_path, kind)
    argv = _output_cases(base, ckpt, corpus)[case]
    code, stdout, err = run(capsys, *argv)
    assert_one_line_error(code, err, "cannot write", str(base))
    assert stdout == ""
    if kind == "under a file":
        assert base.read_text() == "keep me\n"


def test_check_writable(tmp_path):
    from mtp.fileio import check_writable

    assert check_writable(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists()  # nothing is made, and the probe file is gone
    assert list(tmp_path.iterdir()) == []
    check_writable(tmp_path, directory=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    check_writable(tmp_path / "f")  # an existing file may be replaced
    with pytest.raises(MTPError, match="it is a directory"):
        check_writable(tmp_path)
    with pytest.raises(MTPError, match="it is a file, not a directory"):
        check_writable(tmp_path / "f", directory=True)
    with pytest.raises(MTPError, match="is not a directory"):
        check_writable(tmp_path / "f" / "sub" / "x.png", "--plot")


def test_sweep_out_is_an_existing_file(capsys, tmp_path, corpus, no_work):
    out = tmp_path / "results.txt"
    out.write_text("my notes\n")
    code, stdout, err = run(capsys, "sweep", "--task", "loss", "--corpus", corpus, "--out", out)
    assert_one_line_error(code, err, str(out), "is a file")
    assert out.read_text() == "my notes\n" and stdout == ""


# ---- a directory of text files without a known extension --------------------------------------
def test_directory_of_unnamed_text_files_says_what_it_skipped(capsys, tmp_path):
    lic = tmp_path / "licences"
    lic.mkdir()
    (lic / "Apache-2.0").write_text("Apache License\nVersion 2.0, January 2004\n" * 20)
    (lic / "GPL-2").write_text("GNU GENERAL PUBLIC LICENSE\nVersion 2, June 1991\n" * 20)
    (lic / "logo").write_bytes(b"\x89PNG\0\0\0binary")
    code, _, err = run(capsys, "train", lic, "--out", tmp_path / "run", *TINY, "--steps", "2")
    assert_one_line_error(code, err, str(lic), "skipped 2 other text files", "Apache-2.0, GPL-2",
                          f"'{lic / '**' / '*'}'")
    assert "logo" not in err
    from mtp.data import resolve_corpus

    assert [p.name for p in resolve_corpus([str(lic / "**" / "*")])] == ["Apache-2.0", "GPL-2"]  # the hint works


# ---- bench's defaults fit the model ------------------------------------------------------------
def test_bench_defaults_fit_a_tiny_model(capsys, tmp_path, ckpt):
    code, stdout, err = run(capsys, "bench", ckpt, "--batch-sizes", "1", "--n-prompts", "1", "--repeats", "1",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["max_new_tokens"] == 86 and report["prompt_tokens_mean"] == 42  # a third / two thirds of 128
    assert "context is 128 tokens" in err and "--prompt-len 42" in err and "--max-new-tokens 86" in err
    assert all(r["identical"] for r in report["results"])


def test_bench_default_lengths():
    from mtp.bench import default_new_tokens, default_prompt_len

    assert default_prompt_len(1024, 0, None) == 64 and default_new_tokens(1024, 64) == 128  # room: unchanged
    assert default_prompt_len(128, 0, None) == 42 and default_new_tokens(128, 42) == 86
    assert default_prompt_len(128, 1, None) == 42 and default_new_tokens(128, 43) == 85  # a BOS token
    assert default_prompt_len(128, 0, 100) == 28  # a given --max-new-tokens keeps its value
    assert default_new_tokens(128, 100) == 28  # prompts from a file: the rest of the context
