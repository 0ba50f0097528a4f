"""A cheaper heads-only step: the frozen trunk's output states cached on disk.

With the trunk (and the next-token head) frozen, their forward pass on a window is the same in
every epoch. A run with `TrainConfig.trunk_cache_windows = N` draws its batches from a fixed pool
of N training windows (a seeded permutation per epoch, `pool_indices`), and `TrunkCache` keeps,
per window, the trunk's output h (B, T, D) and, when distilling, the next-token head's hidden
output (the teacher's states), in memory-mapped files (bfloat16 by default; float16 or float32).
The first epoch computes and writes them; later epochs read them and skip the trunk and the
teacher's block. The loss then runs from the cached states (`mtp_loss_backward(trunk_out=...,
teacher_out=...)`); the teacher's logits are still computed chunk by chunk from its states.

The cache lives in MTP_CACHE/trunk/<key>, where the key hashes the frozen weights the states
depend on (embedding, trunk blocks, next-token head), the pool's tokens, the storage dtype and
whether teacher states are kept: a change to any of them gives a fresh cache.
Only a bfloat16/float16 cache rounds: the loss and gradients then differ from the uncached ones
by that storage rounding (tests/test_distill.py measures both).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mtp.errors import MTPError
from mtp.losses import teacher_states
from mtp.model import MTPTransformer

CACHE_DTYPES = {"bfloat16": (np.uint16, torch.bfloat16), "float16": (np.float16, torch.float16),
                "float32": (np.float32, torch.float32)}


def window_pool(tokens: np.ndarray, n_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """(N,) start offsets of the pool's windows of seq_len + 1 tokens, drawn once from the seed."""
    if len(tokens) <= seq_len:
        raise MTPError(f"the training split has {len(tokens)} tokens: too few for a window of {seq_len + 1}")
    rng = np.random.default_rng([seed, 0x7C0DE])
    return np.sort(rng.integers(0, len(tokens) - seq_len, size=n_windows))


def pool_indices(n_windows: int, batch_size: int, *, seed: int, step: int, micro: int = 0, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Pool indices of a micro-batch: the run walks through the pool in epochs, each in its own
    seeded order, so every window is seen once per epoch and a resumed run draws the same ones."""
    first = ((step * grad_accum + micro) * world_size + rank) * batch_size
    g = np.arange(first, first + batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(g // n_windows):
        mask = g // n_windows == epoch
        perm = np.random.default_rng([seed, 0xE90C, int(epoch)]).permutation(n_windows)
        out[mask] = perm[g[mask] % n_windows]
    return out


def pool_windows(tokens: np.ndarray, starts: np.ndarray, idx: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(idx), seq_len + 1) token rows of the pool's windows idx."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[idx]])
    return torch.from_numpy(rows)


def weights_fingerprint(model: MTPTransformer, teacher: bool) -> str:
    """sha256 of the weights the cached states depend on (about a second for SmolLM2)."""
    h = hashlib.sha256()
    mods = [("tok_embeddings", model.tok_embeddings)] + [(f"trunk.{i}", b) for i, b in enumerate(model.trunk_blocks)]
    if teacher:
        mods += [(f"head.{i}", model.head_module(i)) for i in model.graph.path_to(0) if model.head_module(i) is not None]
    for name, mod in mods:
        for pname, p in mod.state_dict().items():
            h.update(f"{name}.{pname}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrunkCache:
    """Memory-mapped trunk (and teacher) states of a pool of windows, filled on first use."""

    def __init__(self, root: str | Path, model: MTPTransformer, tokens: np.ndarray, starts: np.ndarray,
                 seq_len: int, *, teacher: bool, dtype: str = "bfloat16"):
        if dtype not in CACHE_DTYPES:
            raise MTPError(f"trunk cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
        self.np_dtype, self.torch_dtype = CACHE_DTYPES[dtype]
        self.tokens, self.starts, self.seq_len, self.teacher = tokens, starts, seq_len, teacher
        self.hits = self.misses = 0
        key = hashlib.sha256()
        key.update(json.dumps({"seq_len": seq_len, "dtype": dtype, "teacher": teacher, "dim": model.config.dim,
                               "weights": weights_fingerprint(model, teacher)}).encode())
        key.update(pool_windows(tokens, starts, np.arange(len(starts)), seq_len).numpy().tobytes())
        self.dir = Path(root) / key.hexdigest()[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        shape = (len(starts), seq_len, model.config.dim)
        self.h = self._open("h.bin", shape)
        self.t = self._open("teacher.bin", shape) if teacher else None
        self.filled = self._open("filled.bin", (len(starts),), np.uint8)

    def _open(self, name: str, shape: tuple, dtype=None) -> np.memmap:
        path = self.dir / name
        dtype = dtype or self.np_dtype
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.exists() or path.stat().st_size != nbytes:
            with open(path, "wb") as f:  # sparse: disk is used as windows are written
                f.truncate(nbytes)
            if name != "filled.bin" and (self.dir / "filled.bin").exists():
                os.remove(self.dir / "filled.bin")  # states lost: nothing counts as filled
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def _read(self, arr: np.memmap, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr[idx])).view(self.torch_dtype)

    @torch.no_grad()
    def states(self, model: MTPTransformer, idx: np.ndarray, window: torch.Tensor):
        """(h, teacher or None) of the pool's windows idx, window (B, T + 1) their tokens: read
        from the cache, computing (and writing) the windows not cached yet. Returned in the
        storage dtype, on the window's device."""
        miss = np.flatnonzero(self.filled[idx] == 0)
        self.misses += len(miss)
        self.hits += len(idx) - len(miss)
        if len(miss):
            x = window[miss][:, :-1]
            h = model.trunk(x)  # (b, T, D)
            rows = idx[miss]
            self.h[rows] = h.to(self.torch_dtype).cpu().view(_int_view(self.torch_dtype)).numpy()
            if self.t is not None:
                t = teacher_states(model, h, x)
                self.t[rows] = t.to(self.torch_dtype).cpu().view(_int_view(self.torch_dtype)).numpy()
            self.h.flush()
            if self.t is not None:
                self.t.flush()
            self.filled[rows] = 1  # only once the states are written
            self.filled.flush()
        dev = window.device
        h = self._read(self.h, idx).to(dev)
        t = self._read(self.t, idx).to(dev) if self.t is not None else None
        return h, t


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {torch.bfloat16: torch.uint16, torch.float16: torch.float16, torch.float32: torch.float32}[dtype]


__all__ = ["CACHE_DTYPES", "TrunkCache", "pool_indices", "pool_windows", "window_pool", "weights_fingerprint"]
