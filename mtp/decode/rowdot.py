"""Matrix products of a decode step's few rows that cost little more than one row (CPU, float32).

A decode step verifies k tokens in one forward pass: each linear layer multiplies k rows by a
weight that must stream from memory, so a k-token step should cost about as much as a 1-token one.
BLAS kernels do not behave so on every CPU: on an Intel Xeon (Sapphire Rapids) MKL's product of 4
rows by SmolLM2's 576 x 49152 unembedding took 2x its 1-row product, oneDNN's packed one is slow
at 1 row, and inductor's C++ GEMM template costs 1.65-1.76x for 4 rows (docs/benchmarks.md).

`rowdot(x, w, b)` is our own kernel for such products (`rowdot.cpp`): it reads each weight row
once for up to 16 rows of x, keeps every row's accumulators in registers and prefetches the weight
ahead, so it stays bound by memory for 1-16 rows. Each output is one dot product summed in a fixed
order, so a row's result does not depend on the other rows: verifying k tokens gives, bit for bit,
what k greedy steps would (tested). It is compiled once per machine at first use with the system's
C++ compiler (`-O3 -march=native -fopenmp`, about 2 s; AVX2 + FMA or AVX-512 needed) into
$MTP_CACHE/kernels (`mtp.data.default_cache_dir`), and called through ctypes as the custom op
`mtp::rowdot`. Where it cannot be built (`available()` False, `unavailable_reason()` says why),
decoding uses the other kernels (mtp.decode.packed chooses among them per row count).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rowdot.cpp")
MAX_ROWS = 16  # rows per pass over the weight (ROWS_MAX in rowdot.cpp); more rows take more passes
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _library_path() -> Path:
    from mtp.data import default_cache_dir

    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), _cpu_signature()]).encode()).hexdigest()
    return default_cache_dir() / "kernels" / f"rowdot-{key[:16]}.so"


def _build(target: Path) -> None:
    """Compile rowdot.cpp into target (written elsewhere, then renamed: concurrent builds are safe)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it is not available)."""
    if os.environ.get("MTP_ROWDOT", "1") == "0":
        return None, "turned off by MTP_ROWDOT=0"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        return None, str(e)
    p, i64 = ctypes.c_void_p, ctypes.c_long
    lib.rowdot.argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.rowdot.restype = None
    return lib, None


def available() -> bool:
    """Whether the kernel is built (or builds now) and loads on this machine."""
    return _library()[0] is not None


def unavailable_reason() -> str | None:
    return _library()[1]


def rowdot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,), float32 on the CPU, as F.linear but with our
    kernel. Eagerly a direct call (the custom op's dispatch costs some 15 us a call, a tenth of a
    SmolLM2 product); traced by torch.compile, the custom op `mtp::rowdot`."""
    if torch.compiler.is_compiling():
        return rowdot_op(x, weight, bias)
    return _rowdot(x, weight, bias)


def _rowdot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"mtp's rowdot kernel is not available: {unavailable_reason()}")
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"rowdot takes float32 CPU tensors, not {x.dtype} on {x.device.type}")
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"rowdot: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)} do not fit")
    rows = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0]:
        lib.rowdot(rows.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                   rows.shape[0], k, n, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("mtp::rowdot", mutates_args=())
def rowdot_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _rowdot(x, weight, bias)


@rowdot_op.register_fake
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
