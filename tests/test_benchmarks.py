"""benchmarks/gpu.py runs on CPU (--dry-run, toy sizes) and its FLOP count is the hand count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtp.config import preset

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _gpu_module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_model_flops_per_token_is_the_hand_count():
    """6 x (block matmul weights + one unembedding per head) + 12 x blocks x dim x seq; the
    parameter-matched n = 4 model passes the same 12 blocks as n = 1, plus 3 unembeddings."""
    gpu = _gpu_module()
    d, V, T, ffn = 768, 32000, 1024, 2048  # gpt2-124m: SwiGLU hidden 2048 (multiple of 256)
    block = 4 * d * d + 3 * d * ffn
    for n in (1, 4):
        cfg = preset("gpt2-124m", vocab_size=V, n_future=n)
        assert cfg.ffn_hidden == ffn
        want = 6 * (12 * block + n * V * d) + 12 * 12 * d * T
        assert gpu.model_flops_per_token(cfg, T) == want


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """Every section of the one-call GPU benchmark runs on CPU at toy sizes without an error,
    prints its tables and writes the figures; the transformers baseline (where installed) starts
    from our n = 1 model's weights, so its first loss is ours."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, report["errors"]
    for section in ("correctness", "memory", "throughput", "training", "decode"):
        assert section in report, section
    assert max(v for k, v in report["correctness"].items() if k.endswith("grad_rel_err")) < 1e-4
    tp = report["throughput"]
    mine = {(r["layout"], r["n"]): r for r in tp["rows"] if r["impl"] == "mtp"}
    assert set(mine) == {("tiny", 1), ("tiny", 4), ("small", 1), ("small", 4)}
    for r in tp["rows"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    hf = [r for r in tp["rows"] if r["impl"] == "transformers"]
    if importlib.util.find_spec("transformers") is not None:
        assert len(hf) == 1
        assert hf[0]["first_losses"][0] == pytest.approx(mine[("tiny", 1)]["first_losses"][0], rel=1e-3)
    assert [c["target"] for c in tp["checks"]][0] == "MFU n=1 >= 0.50"
    assert "| impl | layout | n |" in proc.stdout and "MFU" in proc.stdout


def test_decode_step_table_runs_every_weight_setting(tmp_path):
    """benchmarks/decode_step.py on a tiny checkpoint: a row per weight setting (as stored, packed,
    measured) and k, each with its cost over the greedy step."""
    import torch

    from mtp.checkpoint import save_checkpoint
    from mtp.config import ModelConfig
    from mtp.decode.packed import applies
    from mtp.model import MTPTransformer
    from mtp.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=3, n_heads=2, max_seq_len=64,
                                       multiple_of=16, n_future=2))
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    proc = subprocess.run([sys.executable, str(BENCH / "decode_step.py"), str(tmp_path / "ckpt"), "--position", "8",
                           "--steps", "2", "--rounds", "1", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    modes = ["as stored", "packed", "measured"] if applies(model) else ["as stored"]
    assert [r[1].strip() for r in rows] == [m for m in modes for _ in range(3)]  # greedy, k=2 twice
    assert all(float(r[4]) > 0 for r in rows)
    # --draft-vocab: a third k = 2 row per weight setting, the heads drafting among 16 tokens
    (tmp_path / "corpus.txt").write_text("abcdefghijklmnopqrstuvwxyz = 0123456789\n" * 200)  # 39 distinct bytes
    proc = subprocess.run([sys.executable, str(BENCH / "decode_step.py"), str(tmp_path / "ckpt"), "--position", "8",
                           "--steps", "2", "--rounds", "1", "--threads", "1", "--draft-vocab", "16",
                           "--corpus", str(tmp_path / "corpus.txt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert [r[3].strip() for r in rows[:4]] == ["-", "stacked", "own blocks", "stacked, dv 16"]


def test_peers_rows_take_turns_and_agree(tmp_path):
    """benchmarks/peers.py on a tiny byte-level checkpoint and prose prompts: our greedy and chain
    rows and transformers' greedy and prompt lookup, each timed in --repeats interleaved passes
    (the fastest kept), and every decoder's greedy tokens agree with ours."""
    import torch

    from mtp.checkpoint import save_checkpoint
    from mtp.config import ModelConfig
    from mtp.model import MTPTransformer
    from mtp.tokenizers import ByteTokenizer

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=3, n_heads=2, max_seq_len=64,
                                       multiple_of=16, n_future=2))
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(BENCH / "peers.py"), str(tmp_path / "ckpt"), "--sets", "nl",
                           "--n-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "6", "--k", "2",
                           "--repeats", "2", "--skip", "llama.cpp,mtp tree", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["repeats"] == 2
    rows = report["sets"]["nl"]["rows"]
    assert [r["name"] for r in rows] == ["mtp greedy", "mtp k=2 chain", "transformers greedy", "transformers lookup"]
    assert all(r["identical_prompts"] == 2 and r["first_divergence"] is None and r["tok_s"] > 0 for r in rows)
    assert rows[1]["tokens_per_forward"] >= 1.0
    assert proc.stderr.count("pass 2:") == len(rows)  # every row timed twice
    assert "best of 2" in proc.stdout
