"""Fine-tuning: heads added to a pretrained model (both layouts), heads-only training with a
frozen trunk, the extra heads' loss-weight schedule, and `mtp finetune` end to end."""

from __future__ import annotations

import json

import pytest
import torch

import mtp.train as train_mod
from mtp.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from mtp.cli import main
from mtp.config import ModelConfig, TrainConfig
from mtp.errors import MTPError
from mtp.finetune import add_heads, apply_freeze
from mtp.model import MTPTransformer
from mtp.tokenizers import ByteTokenizer


def cfg(**kw) -> ModelConfig:
    args = dict(vocab_size=320, dim=32, n_layers=3, n_heads=4, max_seq_len=64, multiple_of=16, n_future=1)
    args.update(kw)
    return ModelConfig(**args)


def pretrained(seed=0, **kw) -> MTPTransformer:
    """A model whose blocks all differ and whose norms are not all ones (every weight matters)."""
    torch.manual_seed(seed)
    model = MTPTransformer(cfg(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def block_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sb)  # a's keys may be a superset (sequential heads)


X = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


# ---- add_heads ------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type", ["parallel", "causal", "sequential", "linear"])
def test_plus_layers_keeps_next_token_path(head_type):
    old = pretrained()
    new = add_heads(old, 4, "plus-layers", head_type)
    c = new.config
    assert (c.n_future, c.head_type) == (4, head_type)
    assert c.n_layers == (3 if head_type == "linear" else 6)
    assert torch.equal(new(X), old(X))  # bit for bit
    assert len(new.layers) == len(old.layers) and all(block_equal(a, b) for a, b in zip(new.layers, old.layers))
    for head in new.extra_heads:
        if head_type == "linear":
            assert torch.equal(head.weight, torch.eye(32))
        else:  # each new head starts as the pretrained next-token head
            assert block_equal(head, old.layers[-1])
    assert new(X, return_all_heads=True).shape == (2, 12, 4, 320)
    assert old.config.n_future == 1  # the source is left alone


def test_matched_layout_mapping():
    old = pretrained(n_layers=5)
    new = add_heads(old, 3, "matched")
    assert new.config.n_layers == 5 and new.config.n_trunk == 2
    assert new.param_counts()["total"] == old.param_counts()["total"]  # parameter-matched
    assert block_equal(new.layers[0], old.layers[0]) and block_equal(new.layers[1], old.layers[1])
    assert block_equal(new.layers[-1], old.layers[-1])  # the next-token head keeps the last block
    assert all(block_equal(h, old.layers[-1]) for h in new.extra_heads)
    assert not torch.equal(new(X), old(X))  # two blocks left the next-token path
    # growing a two-head model: its extra head is kept, the new one copies the next-token head
    two = add_heads(old, 2, "matched")
    three = add_heads(two, 3, "matched")
    assert three.config.n_layers == 5 and block_equal(three.extra_heads[0], two.extra_heads[0])
    assert block_equal(three.extra_heads[1], two.layers[-1]) and block_equal(three.layers[0], two.layers[0])


def test_fewer_heads_keeps_next_token_path():
    four = pretrained(n_layers=5, n_future=4, head_type="causal")
    one = add_heads(four, 1)
    assert one.config.n_layers == 2 and one.config.n_future == 1
    assert torch.equal(one(X), four(X))
    two = add_heads(four, 2)
    # the same computation in a smaller batch of heads: MKL's AVX2 kernels (not its AVX-512 ones)
    # may round it differently, by an ulp (6e-8 seen under MKL_ENABLE_INSTRUCTIONS=AVX2); a wrong
    # head would be off by ~0.1
    torch.testing.assert_close(two(X, return_all_heads=True), four(X, return_all_heads=True)[:, :, :2],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, n, layout, match", [
    (dict(n_future=2, n_layers=4, head_type="anticausal"), 3, "plus-layers", "anticausal"),
    (dict(), 3, "plus-layers", "anticausal"),  # head_type given below
    (dict(n_future=3, n_layers=4), 2, "matched", "only adds heads"),
    (dict(), 3, "matched", "nothing to match"),  # linear
    (dict(n_future=2), 3, "plus-layers", "cannot change"),  # causal asked of parallel heads
    (dict(n_future=2, offsets=[1, 3]), 3, "plus-layers", "offsets"),
    (dict(), 3, "sideways", "unknown layout"),
])
def test_add_heads_errors(kw, n, layout, match):
    head_type = {"anticausal": "anticausal", "nothing to match": "linear", "cannot change": "causal"}.get(match)
    with pytest.raises(MTPError, match=match):
        add_heads(pretrained(**kw), n, layout, None if kw.get("head_type") else head_type)


# ---- training from a checkpoint -------------------------------------------------------------
@pytest.fixture
def source(tmp_path):
    return save_checkpoint(tmp_path / "src" / "checkpoint", pretrained(), ByteTokenizer(), step=5)


def ft_config(corpus, out, source, **kw) -> TrainConfig:
    args = dict(corpus=[str(corpus)], out=str(out), steps=4, batch_size=2, seq_len=24, lr=1e-2, warmup=1,
                eval_every=0, eval_batches=1, save_every=0, log_every=1, seed=3, device="cpu",
                init_from=str(source), init_n_future=3)
    args.update(kw)
    return TrainConfig(**args)


def rows(out, kind="train") -> list[dict]:
    return [r for ln in (out / "metrics.jsonl").read_text().splitlines() if (r := json.loads(ln))["kind"] == kind]


def test_heads_only_training_changes_only_the_extra_heads(corpus, tmp_path, source):
    src, _, _ = load_checkpoint(source)
    start = add_heads(src, 3)
    res = train_mod.train(ft_config(corpus, tmp_path / "ft", source, freeze="trunk"), progress=False)
    trained = res.model
    changed = set()
    for name, p in trained.state_dict().items():
        if not torch.equal(p, start.state_dict()[name]):
            changed.add(name.split(".")[0] + "." + name.split(".")[1] if name.startswith("extra") else name)
    assert changed == {"extra_heads.0", "extra_heads.1"}  # every other parameter bit for bit
    assert torch.equal(trained(X), src(X))  # next-token logits unchanged
    assert all(r["loss_weights"] == [0.0, 1.0, 1.0] and r["per_head"][0] is None for r in rows(tmp_path / "ft"))
    # the checkpoint holds the whole model; the optimizer state only the trained parameters
    saved, _, meta = load_checkpoint(tmp_path / "ft")
    assert torch.equal(saved(X), src(X)) and meta["train"]["freeze"] == "trunk"
    state = load_trainer_state(tmp_path / "ft")
    assert state["optimizer"]["state"] and all(k.startswith("extra_heads.") for k in state["optimizer"]["state"])
    # and resumes (name-keyed optimizer state over the trainable parameters only)
    more = train_mod.train(ft_config(corpus, tmp_path / "ft", source, freeze="trunk", steps=6), None,
                           resume=True, progress=False)
    assert torch.equal(more.model(X), src(X)) and len(rows(tmp_path / "ft")) == 6


def test_full_finetune_weight_schedule_is_logged(corpus, tmp_path, source):
    tcfg = ft_config(corpus, tmp_path / "ft", source, steps=6, loss_weights="1,0.5,0.5", extra_weight=0.4,
                     extra_weight_warmup=4)
    res = train_mod.train(tcfg, progress=False)
    logged = [r["loss_weights"] for r in rows(tmp_path / "ft")]
    lam = [0.4 * min(1, s / 4) for s in range(6)]
    assert sum(logged, []) == pytest.approx(sum(([1.0, 0.5 * x, 0.5 * x] for x in lam), []), rel=1e-12)
    assert rows(tmp_path / "ft")[0]["per_head"][1] is None  # weight 0 at step 0: head not run
    assert rows(tmp_path / "ft")[-1]["per_head"][1] is not None
    assert not torch.equal(res.model.layers[0].attention.wq.weight,
                           load_checkpoint(source)[0].layers[0].attention.wq.weight)  # the trunk trains


def test_freeze_and_init_errors(corpus, tmp_path, source):
    with pytest.raises(MTPError, match="nothing to train"):
        train_mod.train(ft_config(corpus, tmp_path / "a", source, init_n_future=None, freeze="trunk"), progress=False)
    with pytest.raises(MTPError, match="needs full fine-tuning"):
        train_mod.train(ft_config(corpus, tmp_path / "b", source, init_layout="matched", freeze="trunk"),
                        progress=False)
    with pytest.raises(MTPError, match="tokenizer comes from"):
        train_mod.train(ft_config(corpus, tmp_path / "c", source, tokenizer="byte"), progress=False)
    with pytest.raises(MTPError, match="nothing to train"):
        apply_freeze(pretrained(n_future=3, n_layers=4, head_type="anticausal"), "trunk")
    with pytest.raises(MTPError, match="extra_weight"):
        TrainConfig(extra_weight=-1.0)
    with pytest.raises(MTPError, match="need init_from"):
        TrainConfig(init_n_future=4)


# ---- the command -----------------------------------------------------------------------------
def cli_n1(corpus, n1, capsys, steps: int = 3) -> list[str]:
    """Train a tiny n = 1 model into n1 with `mtp train`; returns the training flags it used
    (for the fine-tuning runs that start from it)."""
    common = ["--steps", str(steps), "--batch-size", "2", "--seq-len", "24", "--eval-batches", "1", "--device",
              "cpu", "--no-progress"]
    assert main(["train", str(corpus), "--out", str(n1), "--preset", "tiny", "--n-future", "1", "--dim", "32",
                 "--n-layers", "3", "--max-seq-len", "64", "--eval-every", "0", *common]) == 0
    capsys.readouterr()
    return common


def test_finetune_cli_end_to_end(corpus, tmp_path, capsys):
    n1 = tmp_path / "n1"
    common = cli_n1(corpus, n1, capsys)
    h4 = tmp_path / "h4"
    assert main(["finetune", str(n1), "--out", str(h4), "--n-future", "4", "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_future"], summary["n_layers"], summary["mode"]) == (4, 6, "heads")
    src, tok, _ = load_checkpoint(n1)
    ft, _, meta = load_checkpoint(h4)
    assert ft.config.n_future == 4 and meta["train"]["init_from"].endswith("checkpoint")
    x = torch.tensor([tok.encode("def f1(x):")])
    assert torch.equal(ft(x), src(x))
    assert main(["generate", str(h4), "--prompt", "def f", "--max-new-tokens", "6", "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["k"] == 4
    # `mtp train --resume` continues a heads-only run as heads-only: the next-token path stays put
    assert main(["train", "--out", str(h4), "--resume", "--steps", "5", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    resumed, _, meta = load_checkpoint(h4)
    assert meta["train"]["freeze"] == "trunk" and meta["step"] == 5
    assert torch.equal(resumed(x), src(x))

    # n = 4 -> n' = 1 (full fine-tuning of what is left: a plain next-token model)
    assert main(["finetune", str(h4), "--out", str(tmp_path / "one"), "--n-future", "1", "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_future"], summary["n_layers"], summary["mode"]) == (1, 3, "full")

    # bad input: exit code 2, one line, nothing overwritten
    before = (h4 / "checkpoint" / "model.safetensors").read_bytes()
    bad = [
        (["finetune", str(corpus), "--out", str(tmp_path / "x")], "not a checkpoint"),
        (["finetune", str(n1), "--out", str(tmp_path / "x"), "--n-future", "4", "--layout", "matched",
          "--mode", "heads"], "--layout matched"),
        (["finetune", str(n1), "--out", str(tmp_path / "x"), "--mode", "heads"], "1 head"),
        (["finetune", str(n1), "--out", str(h4), "--n-future", "4"], "already holds a checkpoint"),
        (["finetune", str(n1), "--out", str(h4), "--resume", "--overwrite"], "cannot be combined"),
        (["finetune", str(n1), "--out", str(n1), "--resume"], "not a fine-tuning run"),
        (["finetune", str(n1), "--out", str(tmp_path / "x"), "--n-future", "0"], "heads must be"),
    ]
    for argv, match in bad:
        assert main(argv + common) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (argv, err)
    assert (h4 / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_matched_layout_trains_whole_model(corpus, tmp_path, source):
    res = train_mod.train(ft_config(corpus, tmp_path / "m", source, init_n_future=2, init_layout="matched",
                                    steps=2), progress=False)
    src = load_checkpoint(source)[0]
    assert res.model.config.n_layers == 3 and res.model.config.n_future == 2 and res.model.config.n_trunk == 1
    assert all(p.requires_grad for p in res.model.parameters())
    assert not torch.equal(res.model.layers[0].attention.wq.weight, src.layers[0].attention.wq.weight)
    saved, _, _ = load_checkpoint(tmp_path / "m")
    assert saved.config.to_dict() == res.model.config.to_dict()
