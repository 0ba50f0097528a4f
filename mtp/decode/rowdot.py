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
C++ compiler against torch's headers (`-O3 -march=native -fopenmp`, some 10 s; AVX2 + FMA or
AVX-512 needed) into $MTP_CACHE/kernels (`mtp.data.default_cache_dir`) and loaded as the operator
`torch.ops.mtp.rowdot` (a call costs some 5 us eagerly and from a compiled graph alike). `pack` and
`rowdot_packed` are the same product on the weight laid out for it (each block of 4 rows one
stream; the same numbers), which compiled decoding uses, packed once at compile time. Where it
cannot be built (`available()` False, `unavailable_reason()` says why), decoding uses the other
kernels (mtp.decode.packed chooses among them per row count).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rowdot.cpp")
# mtp's CPU kernels, built into one library: rowdot (products) and attend (mtp.decode.attend), on
# the vector operations of simd.h
SOURCES = [SOURCE, SOURCE.with_name("attend.cpp")]
HEADERS = [SOURCE.with_name("simd.h")]
MAX_ROWS = 16  # rows per pass over the weight (ROWS_MAX in rowdot.cpp); more rows take more passes
# the most rows compiled decoding multiplies on the packed layout: it takes MC rows per pass over a
# block, and on an AMD EPYC a pass over SmolLM2's weights took 13.1-15.4 ms for 1-4 rows (plain
# layout 15.5-17.0) but 22.5 for 8 (plain 18.7; benchmarks/rowdot.py)
PACKED_ROWS = 4
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _torch_flags() -> list[str]:
    """Compiler flags to build against this torch: its headers, its libraries, its C++ ABI."""
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([f"-I{p}" for p in include_paths()] + [f"-L{p}" for p in library_paths()]
            + [f"-Wl,-rpath,{p}" for p in library_paths()] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-lc10", "-ltorch_cpu"])


def _library_path() -> Path:
    from mtp.data import default_cache_dir

    sources = [p.read_text() for p in SOURCES + HEADERS]
    key = "\n".join([*sources, " ".join(FLAGS + _torch_flags()), torch.__version__, _cpu_signature()])
    return default_cache_dir() / "kernels" / f"rowdot-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compile the kernels (SOURCES) into target (written elsewhere, then renamed: concurrent builds are safe)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), *_torch_flags()],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)


@functools.cache
def _load() -> str | None:
    """Build (once per machine, some 10 s) and load the operator mtp::rowdot -> None, or why not."""
    if os.environ.get("MTP_ROWDOT", "1") == "0":
        return "turned off by MTP_ROWDOT=0"
    if not hasattr(torch.ops.mtp, "rowdot"):
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as e:
            return str(e)
        torch.library.register_fake("mtp::rowdot")(_rowdot_fake)
        torch.library.register_fake("mtp::rowdot_packed")(_rowdot_fake)
        torch.library.register_fake("mtp::rowdot_pack")(lambda w: w.new_empty(w.shape))
        torch.library.register_fake("mtp::attend")(_attend_fake)
    return None


def _rowdot_fake(x, w, b=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _attend_fake(q, k, v, mask, scale):
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H, hd).transpose(1, 2)  # laid out (B, T, H, hd), as attend.cpp returns it


def available() -> bool:
    """Whether the kernel is built (or builds now) and loads on this machine."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not available():
        raise RuntimeError(f"mtp's rowdot kernel is not available: {unavailable_reason()}")
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"rowdot takes float32 CPU tensors, not {x.dtype} on {x.device.type}")
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"rowdot: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)} do not fit")


def rowdot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,), float32 on the CPU, as F.linear but with our
    kernel (the operator torch.ops.mtp.rowdot; torch.compile calls it from its graphs)."""
    if not torch.compiler.is_compiling():  # checked once, at tracing, when compiled
        _check(x, weight, bias)
    return torch.ops.mtp.rowdot(x, weight, bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) float32 in rowdot's packed layout (the same shape; see rowdot.cpp): each block
    of 4 rows one stream, which `rowdot_packed` reads faster than the rows side by side."""
    if not torch.compiler.is_compiling():
        _check(weight[:1], weight, None)
    return torch.ops.mtp.rowdot_pack(weight)


def rowdot_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rowdot(x, weight, bias) given packed = pack(weight): the same numbers, bit for bit. Under
    torch.compile with frozen weights, `rowdot_packed(x, pack(weight))` packs once, at compile
    time (inductor folds the packing of a constant into a constant)."""
    if not torch.compiler.is_compiling():
        _check(x, packed, bias)
    return torch.ops.mtp.rowdot_packed(x, packed, bias)
