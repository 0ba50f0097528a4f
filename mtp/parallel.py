"""Parallelism applied from outside the model (the torchtitan habit): `parallelize` turns a plain
MTPTransformer into the run's training model, and `Parallel` gives the one training loop the few
calls that differ between one process, data parallel (DDP) and fully sharded (FSDP2) training.

The memory-efficient loss (mtp.losses.mtp_loss_backward) does not run one backward per
micro-batch: it runs the trunk forward, then each head's forward and backward in turn, then the
trunk's backward, and it calls the model's pieces (trunk, run_head, norm, output.weight), never
`model(tokens)`. Gradients must still be reduced exactly once per optimizer step.

DDP (torchrun without --fsdp): every process holds the whole model and gradients are averaged by
hand once per optimizer step, after gradient accumulation (`mtp.distributed.all_reduce_grads`,
flat buckets). Not torch's DistributedDataParallel wrapper: its reducer is armed by the wrapped
module's forward (never called here) and fires per backward pass, i.e. n + 1 times per micro-batch.

FSDP2 (--fsdp): `fully_shard` on every trunk block and every head (one unit each) and on the root
(token embedding, final norm, unembedding: one unit). Because the loss never calls the root's
forward, the root is gathered explicitly (`model.unshard()`) for the whole step and resharded
by its own post-backward at the end. The gradient reduction is switched per backward pass
through the loss's `on_backward` hook (`Parallel.micro_batch`):
  - every micro-batch but the last: no unit reduces (`set_requires_gradient_sync(False)`);
    FSDP accumulates the unsharded gradients locally;
  - last micro-batch: just before head i's backward, only head i's unit has sync on, so head i
    reduce-scatters (accumulated gradients included) on FSDP's reduce-scatter stream while the
    next head runs; just before the trunk's backward, the trunk blocks and the root switch sync
    on and the backward is marked the last: each trunk block reduce-scatters as soon as its
    backward is done, overlapping the backward of the block below, and the root last.
So each unit reduce-scatters once per optimizer step (tests/test_parallel.py counts them).
Backward prefetch is explicit (trunk block j all-gathers block j - 1; a head prefetches nothing:
heads keep their parameters gathered from their forward to their backward, which follows at once),
because FSDP's default order-based prefetch assumes one backward per forward.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.utils.checkpoint

from mtp import distributed
from mtp.config import ModelConfig, TrainConfig
from mtp.errors import MTPError
from mtp.model import TRUNK, MTPTransformer


def apply_compile(model: MTPTransformer) -> None:
    """Compile each block in place: the loss calls the trunk and heads separately, so the blocks
    (not the whole model's forward) are the unit of compilation."""
    for block in list(model.layers) + list(model.extra_heads):
        block.compile()


def apply_activation_checkpointing(model: MTPTransformer) -> None:
    """Recompute each trunk block's activations in the backward instead of keeping them.
    Heads are left alone: a head's backward follows its forward at once, so checkpointing it
    would cost a recomputation and save no memory. The forward is wrapped in place (no wrapper
    module), so parameter names, isinstance checks and FSDP units are unchanged."""
    for block in model.trunk_blocks:
        if isinstance(block, nn.Linear) or getattr(block, "_mtp_checkpointed", False):
            continue
        inner = block.forward
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, inner, use_reentrant=False)
        block._mtp_checkpointed = True


def head_units(model: MTPTransformer) -> dict[int, nn.Module]:
    """Head index -> its module (heads without a module, the identity next-token head of linear
    heads, are left out)."""
    return {i: m for i in range(model.config.n_future) if (m := model.head_module(i)) is not None}


def check_fsdp(cfg: ModelConfig) -> None:
    """FSDP2 needs a trunk block: the root's gradients are reduced at the end of the trunk's
    backward, which must pass through at least one sharded unit."""
    if not cfg.head_graph.is_linear and cfg.n_trunk == 0:
        raise MTPError(f"--fsdp needs at least one trunk block: n_layers={cfg.n_layers} must exceed "
                       f"n_future={cfg.n_future}")


def apply_fsdp(model: MTPTransformer, dist_info: distributed.DistInfo, param_dtype: torch.dtype | None) -> None:
    """fully_shard per trunk block, per head, and on the root; bf16 (or float32) parameters in
    compute, float32 gradient reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_fsdp(model.config)
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    # inputs are not cast (the loop's autocast handles the matmuls): cast inputs would round the
    # rotary cos/sin tables to bf16
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    trunk = list(model.trunk_blocks)
    heads = head_units(model)
    for block in trunk:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for head in heads.values():  # gathered from its forward to its backward, which follows at once
        fully_shard(head, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # explicit backward prefetch (see the module docstring); a unit that lists only itself
    # prefetches nothing (an empty list would mean FSDP's default)
    for j, block in enumerate(trunk):
        block.set_modules_to_backward_prefetch([trunk[j - 1] if j > 0 else block])
    for head in heads.values():
        head.set_modules_to_backward_prefetch([head])
    # FSDP initialises lazily on the root's first forward, which the memory-efficient loss
    # never calls: run one tiny no-grad forward through every head now (each unit must have
    # been gathered once before FSDP's end-of-backward callback visits it), then shard the
    # root again
    with torch.no_grad():
        T = min(model.config.max_seq_len, model.config.n_future + 1)  # sequential heads read t + i
        model(torch.zeros(1, T, dtype=torch.long, device=dist_info.device), return_all_heads=True)
    for unit in [model, *heads.values()]:  # these stay gathered after a forward
        unit.reshard()


class Parallel:
    """What the training loop calls, the same way for one process, DDP and FSDP2:

        par = parallelize(model, dist_info, tcfg)
        for micro in range(k):
            with par.micro_batch(last=micro == k - 1) as on_backward:
                mtp_loss_backward(model, batch, weights, on_backward=on_backward)
        par.reduce_grads()              # DDP: the one all-reduce; FSDP2: already reduce-scattered
        norm = par.clip_grad_norm(max_norm)
    """

    def __init__(self, model: MTPTransformer, dist_info: distributed.DistInfo, fsdp: bool, naive: bool = False):
        self.model, self.dist_info, self.naive = model, dist_info, naive
        self.world_size = dist_info.world_size
        self.mode = "fsdp" if fsdp and self.world_size > 1 else ("ddp" if self.world_size > 1 else "single")
        self.fsdp = self.mode == "fsdp"
        if self.fsdp:
            self.trunk = list(model.trunk_blocks)
            self.heads = head_units(model)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    # ---- one micro-batch ---------------------------------------------------------------
    @contextmanager
    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward; yields the loss's on_backward hook
        (None outside FSDP2). With the naive loss (one backward through model(tokens)) the
        units simply sync on the last micro-batch."""
        if not self.fsdp:
            yield None
            return
        model = self.model
        if self.naive:
            model.set_requires_gradient_sync(last)
            model.set_is_last_backward(True)
            model.set_reshard_after_backward(True, recurse=False)
            yield None
            return
        model.unshard()  # the root's embedding, norm and unembedding, for the whole step
        model.set_requires_gradient_sync(False)  # every unit
        model.set_reshard_after_backward(False, recurse=False)  # the root stays gathered
        model.set_is_last_backward(False)  # keep FSDP's state across the partial backwards

        def on_backward(i: int) -> None:
            if not last:
                return
            for j, head in self.heads.items():  # only the head whose backward runs now
                head.set_requires_gradient_sync(j == i, recurse=False)
            if i == TRUNK:
                for block in self.trunk:
                    block.set_requires_gradient_sync(True, recurse=False)
                model.set_requires_gradient_sync(True, recurse=False)
                model.set_reshard_after_backward(True, recurse=False)
                model.set_is_last_backward(True)

        yield on_backward

    def reduce_grads(self) -> int:
        """After the last micro-batch: DDP averages every gradient in one pass of flat buckets
        (returns the number of all-reduces); FSDP2 has already reduce-scattered them."""
        if self.mode == "ddp":
            return distributed.all_reduce_grads(self.params, self.world_size)
        return 0

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all shards); returns the norm before clipping."""
        params = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def gathered(self):
        """Context in which the model's pieces can be called outside the loss (evaluation): the
        root's parameters gathered under FSDP2; nothing to do otherwise."""
        return _gathered(self.model) if self.fsdp else nullcontext()

    # ---- checkpoints: full, name-keyed state, the same whatever the world size ---------
    def full_state(self, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict keyed by parameter name), complete on rank 0.
        Under FSDP2 the shards are gathered to rank 0's CPU (a collective: every rank calls it)."""
        if not self.fsdp:
            return self.model.state_dict(), named_optimizer_state(self.model, opt)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, opt, options=opts))

    def load_full_state(self, opt: torch.optim.Optimizer, model_state: dict | None, optim_state: dict) -> None:
        """Load a state written by `full_state` under any world size and mode. Under FSDP2,
        model_state is the full state dict read on rank 0 (None elsewhere) and is broadcast and
        sharded; outside FSDP2 every rank has built its model from the checkpoint already."""
        if optim_state["state"] and all(isinstance(k, int) for k in optim_state["state"]):
            optim_state = named_optimizer_state(self.model, opt, optim_state)  # older checkpoints
        if not self.fsdp:
            load_named_optimizer_state(self.model, opt, optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        main = self.dist_info.is_main
        set_model_state_dict(self.model, model_state if main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # strict=False: a head with zero loss weight never gets optimizer state
        set_optimizer_state_dict(self.model, opt, optim_state if main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                          strict=False))


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def named_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict | None = None) -> dict:
    """opt.state_dict() (or `sd`, laid out like it) keyed by parameter name instead of position:
    the layout torch.distributed.checkpoint's full optimizer state dict uses, which does not
    depend on how parameters are sharded."""
    sd = opt.state_dict() if sd is None else sd
    flat = [n for group in _optimizer_names(model, opt) for n in group]
    return {"state": {flat[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_named_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    groups = _optimizer_names(model, opt)
    if len(groups) != len(sd["param_groups"]) or any(
            set(cur) != set(g["params"]) for cur, g in zip(groups, sd["param_groups"])):
        raise MTPError("the checkpoint's optimizer state does not match the model's parameters")
    index = {n: i for i, n in enumerate(n for group in groups for n in group)}
    opt.load_state_dict({
        "state": {index[n]: v for n, v in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in cur]} for g, cur in zip(sd["param_groups"], groups)],
    })


@contextmanager
def _gathered(model):
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def parallelize(model: MTPTransformer, dist_info: distributed.DistInfo, tcfg: TrainConfig) -> Parallel:
    """Apply the run's parallelism to `model` in place, from outside it: activation checkpointing
    (tcfg.activation_checkpointing), FSDP2 (tcfg.fsdp under torchrun), compilation
    (tcfg.compile). Call after every rank holds the same weights and before making the
    optimizer (FSDP2 replaces the parameters by their shards)."""
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    par = Parallel(model, dist_info, tcfg.fsdp, naive=not tcfg.memory_efficient)
    if par.fsdp:
        # parameters in compute: bf16 where the loop runs bf16 autocast, else float32 (None)
        bf16 = distributed.resolve_dtype(dist_info.device, tcfg.dtype) == torch.bfloat16
        apply_fsdp(model, dist_info, torch.bfloat16 if bf16 else None)
    if tcfg.compile:
        apply_compile(model)
    return par

