"""Training loop, checkpoints and resume, on tiny configs."""

from __future__ import annotations

import json

import pytest
import torch

import mtp.train as train_mod
from mtp.checkpoint import load_checkpoint, save_checkpoint
from mtp.config import ModelConfig, TrainConfig
from mtp.errors import MTPError
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    for i in range(12):
        (d / f"m{i}.py").write_text(text * (3 + i) + f"# file {i}\n")
    return d


def tiny_model(n_future=2, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=320, dim=32, n_layers=3, n_heads=4, max_seq_len=64, multiple_of=16,
                       n_future=n_future, **kw)


def tiny_train(corpus, out, **kw) -> TrainConfig:
    args = dict(corpus=[str(corpus)], out=str(out), steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup=2,
                eval_every=5, eval_batches=2, save_every=0, log_every=1, seed=7, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def train_losses(out) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_training_reduces_loss_and_writes_run(corpus, tmp_path):
    res = train_mod.train(tiny_train(corpus, tmp_path / "run", steps=30), tiny_model(), progress=False)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 0.5
    assert len(res.final_eval["loss"]) == 2 and len(res.final_eval["acc"]) == 2
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    model, tok, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 30 and tok.name == "byte"
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_resume_equals_uninterrupted(corpus, tmp_path, monkeypatch):
    """A crash (here: Ctrl-C at step 7) saves the last finished step; --resume then continues
    with exactly the losses of the run that was never interrupted."""
    full = tmp_path / "full"
    train_mod.train(tiny_train(corpus, full), tiny_model(), progress=False)

    cut = tmp_path / "cut"
    real_sample = train_mod.sample_batch

    def interrupt_at_7(*a, **kw):
        if kw["step"] == 7:
            raise KeyboardInterrupt
        return real_sample(*a, **kw)

    monkeypatch.setattr(train_mod, "sample_batch", interrupt_at_7)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(tiny_train(corpus, cut), tiny_model(), progress=False)
    monkeypatch.setattr(train_mod, "sample_batch", real_sample)
    assert len(train_losses(cut)) == 7
    train_mod.train(tiny_train(corpus, cut), None, resume=True, progress=False)
    assert train_losses(cut) == pytest.approx(train_losses(full), rel=1e-6, abs=0)


def test_training_loop_accumulates_micro_batches(corpus, tmp_path):
    """One optimizer step of the loop with grad_accum=2 equals the step written out by hand:
    the mean of the two micro-batches' gradients (naive loss), clipping, AdamW at lr_at(0)."""
    from mtp.data import sample_batch
    from mtp.losses import naive_loss

    tcfg = tiny_train(corpus, tmp_path / "run", steps=1, batch_size=2, grad_accum=2, grad_clip=0.5)
    res = train_mod.train(tcfg, tiny_model(n_future=3), progress=False)

    torch.manual_seed(tcfg.seed)
    model = MTPTransformer(tiny_model(n_future=3))
    opt = train_mod.make_optimizer(model, tcfg)
    data = train_mod.load_data(tcfg, ByteTokenizer(), progress=False)
    micro = [sample_batch(data.train, 2, tcfg.seq_len, seed=tcfg.seed, step=0, micro=m) for m in range(2)]
    loss = sum(naive_loss(model, b, [1.0, 1.0, 1.0]).loss for b in micro) / 2
    assert train_losses(tmp_path / "run")[0] == pytest.approx(float(loss), rel=1e-5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    lr = train_mod.lr_at(0, tcfg)
    for group in opt.param_groups:
        group["lr"] = lr
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    ref = {name: p.detach() for name, p in model.named_parameters()}

    def off(params):
        """Weights outside what float32 rounding allows around the hand-made step. AdamW's first
        step moves each weight by lr * g / (|g| + eps): where g is near zero, the rounding that
        another summation order (another CPU's kernels) puts into g can change the step by up
        to 2 lr. Allowed: what a gradient error of 1e-5 of the tensor's largest gradient can
        change, plus float32 rounding of the weights themselves."""
        bad = []
        for name, g in grads.items():
            delta = 1e-5 * g.abs().max()
            step = lambda x: x / (x.abs() + 1e-8)  # noqa: E731
            allowed = lr * (step(g.abs() + delta) - step(g.abs() - delta)) + 1e-6 + 1e-5 * ref[name].abs()
            err = (params[name].detach() - ref[name]).abs()
            if (err > allowed).any():
                bad.append(f"{name}: {int((err > allowed).sum())} of {err.numel()} off, max {err.max():.3g}")
        return bad

    assert off(dict(res.model.named_parameters())) == []
    # the bound can fail: a step at half the learning rate is caught in every tensor that trains
    half = {name: (before[name] + ref[name]) / 2 for name in ref}
    assert len(off(half)) == len(ref)


def test_checkpoint_roundtrip_tied_and_atomic(tmp_path, monkeypatch):
    cfg = tiny_model(n_future=3, tie_embeddings=True, head_type="causal")
    model = MTPTransformer(cfg)
    ckpt = save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), step=3)
    loaded, tok, meta = load_checkpoint(ckpt)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 320, (2, 10))
    torch.testing.assert_close(loaded(x, return_all_heads=True), model(x, return_all_heads=True), rtol=0, atol=0)

    # a crash in the middle of a save leaves the previous checkpoint untouched and no debris
    before = (ckpt / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.norm.weight.add_(1.0)

    def boom(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(ByteTokenizer, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), step=4)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ck", MTPTransformer(tiny_model()), ByteTokenizer())
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MTPError, match="corrupt checkpoint"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(MTPError, match="corrupt checkpoint"):
        load_checkpoint(ckpt)


def test_existing_checkpoint_refused_and_untouched(corpus, tmp_path):
    out = tmp_path / "run"
    train_mod.train(tiny_train(corpus, out, steps=2), tiny_model(), progress=False)
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(MTPError, match="already holds a checkpoint"):
        train_mod.train(tiny_train(corpus, out, steps=2), tiny_model(), progress=False)
    with pytest.raises(MTPError, match="different model config"):
        train_mod.train(tiny_train(corpus, out, steps=4), tiny_model(n_future=3), resume=True, progress=False)
    with pytest.raises(MTPError, match="seq_len 128 exceeds"):
        train_mod.train(tiny_train(corpus, tmp_path / "other", seq_len=128), tiny_model(), progress=False)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    train_mod.train(tiny_train(corpus, out, steps=2, seed=8), tiny_model(), overwrite=True, progress=False)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() != before


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert train_mod.lr_at(0, cfg) == pytest.approx(0.1)
    assert train_mod.lr_at(9, cfg) == pytest.approx(1.0)
    assert train_mod.lr_at(10, cfg) == pytest.approx(1.0)
    assert train_mod.lr_at(55, cfg) == pytest.approx(0.55)
    assert train_mod.lr_at(100, cfg) == pytest.approx(0.1)


def test_crash_resumes_from_periodic_save_bitwise(corpus, tmp_path, monkeypatch):
    """A hard crash (no handler runs) at step 7 with saves every 4 steps: --resume restarts at
    step 4, drops the metrics logged after it, and ends with bitwise the uninterrupted weights."""
    full = tmp_path / "full"
    ref = train_mod.train(tiny_train(corpus, full, save_every=4), tiny_model(head_type="sequential"), progress=False)

    cut = tmp_path / "cut"
    real_sample = train_mod.sample_batch

    def crash_at_7(*a, **kw):
        if kw["step"] == 7:
            raise RuntimeError("power cut")
        return real_sample(*a, **kw)

    monkeypatch.setattr(train_mod, "sample_batch", crash_at_7)
    with pytest.raises(RuntimeError):
        train_mod.train(tiny_train(corpus, cut, save_every=4), tiny_model(head_type="sequential"), progress=False)
    monkeypatch.setattr(train_mod, "sample_batch", real_sample)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by the crash
    res = train_mod.train(tiny_train(corpus, cut, save_every=4), None, resume=True, progress=False)
    assert train_losses(cut) == train_losses(full)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k


def test_interrupted_save_and_overwrite_keep_a_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_mod.train(tiny_train(corpus, out, steps=2), tiny_model(), progress=False)
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    # a save that died between its two renames leaves only checkpoint.old: it is still found,
    # and the next save puts it back before doing anything else
    (out / "checkpoint").rename(out / "checkpoint.old")
    model, tok, _ = load_checkpoint(out)

    def boom(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(ByteTokenizer, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(out / "checkpoint", model, ByteTokenizer())
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    monkeypatch.undo()

    # --overwrite interrupted before its first save: the old checkpoint is still there
    real_sample = train_mod.sample_batch

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "sample_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(tiny_train(corpus, out, steps=2, seed=9), tiny_model(), overwrite=True, progress=False)
    monkeypatch.setattr(train_mod, "sample_batch", real_sample)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


def test_sigterm_saves_the_last_finished_step(corpus, tmp_path, monkeypatch):
    """`kill PID` during training stops it as Ctrl-C does: the last finished step is saved (a job
    started in the background by a non-interactive shell ignores SIGINT), and the handler that
    was there before comes back."""
    import os
    import signal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("ours"))  # without the feature: no stop
    real_sample, calls = train_mod.sample_batch, []

    def term_in_step_6(*a, **kw):
        calls.append(1)
        if len(calls) == 6:  # steps 1-5 are finished
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*a, **kw)

    monkeypatch.setattr(train_mod, "sample_batch", term_in_step_6)
    out = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(tiny_train(corpus, out, steps=40), tiny_model(), progress=False)
        assert seen == []
        assert load_checkpoint(out)[2]["step"] == 5
        signal.raise_signal(signal.SIGTERM)  # the test's own handler is back
        assert seen == ["ours"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_skipped_heads_log_null_not_nan(corpus, tmp_path):
    out = tmp_path / "run"
    train_mod.train(tiny_train(corpus, out, steps=2, loss_weights="nth"), tiny_model(n_future=3), progress=False)
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = [json.loads(ln) for ln in text.splitlines()]
    assert rows[0]["per_head"][1] is None and rows[0]["per_head"][0] > 0 and rows[0]["per_head"][2] > 0


def test_demo_runs_end_to_end_and_plots(tmp_path, monkeypatch):
    """The quickstart's code path at 2 steps per model: table, report, JSON and a PNG plot."""
    import mtp.demo as demo

    monkeypatch.setitem(demo.DEMO_TRAIN, "eval_batches", 1)
    monkeypatch.setitem(demo.DEMO_DECODE, "max_new_tokens", 8)
    monkeypatch.setitem(demo.DEMO_DECODE, "batch_sizes", (1, 2))
    monkeypatch.setitem(demo.DEMO_DECODE_COMPILED, "ks", (2,))
    result = demo.run_demo(tmp_path / "demo", steps=2, device="cpu", progress=False)
    decoding = result["decoding"]["results"]
    assert [(r["batch_size"], r["k"]) for r in decoding] == [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)]
    assert all(r["identical"] for r in decoding)
    compiled = result["decoding_compiled"]
    assert compiled["compile"] and [(r["batch_size"], r["k"]) for r in compiled["results"]] == [(1, 2)]
    assert compiled["results"][0]["identical"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Decoding the n = 4 model" in report and "Compiled (`--compile`" in report
    assert result["table"].count("| batch | k |") == 2  # the eager and the compiled decoding tables
    assert (tmp_path / "demo" / "decoding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m["n_future"] for m in result["models"]] == [4, 1]
    assert len(result["models"][0]["heldout_top1_per_head"]) == 4
    assert "| n=4 |" in result["table"] and "| n=1 |" in result["table"]
    assert (tmp_path / "demo" / "head_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["steps"] == 2


def test_plot_labels_follow_offsets(tmp_path):
    from mtp.plots import _offsets

    (tmp_path / "run.json").write_text(json.dumps({"model": {"offsets": [1, 2, 4, 128]}}))
    assert _offsets(tmp_path / "run.json", 4) == [1, 2, 4, 128]
    assert _offsets(tmp_path / "missing.json", 3) == [1, 2, 3]


def test_loss_weights_schedule_and_frozen_optimizer():
    base = [1.0, 0.5, 0.25]
    cfg = TrainConfig(extra_weight=0.6, extra_weight_warmup=3)
    got = [train_mod.loss_weights_at(s, base, cfg) for s in (0, 1, 3, 50)]
    assert got[0] == [1.0, 0.0, 0.0]
    assert got[1] == pytest.approx([1.0, 0.1, 0.05]) and got[2] == got[3] == pytest.approx([1.0, 0.3, 0.15])
    assert train_mod.loss_weights_at(0, base, TrainConfig()) == base  # no schedule: the weights as given
    assert train_mod.loss_weights_at(0, base, TrainConfig(freeze="trunk")) == [0.0, 0.5, 0.25]
    model = MTPTransformer(tiny_model(n_future=3))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("extra_heads.1."))
    opt = train_mod.make_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.extra_heads[1].parameters()}


def test_grad_cosine_logged_at_log_steps(corpus, tmp_path):
    from mtp.cli import main

    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--preset", "tiny", "--n-future", "3", "--dim", "32",
                 "--n-layers", "4", "--max-seq-len", "64", "--seq-len", "24", "--steps", "4", "--batch-size", "2",
                 "--grad-accum", "2", "--log-every", "2", "--eval-every", "0", "--eval-batches", "1", "--device",
                 "cpu", "--no-progress", "--log-grad-cosine", "--loss-weights", "1,0,1"]) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4]
    for r in train_rows:
        cos = r["grad_cosine"]
        assert len(cos) == 3 and all(len(row) == 3 for row in cos)
        assert cos[0][0] == pytest.approx(1.0) and cos[2][2] == pytest.approx(1.0)
        assert cos[1] == [None, None, None] and -1 < cos[0][2] < 1 and cos[0][2] == pytest.approx(cos[2][0])
    plain = tmp_path / "plain"
    train_mod.train(tiny_train(corpus, plain, steps=2), tiny_model(), progress=False)
    assert all("grad_cosine" not in json.loads(ln) for ln in (plain / "metrics.jsonl").read_text().splitlines())
