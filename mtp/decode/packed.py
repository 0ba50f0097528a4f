"""CPU decoding with prepacked linear weights (oneDNN), or mtp's rowdot kernel, per row count.

On a CPU, `F.linear` on a few rows re-packs the whole weight matrix into the GEMM kernel's
blocked layout on every call (one row takes a matrix-vector path that does not). A model whose
weights do not fit in cache is bound by memory traffic when decoding, so a 2-token forward pass
then costs about twice a 1-token one, and speculative decoding, which verifies k tokens per pass,
cannot pay off. Packing every weight once, into oneDNN's layout, removes that: the products then
cost nearly the same for 1 to 8 rows, and the 1-row product is faster too
(benchmarks/decode_step.py measures it; docs/benchmarks.md has the figures).

Packing pays where decoding is bound by reading the weights; where they fit in the CPU's cache
(the quickstart's 2.8M-parameter model), oneDNN's higher cost per call makes it slower. So by
default (`worth_packing`) only models with at least 64 MiB of linear weights are packed.

Which kernel wins also depends on the CPU and the number of rows: on an AMD EPYC (AVX2) packed
products made a 1-token step 1.8x faster; on an Intel Xeon with AVX-512 `F.linear`'s 1-row path
was faster, and for 2-16 rows (a speculative step's) neither library kernel stays bound by memory,
where mtp's own `rowdot` kernel (mtp.decode.rowdot, float32) does. So by default
(`packed_linears(model, measured=True)`) each product takes the kernel that made the model's
forward pass fastest on this machine at its number of rows: F.linear, the packed product or rowdot
(timed once per process: `_measure`). `--pack-weights on` packs every product.

`packed_linears(model)` is a context in which the model's `nn.Linear` layers compute with packed
copies of their weights. The copies are kept for the model between calls (one more copy of the
linear weights in memory; in a weak registry, not on the model, so they go when it goes) and
re-made when a weight changes (in-place updates bump its version); `release(model)` drops them.
Results equal `F.linear`'s up to float rounding (another kernel).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp.decode import rowdot
from mtp.errors import MTPError

# module -> {name of a linear layer: (its weight's _key, the weight, the packed copy)}
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and hasattr(
        ops, "_linear_pointwise")


@functools.cache
def dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU, asked of oneDNN itself by packing a
    small weight once: bfloat16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which many AVX2-only
    CPUs (AMD EPYC before Zen 4, Intel before Ice Lake) lack."""
    if dtype not in DTYPES or not available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


def applies(model: nn.Module) -> bool:
    """Packing applies to models on the CPU in float32 or bfloat16 (where this CPU packs it), on
    builds that have oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and dtype_supported(p.dtype)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why packing cannot apply to this model here (None where it can)."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"weights are on {p.device.type}, packing is for the CPU"
    if p.dtype not in DTYPES:
        return f"weights are {str(p.dtype).removeprefix('torch.')}, packing takes float32 or bfloat16"
    if not available():
        return "this torch build has no oneDNN packed linear ops"
    if not dtype_supported(p.dtype):
        return (f"this CPU's oneDNN cannot pack {str(p.dtype).removeprefix('torch.')} weights "
                "(it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
    return None


MIN_BYTES = 64 * 2**20


def _linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)


def worth_packing(model: nn.Module) -> bool:
    """Packing applies and the linear weights are too big to stay in cache (>= MIN_BYTES)."""
    return applies(model) and _linear_bytes(model) >= MIN_BYTES


def will_pack(model: nn.Module, pack_weights: bool | None, compiled: bool = False) -> bool:
    """Whether decoding packs: not compiled (inductor packs weights itself when freezing),
    applicable, and asked for (None: when the linear weights take at least MIN_BYTES). Asked for
    (True) where it cannot apply on this machine: MTPError naming why."""
    if compiled:
        return False
    if not applies(model):
        if pack_weights and (why := unsupported_reason(model)):
            raise MTPError(f"--pack-weights on: {why}; use --pack-weights auto or off")
        return False
    return pack_weights if pack_weights is not None else _linear_bytes(model) >= MIN_BYTES


def packing(model: nn.Module, pack_weights: bool | None, compiled: bool = False):
    """The context a decoding loop runs in: `packed_linears` where decoding packs (`will_pack`,
    which refuses `on` where packing cannot apply, at this call), measured when packing is auto
    (None); else a context that does nothing."""
    if not will_pack(model, pack_weights, compiled):
        return contextlib.nullcontext()
    return packed_linears(model, measured=pack_weights is None)


def _key(w: torch.Tensor):
    # its storage and its in-place updates (the cache also holds the tensor, to tell a replacement)
    return w.data_ptr(), w._version, w.dtype, tuple(w.shape)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _product(policy: "Policy", x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias with the kernel `policy` gives this many rows ("packed" needs `packed`)."""
    kernel = policy.kernel(x.numel() // x.shape[-1])
    if kernel == "packed":
        return packed_matmul(x, packed, bias)
    if kernel == "rowdot":
        return rowdot.rowdot(x, weight, bias)
    return F.linear(x, weight, bias)


def _forward(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, policy: "Policy"):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _product(policy, x, weight, bias, packed)
    forward.policy = policy
    return forward


def kernel_of(module: nn.Module, rows: int) -> str:
    """The kernel a linear layer computes a product of `rows` rows with: its policy's where it is
    swapped (within `packed_linears`), else "linear"."""
    policy = getattr(module.__dict__.get("forward"), "policy", None)
    return "linear" if policy is None else policy.kernel(rows)


ROWS = (1, 2, 4, 8, 16, 32)  # the row counts measured; a count between two takes the larger's kernel


class Policy:
    """Which kernel each swapped layer computes with, by the number of rows it multiplies: one
    kernel everywhere (`fixed`), or the kernel measured fastest for each count in ROWS."""

    def __init__(self, fixed: str | None = "packed", by_rows: dict[int, str] | None = None):
        self.fixed, self.by_rows = fixed, by_rows or {}

    def kernel(self, rows: int) -> str:
        if self.fixed is not None:
            return self.fixed
        for r in ROWS:
            if rows <= r and r in self.by_rows:
                return self.by_rows[r]
        return self.by_rows.get(max(self.by_rows, default=0), "linear")


def candidates(model: nn.Module, rows: int) -> tuple[str, ...]:
    """The kernels a product of `rows` rows may take on this model here: F.linear, oneDNN's packed
    product and (float32, at most rowdot.MAX_ROWS rows, where it builds) mtp's rowdot kernel."""
    fits = next(model.parameters()).dtype == torch.float32 and rows <= rowdot.MAX_ROWS
    return ("linear", "packed") + (("rowdot",) if fits and rowdot.available() else ())


# (the model's linear shapes, dtype, threads) -> {rows: the kernel measured fastest}
_chosen: dict[tuple, dict[int, str]] = {}


def _model_key(model: nn.Module) -> tuple:
    shapes = tuple(sorted({tuple(m.weight.shape) for m in model.modules() if type(m) is nn.Linear}))
    return shapes, next(model.parameters()).dtype, torch.get_num_threads()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(model: nn.Module, policy: Policy, rounds: int = 2) -> dict[int, str]:
    """Time the model's forward pass on 1, 2, 4, ... 32 tokens with every product on each
    candidate kernel (interleaved, the best of `rounds` each) -> {rows: the fastest kernel}.
    Whole passes, so that the weights are read from memory as decoding reads them (a product timed
    alone finds them in cache)."""
    device = next(model.parameters()).device
    chosen = {}
    for rows in ROWS:
        tokens = torch.zeros((1, rows), dtype=torch.long, device=device)
        best = dict.fromkeys(candidates(model, rows), math.inf)
        for r in range(rounds + 1):  # round 0 warms up
            for kernel in best:
                policy.fixed = kernel
                t = _time(lambda: model(tokens))
                if r:
                    best[kernel] = min(best[kernel], t)
        chosen[rows] = min(best, key=best.get)
    policy.fixed = None
    return chosen


def measured_kernels(model: nn.Module) -> dict[int, str] | None:
    """{rows: kernel} this model's products take here when measured (None: not measured yet)."""
    return _chosen.get(_model_key(model))


@contextlib.contextmanager
def packed_linears(model: nn.Module, measured: bool = False, kernel: str = "packed") -> Iterator[int]:
    """Within the block, every nn.Linear of `model` computes with `kernel` ("packed": a packed
    copy of its weight; "rowdot"; "linear") at every row count, or (measured) with the kernel
    that made the model's forward pass fastest on this machine at that row count (measured once
    per process for a model's shapes, dtype and threads: a few seconds for SmolLM2-135M). Yields
    how many layers were swapped (0 where packing does not apply)."""
    if not applies(model):
        yield 0
        return
    cache: dict[str, tuple] = _packed_weights.setdefault(model, {})
    swapped = []
    policy = Policy(kernel)  # read by every swapped layer at each call
    try:
        with torch.no_grad():
            for name, mod in model.named_modules():
                if type(mod) is not nn.Linear or "forward" in mod.__dict__:
                    continue
                key = _key(mod.weight)
                if name not in cache or cache[name][0] != key or cache[name][1] is not mod.weight:
                    cache[name] = (key, mod.weight, torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), None))
                bias = None if mod.bias is None else mod.bias.detach()
                # an instance attribute shadows the method
                mod.forward = _forward(mod.weight.detach(), cache[name][2], bias, policy)
                swapped.append(mod)
            if measured and swapped:
                key = _model_key(model)
                if key not in _chosen:
                    _chosen[key] = _measure(model, policy)
                policy.fixed, policy.by_rows = None, _chosen[key]
        yield len(swapped)
    finally:
        for mod in swapped:
            del mod.forward


# compiled decoding's kernels: rowdot for 2 to rowdot.MAX_ROWS rows; inductor's own for 1 row (its C++
# GEMM template: on SmolLM2 a compiled greedy step took 27.3 ms with it, 31.9 with rowdot, whose
# calls from the graph cost some 8 us each) and for more rows (a prefill)
COMPILED_ROWDOT = Policy(None, {**{r: "rowdot" for r in ROWS if 1 < r <= rowdot.MAX_ROWS}, 1: "linear",
                                max(ROWS): "linear"})
# nn.Linear -> its forward under COMPILED_ROWDOT, built once per layer rather than at every step
_rowdot_forwards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rowdot_forward(mod: nn.Linear):
    ref = weakref.ref(mod)  # not the module: the registry's values must not keep its keys alive

    def forward(x: torch.Tensor) -> torch.Tensor:
        m = ref()
        rows = x.numel() // x.shape[-1]
        if COMPILED_ROWDOT.kernel(rows) != "rowdot":
            return F.linear(x, m.weight, m.bias)
        if rows <= rowdot.PACKED_ROWS:
            # the weight in rowdot's packed layout (a block of rows one stream: a compiled k = 4
            # step of SmolLM2 with heads took 22.8 ms against 24.5 on an AMD EPYC, side by side),
            # packed at each call: in a compiled step with frozen weights once, at compile time
            # (inductor folds pack(constant) into a constant)
            return rowdot.rowdot_packed(x, rowdot.pack(m.weight), m.bias)
        return rowdot.rowdot(x, m.weight, m.bias)
    forward.policy = COMPILED_ROWDOT
    return forward


def uses_rowdot(model: nn.Module, pack_weights: bool | None) -> bool:
    """Whether compiled CPU decoding computes the model's products of 2 to rowdot.MAX_ROWS rows
    with rowdot (`rowdot_linears`) instead of inductor's kernels: float32, where the eager decoder
    would pack (a model too big for the cache, or --pack-weights on), and rowdot builds here."""
    return (next(model.parameters()).dtype == torch.float32 and will_pack(model, pack_weights)
            and rowdot.available())


@contextlib.contextmanager
def rowdot_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, every nn.Linear of `model` computes products of 2 to rowdot.MAX_ROWS rows
    with rowdot (F.linear beyond; 1 row too: see COMPILED_ROWDOT), reading its weight at each call:
    compiled step functions are traced and called within it (`mtp.decode.compile`)."""
    # entered at every compiled step: the forwards go straight into the layers' __dict__, not
    # through nn.Module.__setattr__ / __delattr__ (0.75 ms a step on SmolLM2's 232 layers; 0.25 now)
    swapped = []
    try:
        for mod in model.modules():
            if type(mod) is nn.Linear and "forward" not in mod.__dict__:
                forward = _rowdot_forwards.get(mod)
                if forward is None:
                    forward = _rowdot_forwards[mod] = _rowdot_forward(mod)
                mod.__dict__["forward"] = forward
                swapped.append(mod)
        yield
    finally:
        for mod in swapped:
            mod.__dict__.pop("forward", None)


def release(model: nn.Module) -> None:
    """Drop the packed copies kept for the model."""
    _packed_weights.pop(model, None)
