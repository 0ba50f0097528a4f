"""FSDP2 and data parallel through mtp.parallel, on CPU with gloo and 2 processes: gradients and
steps equal one process on the same global batch, one reduction per unit per optimizer step, and
checkpoints that resume across world sizes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtp.train as train_mod
from mtp.config import ModelConfig, TrainConfig
from mtp.distributed import DistInfo, run_then_teardown, teardown
from mtp.losses import mtp_loss_backward, naive_loss
from mtp.model import MTPTransformer
from mtp.parallel import load_named_optimizer_state, named_optimizer_state, parallelize

BASE = dict(vocab_size=64, dim=32, n_layers=5, n_heads=4, max_seq_len=32, multiple_of=16, n_future=3)
# (head type, memory-efficient loss, fsdp); weights 1, 0.5, 1
CASES = [("parallel", True, True), ("sequential", True, True), ("linear", True, True),
         ("causal", False, True), ("parallel", True, False)]
WEIGHTS = [1.0, 0.5, 1.0]


def _optimizer(model, tcfg):
    """AdamW with a large eps: its first step is about lr * sign(grad), which would turn the
    rounding of a near-zero gradient into a full-size difference."""
    opt = train_mod.make_optimizer(model, tcfg)
    for group in opt.param_groups:
        group["eps"] = 1e-3
    return opt


def _counting(name: str, calls: list):
    real = getattr(dist, name)

    def wrapper(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    setattr(dist, name, wrapper)
    return real


def _step_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # FSDP2 reduce-scatters with reduce_scatter_single (torch >= 2.12) or reduce_scatter_tensor
    rs = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    results = {}
    for head_type, efficient, fsdp in CASES:
        torch.manual_seed(0)
        model = MTPTransformer(ModelConfig(**BASE, head_type=head_type))
        tcfg = TrainConfig(device="cpu", fsdp=fsdp, memory_efficient=efficient, lr=1e-2, grad_accum=2)
        par = parallelize(model, DistInfo(rank, 2, rank, torch.device("cpu")), tcfg)
        opt = _optimizer(model, tcfg)
        torch.manual_seed(1)
        batch = torch.randint(0, 64, (4, 17))  # the global batch, the same on both ranks
        mine = batch[2 * rank : 2 * rank + 2]
        calls: list[str] = []
        reals = {name: _counting(name, calls) for name in (rs, "all_reduce")}
        try:
            for micro in range(2):  # gradient accumulation: 2 micro-batches of 1 row per rank
                with par.micro_batch(last=micro == 1) as on_backward:
                    if efficient:
                        mtp_loss_backward(model, mine[micro : micro + 1], WEIGHTS, grad_scale=0.5, chunk=5,
                                          on_backward=on_backward)
                    else:
                        (naive_loss(model, mine[micro : micro + 1], WEIGHTS).loss / 2).backward()
            par.reduce_grads()
        finally:
            for name, real in reals.items():
                setattr(dist, name, real)
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        grads = {k: full(p.grad).clone() for k, p in model.named_parameters()}
        norm = par.clip_grad_norm(0.5)
        opt.step()
        params = {k: full(p.detach()).clone() for k, p in model.named_parameters()}
        units = len(model.layers) + len(model.extra_heads) + 1  # blocks, heads and the root
        results[(head_type, efficient, fsdp)] = {
            "grads": grads, "params": params, "norm": norm, "units": units,
            "sharded": [hasattr(p, "full_tensor") for g in opt.param_groups for p in g["params"]],
            "reduce_scatters": calls.count(rs), "all_reduces": calls.count("all_reduce")}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    teardown(synchronize=True)


@pytest.mark.slow
def test_two_processes_step_equals_one_and_reduce_once(tmp_path):
    """One optimizer step with gradient accumulation 2 on 2 gloo processes (FSDP2 for four head
    types and both losses; DDP once) gives the single process's gradients, clipped norm and
    updated weights on the same global batch; FSDP2 reduce-scatters each unit exactly once per
    step and never all-reduces, DDP all-reduces once."""
    mp.spawn(_step_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for (head_type, efficient, fsdp), got in results.items():
        torch.manual_seed(0)
        model = MTPTransformer(ModelConfig(**BASE, head_type=head_type))
        tcfg = TrainConfig(device="cpu", lr=1e-2)
        opt = _optimizer(model, tcfg)
        torch.manual_seed(1)
        batch = torch.randint(0, 64, (4, 17))
        sum(naive_loss(model, batch[i : i + 1], WEIGHTS).loss for i in range(4)).div(4).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        case = f"{head_type} efficient={efficient} fsdp={fsdp}"
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{case}: {k}: {m}")
        assert got["norm"] == pytest.approx(norm, rel=1e-5), case
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["params"][k], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{case}: {k}: {m}")
        assert set(got["sharded"]) == {fsdp}, case  # FSDP2: the optimizer holds only shards
        if fsdp:
            assert (got["reduce_scatters"], got["all_reduces"]) == (got["units"], 0), case
        else:
            assert (got["reduce_scatters"], got["all_reduces"]) == (0, 1), case


def test_activation_checkpointing_same_gradients():
    """Checkpointed trunk blocks recompute their activations in the backward: same loss and
    gradients, same parameter names, and the recomputation really happens."""
    from mtp.parallel import apply_activation_checkpointing

    window = torch.randint(0, 64, (2, 17))
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = MTPTransformer(ModelConfig(**BASE, head_type="sequential"))
        if ac:
            apply_activation_checkpointing(model)
        calls = []
        model.layers[0].attention.register_forward_hook(lambda *a: calls.append(1))
        mtp_loss_backward(model, window, WEIGHTS)
        assert len(calls) == (2 if ac else 1)  # forward, and again in the backward
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-6, atol=1e-8)


def test_named_optimizer_state_roundtrip():
    """The name-keyed optimizer state (the checkpoint's layout) loads back exactly, and maps by
    name, not position."""
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(**BASE, head_type="parallel"))
    opt = train_mod.make_optimizer(model, TrainConfig())
    mtp_loss_backward(model, torch.randint(0, 64, (2, 17)), WEIGHTS)
    opt.step()
    named = named_optimizer_state(model, opt)
    assert "output.weight" in named["state"] and "norm.weight" in named["param_groups"][1]["params"]
    opt2 = train_mod.make_optimizer(model, TrainConfig())
    load_named_optimizer_state(model, opt2, named)
    for p in model.parameters():
        for key, v in opt.state[p].items():
            assert torch.equal(opt2.state[p][key], v)
    torch.testing.assert_close(named["state"]["norm.weight"]["exp_avg"], opt.state[model.norm.weight]["exp_avg"])


# ---- cross-world-size resume, through mtp.train.train --------------------------------------
MODEL = dict(vocab_size=320, dim=32, n_layers=3, n_heads=4, max_seq_len=64, multiple_of=16, n_future=2)


def _tcfg(corpus, out, world: int, fsdp: bool) -> TrainConfig:
    # the same global batch (4 x 32 tokens, 2 micro-batches) whatever the world size
    return TrainConfig(corpus=[str(corpus)], out=str(out), steps=6, batch_size=4 // world, grad_accum=2,
                       seq_len=32, lr=3e-3, warmup=2, eval_every=2, eval_batches=1, save_every=2, log_every=1,
                       seed=7, device="cpu", fsdp=fsdp)


def _run(tcfg: TrainConfig, resume: bool, crash_at: int | None) -> None:
    """train(); with crash_at, a hard crash when step crash_at starts (after the periodic save)."""
    real = train_mod.sample_batch

    def crashing(*a, **kw):
        if kw["step"] == crash_at:
            raise RuntimeError("power cut")
        return real(*a, **kw)

    train_mod.sample_batch = crashing
    try:
        train_mod.train(tcfg, None if resume else ModelConfig(**MODEL), resume=resume, progress=False)
    except RuntimeError as e:
        if "power cut" not in str(e):
            raise
    finally:
        train_mod.sample_batch = real


def _resume_worker(rank: int, port: int, corpus: str, out: str, resume: bool, crash_at: int | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # both ranks "crash" at the same step, and _run catches that: every rank reaches the teardown
    run_then_teardown(_run, _tcfg(corpus, out, 2, fsdp=True), resume, crash_at)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out) -> list[list[float]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["per_head"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_resume_across_world_sizes(corpus, tmp_path):
    """Steps 1-2 on 2 FSDP2 processes (crash at step 3), steps 3-4 resumed on 1 process (crash at
    5), steps 5-6 resumed on 2 FSDP2 processes: every step's loss equals the uninterrupted
    single-process run's."""
    full = tmp_path / "full"
    _run(_tcfg(corpus, full, 1, fsdp=False), resume=False, crash_at=None)
    cut = tmp_path / "cut"
    mp.spawn(_resume_worker, args=(_free_port(), str(corpus), str(cut), False, 2), nprocs=2, join=True)
    assert json.loads((cut / "checkpoint" / "config.json").read_text())["step"] == 2
    _run(_tcfg(corpus, cut, 1, fsdp=False), resume=True, crash_at=4)
    assert json.loads((cut / "checkpoint" / "config.json").read_text())["step"] == 4
    mp.spawn(_resume_worker, args=(_free_port(), str(corpus), str(cut), True, None), nprocs=2, join=True)
    want, got = _losses(full), _losses(cut)
    assert len(want) == len(got) == 6
    assert want[0] != want[-1]  # training moved
    for a, b in zip(want, got):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_cli_nproc_fsdp_matches_one_process(corpus, tmp_path):
    """`mtp train --nproc 2 --fsdp` (torchrun underneath) trains like one process on the same
    global batch, and reports the same held-out figures (each process evaluates its slice)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(corpus), "--preset", "tiny", "--n-future", "2", "--seq-len", "32", "--steps", "2",
              "--log-every", "1", "--eval-every", "0", "--eval-batches", "2", "--device", "cpu", "--no-progress",
              "--lr", "1e-2", "--activation-checkpointing", "--json"]
    losses, held_out = [], []
    for name, extra in (("one", ["--batch-size", "4"]), ("two", ["--batch-size", "2", "--nproc", "2", "--fsdp"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "mtp", "train", *common, "--out", str(out), *extra],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append(_losses(out))
        held_out.append(json.loads(proc.stdout)["eval_loss"])  # stdout: rank 0's JSON, nothing else
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    for a, b in zip(*losses):
        assert b == pytest.approx(a, rel=1e-5)
    assert held_out[1] == pytest.approx(held_out[0], rel=1e-5)


def test_cli_nproc_bad_input_is_one_line(corpus, tmp_path):
    """Bad input with --nproc is refused before torchrun starts: one line, exit code 2."""
    base = [sys.executable, "-m", "mtp", "train", "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--device", "cpu", "--nproc", "2"]
    for extra, message in ((["--n-future", "4", "--fsdp", str(corpus)], "needs at least one trunk block"),
                           ([str(tmp_path / "missing")], "missing")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
