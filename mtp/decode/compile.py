"""Compiled decoding: how a Decoder's step functions are compiled on each device, and the
compiled decoders kept per model so that later calls reuse their graphs.

On a GPU the step functions become CUDA graphs (`mode="reduce-overhead"`), the weights graph
inputs. On a CPU they are compiled with CPU_COMPILE, the weights frozen into the compiled code as
constants, and on a model big enough for decoding to be bound by reading its weights (the models
the eager decoder packs, `mtp.decode.packed.will_pack`) in float32 with the products of a step's
2-16 rows on mtp's rowdot kernel (`mtp.decode.rowdot`; `with_rowdot`: inductor's GEMM kernels
cost 1.65-1.76x one row's time for 4 rows on an Intel Xeon, rowdot about 1.1x) and the others
with the weights prepacked by inductor into oneDNN's layout (`prepacks`; all of them in bfloat16,
or where rowdot does not build). Either way one graph per (batch, k, length): attention always
reads the whole cache.

Compiled decoders are kept per model in a weak registry (`kept_decoders`), not on the model: a
model's copies (`copy.deepcopy`, `state_dict`) carry none of them. A kept decoder is rebuilt
when its model's weights change where they were compiled in (`weights_key`).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Callable

import torch

from mtp.decode.cache import weights_key
from mtp.decode.decoder import Decoder
from mtp.decode.draft_vocab import draft_vocab_of
from mtp.decode.packed import rowdot_linears, uses_rowdot, will_pack

if TYPE_CHECKING:
    from mtp.generate import GenerationConfig
    from mtp.model import MTPTransformer

# Compiling for a CPU: inductor's C++ GEMM micro-kernels (picked per shape against MKL by timing
# both: at the few rows of a decode step they are several times faster), the weights frozen into
# the compiled code as constants (which those kernels need: they are packed once at compile time),
# and a C++ wrapper calling the kernels instead of Python. Frozen weights do not follow the model:
# a kept decoder is rebuilt when they change (weights_key). `cpp.weight_prepack` only on big
# models (`prepacks`): its oneDNN (mkldnn) weight tensors cannot be pickled, so inductor's FX graph
# cache skips such graphs and each new process compiles them from scratch (86 s for a step of the
# quickstart's model on one core); without it the graphs are cached on disk and a new process
# compiles the same step in 24 s (57 s the first time), at the same decoding speed on that small
# model (benchmarks/compile_cache.py).
CPU_COMPILE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "freezing": True, "cpp_wrapper": True,
               "cpp.weight_prepack": False,
               # quiet: no tables of autotuning timings on stderr (mtp logs what it compiles, and for how long)
               "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def compiled_max_len(max_len: int) -> int:
    """The cache length a compiled decoder gets for max_len positions: a multiple of 256, so that
    fewer shapes (graphs) exist; attention reads all of it."""
    return 256 * math.ceil(max_len / 256)


def prepacks(model: MTPTransformer, pack_weights: bool | None) -> bool:
    """Whether the CPU's compiled step has inductor prepack the weights into oneDNN's layout
    (`cpp.weight_prepack`): where the eager decoder would pack them (`--pack-weights on`, or auto
    and at least packed.MIN_BYTES of linear weights). On SmolLM2-135M with 3 heads this made a
    compiled greedy step 2.7x faster and a k = 4 step 3.6x (15.5 and 22.4 ms against 42.6 and
    81.7 ms, docs/benchmarks.md). The price: oneDNN's weight tensors cannot be pickled, so such
    graphs miss inductor's cache between processes and every new process compiles them again
    (100-140 s a step on that model). Small models, whose weights stay in cache, keep the
    cacheable plan. Never off a CPU."""
    return model.output.weight.device.type == "cpu" and will_pack(model, pack_weights)


def compile_plan(device: torch.device, prepack: bool = False) -> tuple[dict, Callable[[Callable], Callable], bool]:
    """How a decoder's step functions are compiled on this device: torch.compile's keyword
    arguments, a wrapper around each compiled function, and whether the weights are compiled in.
    GPU: CUDA graphs, the weights graph inputs. CPU: CPU_COMPILE, the weights frozen in (and,
    prepack, packed into oneDNN's layout)."""
    if device.type == "cpu":
        return dict(options={**CPU_COMPILE, "cpp.weight_prepack": prepack}), frozen, True
    return dict(mode="reduce-overhead"), (lambda fn: fn), False


def frozen(compiled: Callable) -> Callable:
    """Calls compiled (which compiles at its first call) with freezing on, where torch.compile's
    own options cannot reach: dynamo reads it while tracing, to keep parameters in the graph as
    constants instead of inputs. Scoped to these calls: elsewhere (a compiled training step's
    evaluation under no_grad) frozen weights would go stale."""
    def call(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return call


def with_rowdot(dec: Decoder, wrap: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """wrap, with each call inside `rowdot_linears(dec.model)`: the graphs are traced (and later
    called) with the model's products of 2-16 rows on mtp's rowdot kernel (mtp.decode.rowdot)."""
    model_ref = dec._model  # weakly, as the decoder holds it

    def wrap_rowdot(compiled: Callable) -> Callable:
        inner = wrap(compiled)

        def call(*args):
            with rowdot_linears(model_ref()):
                return inner(*args)
        return call
    return wrap_rowdot


def compile_steps(dec: Decoder, rowdot: bool = True) -> Decoder:
    """Compile dec's step functions (each compiles at its first call) by this device's plan: on a
    CPU, for a float32 model too big for the cache, with the products of a step's 2-16 rows on
    mtp's rowdot kernel (`uses_rowdot`; rowdot=False: on inductor's kernels, as where rowdot does
    not build) and the 1-row ones prepacked for oneDNN (without the prepacking, the graphs compile
    in about half the time and cache on disk, but a greedy step of SmolLM2 took 29-31 ms instead
    of 27-28)."""
    how, wrap, weights_in = compile_plan(dec.device, prepacks(dec.model, dec.cfg.pack_weights))
    if rowdot and uses_rowdot(dec.model, dec.cfg.pack_weights):
        wrap = with_rowdot(dec, wrap)
    dec.compiled = True  # one graph per (batch, k): attention always reads the whole cache (kv_len = max_len)
    # weights compiled in as constants (CPU): decoder_for checks that they have not changed
    dec.weights = weights_key(dec.model) if weights_in else None
    # the buffers a step writes in place keep their addresses: CUDA graphs may capture them. Not
    # where the weights are frozen in (CPU): freezing takes static-address inputs for weights too,
    # and folds in as constants those a step only reads (the rows' budgets: a kept decoder then
    # stopped every later call at its first call's budget). The stacked heads' weights are weights.
    static = [] if weights_in else [*dec.cache.buffers(), *dec.state_buffers()]
    # weights the step reads that are not the model's parameters: the stacked heads' copies, the
    # draft vocabulary's rows of the unembedding (as graph inputs they are neither frozen nor,
    # on a big model, prepacked: a k = 4 step over 8192 draft tokens cost 1.38 greedy steps
    # against 1.34 over the whole vocabulary)
    static += list(dec.stacked.buffers()) if dec.stacked is not None else []
    static += dec.draft_vocab.static_tensors() if dec.draft_vocab is not None else []
    for t in static:
        torch._dynamo.mark_static_address(t)
    dec.forward_fn = wrap(torch.compile(dec.forward, dynamic=False, **how))
    dec.greedy_step_fn = wrap(torch.compile(dec.greedy_step, dynamic=False, **how))
    dec.greedy_round_fn = wrap(torch.compile(dec.greedy_round, dynamic=False, **how))
    dec.sequential_drafts_fn = wrap(torch.compile(dec.sequential_drafts, dynamic=False, **how))
    return dec


# model -> {(k, batch, max_len, dtype, device, stack_heads): its compiled Decoder}
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept_decoders(model: MTPTransformer) -> dict[tuple, Decoder]:
    """The compiled decoders kept for model, by shape (empty if none)."""
    return _kept.get(model, {})


def release(model: MTPTransformer) -> None:
    """Forget the compiled decoders kept for model."""
    _kept.pop(model, None)


def decoder_for(model: MTPTransformer, k: int, batch: int, max_len: int, cfg: GenerationConfig) -> Decoder:
    """A decoder for a generate() call, reset for it: a new eager one, or (cfg.compile) the
    compiled one kept for this model and shape, compiled now if there is none."""
    if not cfg.compile:
        return Decoder(model, k, batch, max_len, cfg).reset(cfg)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    max_len = compiled_max_len(max_len)
    p = model.output.weight
    ids = draft_vocab_of(cfg.draft_vocab, model)
    key = (k, batch, max_len, p.dtype, p.device, cfg.stack_heads, cfg.pack_weights, None if ids is None else tuple(ids))
    # kept per model and shape, so that later calls reuse the compiled graphs (and on CUDA the
    # captured graphs, which point at the decoder's own cache buffers)
    per_model = _kept.setdefault(model, {})
    kept = per_model.get(key)
    if kept is not None and kept.weights is not None and kept.weights != weights_key(model):
        del per_model[key]  # compiled with weights that have changed since: compile again
    if key not in per_model:
        per_model[key] = compile_steps(Decoder(model, k, batch, max_len, cfg))
    return per_model[key].reset(cfg)
