"""Data-parallel training on CPU with the gloo backend and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtp.config import ModelConfig
from mtp.distributed import all_reduce_grads, teardown
from mtp.losses import mtp_loss_backward, naive_loss
from mtp.model import MTPTransformer

CFG = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, max_seq_len=32, multiple_of=16, n_future=3,
           head_type="causal")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(**CFG))
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (4, 17))  # the global batch, the same on both ranks
    mine = batch[2 * rank : 2 * rank + 2]
    calls = []
    real = dist.all_reduce

    def counting(tensor, *a, **kw):
        calls.append(tensor.numel())
        return real(tensor, *a, **kw)

    dist.all_reduce = counting
    try:
        for micro in range(2):  # gradient accumulation: 2 micro-batches of 1 row per rank
            mtp_loss_backward(model, mine[micro : micro + 1], [1.0, 1.0, 1.0], grad_scale=0.5, chunk=5)
        all_reduce_grads(list(model.parameters()), world_size=2)
    finally:
        dist.all_reduce = real
    grads = {k: p.grad for k, p in model.named_parameters()}
    torch.save({"grads": grads, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    teardown(synchronize=True)


def test_grads_equal_single_process_and_one_reduction(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(**CFG))
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (4, 17))
    sum(naive_loss(model, batch[i : i + 1], [1.0, 1.0, 1.0]).loss for i in range(4)).div(4).backward()
    n_params = sum(p.numel() for p in model.parameters())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["calls"] == [n_params]  # one flat all-reduce for the whole step, after accumulation
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-5, atol=1e-7)


def _train(corpus, out, nproc, batch_size, tmp_path):
    env = {**os.environ, "MTP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["-m", "mtp", "train", str(corpus), "--out", str(out), "--preset", "tiny", "--n-future", "2",
            "--batch-size", str(batch_size), "--seq-len", "32", "--steps", "3", "--log-every", "1",
            "--eval-every", "0", "--eval-batches", "1", "--device", "cpu", "--no-progress", "--lr", "1e-2"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + args
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["per_head"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """torchrun with 2 x batch 2 trains exactly like 1 process with batch 4 (same global batch)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 30)
    one = _train(corpus, tmp_path / "one", 1, 4, tmp_path)
    two = _train(corpus, tmp_path / "two", 2, 2, tmp_path)
    assert len(one) == len(two) == 3
    assert one[0] != one[2]  # training moved
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)


def test_run_then_teardown_synchronizes_only_when_fn_returned(monkeypatch):
    """Every rank that returned meets the others at the teardown barrier; a rank that raised leaves
    at once (the others may never reach a barrier), and the error still propagates."""
    import mtp.distributed as md

    calls = []
    monkeypatch.setattr(md, "teardown", lambda synchronize=False: calls.append(synchronize))
    assert md.run_then_teardown(lambda x, y=0: x + y, 2, y=3) == 5
    assert calls == [True]

    def boom():
        raise RuntimeError("rank failed")

    with pytest.raises(RuntimeError, match="rank failed"):
        md.run_then_teardown(boom)
    assert calls == [True, False]
