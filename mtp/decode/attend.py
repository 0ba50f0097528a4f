"""Attention of a decode step's few queries over a static KV cache, on the CPU (float32).

A compiled decode step attends over the whole cache (`mtp.decode.compile`: one graph per cache
length), and inductor's code for it, written out as products and a softmax, took 110 us a layer
for the 4 queries of a k = 4 step of SmolLM2 on an AMD EPYC, against 37 us for one query (3.7 ms
of a 26 ms step): it computes every cache position, written or not, repeats the keys and values
of each group of heads for grouped-query attention and sums each score across the vector lanes.
`attend` is our kernel for it (`attend.cpp`, built with rowdot into one library): each query reads
only the positions its mask lets it see, straight from its group's cache, in a fixed order, so a
query's output does not depend on the step's other queries (a speculative step's attention equals
a greedy step's to the bit). Eager steps of up to 16 queries use it too (SDPA took 29 / 55 us a
layer for 1 / 4 queries, attend 9 / 20: `mtp.decode.cache.cached_attention`, benchmarks/attend.py).
"""

from __future__ import annotations

import torch

from mtp.decode import rowdot


@torch.compiler.assume_constant_result  # traced as its value: dynamo does not step into the cached load
def _built() -> bool:
    return rowdot.available()


def usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `attend` takes these queries and keys: float32 on the CPU, the kernels built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32 and _built()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over keys and values k, v (B, Hkv, S, hd) (head h reads group
    h // (H // Hkv)), where mask (B, 1, T, S) is True -> (B, H, T, hd), laid out (B, T, H, hd):
    as scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), up to rounding.
    A query that may see no position gets zeros."""
    if not torch.compiler.is_compiling() and not rowdot.available():  # loads the library (once)
        raise RuntimeError(f"mtp's attend kernel is not available: {rowdot.unavailable_reason()}")
    return torch.ops.mtp.attend(q, k, v, mask, q.shape[-1] ** -0.5)
