"""`mtp eval --task loss`, the eval command's bad input, `format_table`, and `mtp sweep` end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mtp.checkpoint import save_checkpoint
from mtp.cli import main
from mtp.config import ModelConfig
from mtp.data import build_token_data, eval_batches
from mtp.evals import EvalOptions, format_table, run_task
from mtp.evals.sweep import parse_variant
from mtp.errors import MTPError
from mtp.losses import naive_loss
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer


@pytest.fixture
def ckpt(tmp_path, corpus):
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=4, n_heads=4, max_seq_len=96,
                                       multiple_of=16, n_future=3, offsets=[1, 2, 4]))
    path = tmp_path / "run" / "checkpoint"
    save_checkpoint(path, model, ByteTokenizer(),
                    train_config={"corpus": [str(corpus)], "val_fraction": 0.2, "seq_len": 48})
    return path, model.eval()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_loss_task_matches_reference(capsys, ckpt, corpus, tmp_path):
    """Per-head loss equals naive_loss on the same held-out windows; byte-level bits per byte is
    loss / ln 2 exactly (one byte per token)."""
    path, model = ckpt
    code, out, err = run_cli(capsys, "eval", path, "--task", "loss", "--limit", "6", "--batch-size", "4", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "loss" and res["n_problems"] == 6 and res["seconds"] >= 0
    assert res["per_head"]["offset"] == [1, 2, 4]
    data = build_token_data([str(corpus)], ByteTokenizer(), tmp_path / "cache", 0.2, progress=False)
    windows = torch.cat(list(eval_batches(data.val, 4, 48, 2)))[:6]
    with torch.no_grad():
        ref = naive_loss(model, windows, [1.0, 1.0, 1.0]).per_head
    assert res["per_head"]["loss"] == pytest.approx(ref, rel=1e-5)
    assert res["metrics"]["loss"] == pytest.approx(ref[0], rel=1e-5)
    for loss, bpb in zip(res["per_head"]["loss"], res["per_head"]["bits_per_byte"]):
        assert bpb == pytest.approx(loss / math.log(2), rel=1e-6)
    assert all(0 <= a <= 1 for a in res["per_head"]["top1"])
    assert res["details"]["bytes"] == 6 * 48


def test_loss_task_bpe_counts_bytes(tmp_path, corpus):
    """With a BPE tokenizer (several bytes per token), bits per byte < loss / ln 2."""
    from mtp.tokenizers import train_bpe

    tok = train_bpe(sorted(corpus.glob("*.py")), 300, tmp_path / "tok.json")
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
                                       multiple_of=16, n_future=2))
    res = run_task("loss", model, tok, EvalOptions(corpus=[str(corpus)], limit=4, batch_size=4,
                                                   extra={"seq_len": 16}), {}, progress=False)
    tokens, nbytes = res["details"]["tokens"], res["details"]["bytes"]
    assert nbytes > 1.5 * tokens  # BPE merged bytes
    assert res["metrics"]["bits_per_byte"] == pytest.approx(res["metrics"]["loss"] * tokens / nbytes / math.log(2),
                                                            rel=1e-6)


def test_eval_bad_input(capsys, ckpt, tmp_path):
    path, _ = ckpt
    for argv, needle in [
        (["eval", path, "--task", "nope"], "unknown task 'nope'"),
        (["eval", path, "--task", "humaneval", "--n-samples", "2", "--k", "1,10"], "pass@10 needs at least 10"),
        (["eval", tmp_path / "missing", "--task", "loss"], "missing"),
        (["eval", path, "--task", "loss", "--limit", "0"], "--limit"),
        (["eval", path, "--task", "loss", "--seq-len", "500"], "exceeds the model's context"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_eval_out_file_and_table(capsys, ckpt, tmp_path):
    path, _ = ckpt
    dest = tmp_path / "res" / "loss.json"
    code, out, err = run_cli(capsys, "eval", path, "--task", "loss", "--limit", "4", "--out", dest, "--no-progress")
    assert code == 0, err
    saved = json.loads(dest.read_text())
    assert out.strip() == format_table(saved)
    assert "bits_per_byte" in out and "head" in out
    code, out, err = run_cli(capsys, "eval", path, "--task", "loss", "--limit", "4", "--out", dest)
    assert code == 2 and "--overwrite" in err


def test_parse_variant():
    v = parse_variant("n=4;loss=nth;offsets=1,2,4,8")
    assert (v.n_future, v.loss_weights, v.offsets) == (4, "nth", [1, 2, 4, 8])
    assert v.name == "n4_nth_off1-2-4-8" and v.label == "n=4, loss nth, offsets 1,2,4,8"
    for bad in ("loss=nth", "n=x", "n=2;color=red", "n=2;head=weird", "n=0"):
        with pytest.raises(MTPError):
            parse_variant(bad)


def test_sweep_end_to_end_and_resume(capsys, corpus, tmp_path):
    out_dir = tmp_path / "sweep"
    argv = ["sweep", "--task", "loss", "--corpus", corpus, "--out", out_dir,
            "--variants", "n=1", "n=2", "n=2;loss=nth", "--steps", "6", "--seq-len", "32", "--batch-size", "2",
            "--dim", "32", "--n-layers", "3", "--n-heads", "2", "--eval-every", "3", "--save-every", "3",
            "--limit", "4", "--no-progress", "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    res = json.loads(out)
    assert [r["variant"] for r in res["runs"]] == ["n1", "n2", "n2_nth"]
    assert res["runs"][2]["loss_weights"] == "nth" and math.isnan(res["runs"][2]["heldout_loss"][0]) is False
    params = {r["params"] for r in res["runs"]}
    assert len(params) == 1  # parameter-matched
    for r in res["runs"]:
        assert set(r["metrics"]) == {"loss", "bits_per_byte", "top1"}
        assert len(r["heldout_loss"]) == r["n_future"]
        assert (len(r["decode"]["k"]) == r["n_future"] - 1) and all(t >= 1 for t in r["decode"]["tokens_per_forward"])
    # heads' gradient cosine at the trunk output: logged for n > 1 only, in [-1, 1]
    assert res["runs"][0]["grad_cosine"] is None and -1 <= res["runs"][1]["grad_cosine"] <= 1
    for name in ("report.md", "results.json", "head_losses.png", "metrics.png", "tokens_per_forward.png",
                 "grad_cosine.png"):
        assert (out_dir / name).stat().st_size > 0
    report = (out_dir / "report.md").read_text()
    assert "| n=2, loss nth |" in report and "![metrics](metrics.png)" in report
    # a second call resumes: nothing is trained again
    ckpt_file = out_dir / "n2_s0" / "checkpoint" / "model.safetensors"
    before = ckpt_file.stat().st_mtime_ns
    code, out2, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert ckpt_file.stat().st_mtime_ns == before
    assert json.loads(out2)["runs"][1]["metrics"] == res["runs"][1]["metrics"]
    # the sweep's small files alone (as kept in git, say) count as done: no checkpoint is needed
    import shutil
    for run in ("n1_s0", "n2_s0", "n2_nth_s0"):
        shutil.rmtree(out_dir / run / "checkpoint")
    code, out3, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert not (out_dir / "n2_s0" / "checkpoint").exists()
    res3 = json.loads(out3)
    assert [r["metrics"] for r in res3["runs"]] == [r["metrics"] for r in res["runs"]]
    assert [r["decode"] for r in res3["runs"]] == [r["decode"] for r in res["runs"]]
    # a run recorded by an older version, whose model config lacks a field added since (at its
    # default), still counts as done; one with another value of that field does not
    summary_file = out_dir / "n1_s0" / "run.summary.json"
    row = json.loads(summary_file.read_text())
    assert row["model"].pop("draft_vocab") is None
    summary_file.write_text(json.dumps(row))
    code, out5, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert not (out_dir / "n1_s0" / "checkpoint").exists() and json.loads(out5)["runs"][0]["metrics"] == res["runs"][0]["metrics"]
    from mtp.config import ModelConfig
    from mtp.evals.sweep import TrainConfig, _recorded
    mcfg = ModelConfig.from_dict(row["model"])
    tcfg = TrainConfig(corpus=[corpus], out=str(out_dir / "n1_s0"), steps=6)
    assert _recorded(out_dir / "n1_s0", mcfg, tcfg) is not None
    assert _recorded(out_dir / "n1_s0", dataclasses.replace(mcfg, draft_vocab=list(range(64))), tcfg) is None
    assert _recorded(out_dir / "n1_s0", mcfg, dataclasses.replace(tcfg, steps=7)) is None
    # more steps asked: the recorded row no longer counts, and a run stopped part way resumes
    # from its checkpoint (the steps already logged are not trained again)
    def resumable(steps):
        return ["sweep", "--task", "loss", "--corpus", corpus, "--out", tmp_path / "sweep8", "--variants", "n=2",
                "--steps", str(steps), "--seq-len", "32", "--batch-size", "2", "--dim", "32", "--n-layers", "3",
                "--n-heads", "2", "--eval-every", "3", "--save-every", "3", "--log-every", "1", "--limit", "4",
                "--no-progress", "--json"]
    assert run_cli(capsys, *resumable(3))[0] == 0
    argv8 = resumable(8)
    code, out4, err = run_cli(capsys, *argv8)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (tmp_path / "sweep8" / "n2_s0" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and steps[0] == 1
    assert json.loads((tmp_path / "sweep8" / "n2_s0" / "train_seconds.json").read_text())["resumed_from"] == 3


def test_sweep_bad_input(capsys, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "from_git" / "n1_s0").mkdir(parents=True)  # a sweep cloned from git: runs' small files only
    (tmp_path / "from_git" / "n1_s0" / "run.json").write_text("{}")
    for argv, needle in [
        (["sweep", "--task", "nope", "--out", tmp_path / "s"], "unknown sweep task"),
        (["sweep", "--task", "loss", "--out", tmp_path / "busy"], "not a sweep directory"),
        (["sweep", "--task", "loss", "--out", tmp_path / "s", "--n", "1,9"], "needs at least 9 blocks"),
        (["sweep", "--task", "loss", "--out", tmp_path / "from_git", "--n", "1,9"], "needs at least 9 blocks"),
        (["sweep", "--task", "loss", "--out", tmp_path / "s", "--variants", "n=2;x=1"], "unknown key"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert needle in err and "Traceback" not in err


def test_sweep_on_a_synthetic_task(capsys, tmp_path):
    """The sweep writes the task's files once, trains on train.jsonl, evaluates on eval.jsonl,
    and reports the breakdown by m with its plot."""
    out_dir = tmp_path / "poly"
    code, out, err = run_cli(capsys, "sweep", "--task", "polyarith", "--out", out_dir, "--n", "1,2",
                             "--n-train", "300", "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                             "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--eval-every", "0",
                             "--save-every", "0", "--limit", "2", "--no-progress", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["corpus"] == [str(out_dir / "data" / "train.jsonl")]
    assert json.loads((out_dir / "data" / "task.json").read_text())["n_train"] == 300
    for r in res["runs"]:
        assert set(r["metrics"]) >= {"accuracy", "in_domain", "out_of_domain"}
        assert r["by_name"] == "m" and len(r["by"]) == 10
    assert (out_dir / "by_m.png").stat().st_size > 0
    assert "accuracy by m" in (out_dir / "report.md").read_text()
