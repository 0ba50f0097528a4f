"""The training loop: one flat loop for CPU, one GPU and N processes under torchrun.

Run directory layout (OUT):
  checkpoint/       the latest checkpoint (see mtp.checkpoint), saved atomically
  metrics.jsonl     one JSON object per logged step ("train") or evaluation ("eval")
  run.json          the resolved model and training configs

Fine-tuning is the same loop: TrainConfig.init_from starts from a checkpoint's weights and
tokenizer (heads added or removed by mtp.finetune), freeze="trunk" trains only the extra heads,
and extra_weight / extra_weight_warmup schedule the extra heads' loss weight.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mtp import distributed
from mtp.checkpoint import (has_checkpoint, inspect_checkpoint, load_checkpoint, load_trainer_state, read_meta,
                            save_checkpoint)
from mtp.config import ModelConfig, TrainConfig
from mtp.data import build_token_data, check_tokens, default_cache_dir, eval_batches, sample_batch
from mtp.errors import MTPError
from mtp.fileio import atomic_write, check_writable
from mtp.finetune import apply_freeze, check_freeze, init_model
from mtp.losses import Distill, head_metrics, mtp_loss_backward, naive_loss, parse_loss_weights
from mtp.model import MTPTransformer
from mtp.parallel import apply_compile, parallelize  # noqa: F401  (apply_compile: public here too)
from mtp.tokenizers import check_vocab, get_tokenizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms), over the parameters that train
    (frozen ones, requires_grad False, are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def loss_weights_at(step: int, base: list[float], cfg: TrainConfig) -> list[float]:
    """The heads' loss weights used at `step`: the extra heads' base weights times
    lambda = extra_weight, ramped linearly from 0 over extra_weight_warmup steps. With a frozen
    trunk the next-token head's weight is 0: its loss cannot change, so it is not computed."""
    ramp = min(1.0, step / cfg.extra_weight_warmup) if cfg.extra_weight_warmup else 1.0
    lam = cfg.extra_weight * ramp
    weights = [base[0]] + [w * lam for w in base[1:]]
    if cfg.freeze == "trunk":
        weights[0] = 0.0
    return weights


def autocast_for(device: torch.device, dtype: str):
    """(context, compute dtype): bf16 autocast on CUDA by default, float32 elsewhere."""
    if distributed.resolve_dtype(device, dtype) != torch.bfloat16:
        return nullcontext(), None
    return torch.autocast(device.type, dtype=torch.bfloat16), torch.bfloat16


def load_data(tcfg: TrainConfig, tokenizer, progress: bool):
    """The corpus's token shards; a corpus too small to hold out one window by document gets
    a split that guarantees one (a separate cache entry, so other runs keep theirs)."""
    data = build_token_data(tcfg.corpus, tokenizer, default_cache_dir(), tcfg.val_fraction, progress=progress)
    if len(data.val) <= tcfg.seq_len:
        data = build_token_data(tcfg.corpus, tokenizer, default_cache_dir(), tcfg.val_fraction,
                                min_val_tokens=tcfg.seq_len + 1, progress=progress)
    return data


@torch.no_grad()
def evaluate(model: MTPTransformer, tokens, cfg: TrainConfig, device: torch.device,
             rank: int = 0, world_size: int = 1) -> dict:
    """Held-out loss and top-1 accuracy of every head. Under torchrun each process evaluates its
    slice of the same global batches (as in training) and the sums are added over processes, so
    the figures do not depend on the number of processes."""
    was_training = model.training
    model.eval()
    ctx, _ = autocast_for(device, cfg.dtype)
    n = model.config.n_future
    totals = {k: torch.zeros(n, dtype=torch.float64) for k in ("ce_sum", "correct", "count")}
    with ctx:
        for batch in eval_batches(tokens, cfg.batch_size * world_size, cfg.seq_len, cfg.eval_batches):
            mine = batch[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            if len(mine):
                m = head_metrics(model, mine.to(device), chunk=cfg.ce_chunk)
                totals = {k: totals[k] + m[k] for k in m}
    model.train(was_training)
    if world_size > 1:
        flat = torch.cat([totals[k] for k in ("ce_sum", "correct", "count")]).to(device)
        torch.distributed.all_reduce(flat)
        totals = dict(zip(("ce_sum", "correct", "count"), flat.cpu().split(n)))
    count = totals["count"].clamp(min=1)
    return {
        "loss": (totals["ce_sum"] / count).tolist(),
        "acc": (totals["correct"] / count).tolist(),
        "tokens": int(totals["count"][0]),
    }


def _rewrite_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop metrics logged after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= keep_through_step:
                kept.append(ln)
        except ValueError:  # a line torn by a crash in the middle of a write
            continue
    atomic_write(path, (ln + "\n" for ln in kept))


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_eval: dict
    tokens_per_s: float
    train_loss: list[float]  # last logged per-head training loss
    model: MTPTransformer


def check_out(out: str | Path, resume: bool, overwrite: bool) -> bool:
    """The run directory against --resume / --overwrite, before anything is read or written
    (mtp train, mtp finetune). Returns whether it holds a checkpoint."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MTPError(f"--out {out} is a file, not a directory")
    check_writable(out, "--out", directory=True)  # before any work, not after it
    exists = has_checkpoint(out)
    if resume and overwrite:
        raise MTPError("--resume and --overwrite cannot be combined")
    if resume and not exists:
        raise MTPError(f"--resume: {out} holds no checkpoint to resume from")
    if exists and not resume and not overwrite:
        raise MTPError(f"{out} already holds a checkpoint: pass --resume to continue it or --overwrite to replace it")
    return exists


def prepare_run(tcfg: TrainConfig, mcfg: ModelConfig | None, resume: bool, overwrite: bool):
    """Check the output directory against --resume / --overwrite before anything is written.
    Returns (model config, trainer state or None)."""
    out = Path(tcfg.out)
    check_out(out, resume, overwrite)
    if not resume:
        return mcfg, None
    meta = read_meta(out)
    if mcfg is not None and mcfg.to_dict() != meta["model"].to_dict():
        saved = meta["model"].to_dict()
        diff = [f"{k} {saved.get(k)} -> {v}" for k, v in mcfg.to_dict().items() if saved.get(k) != v]
        raise MTPError(f"--resume with a different model config than {out}: {', '.join(diff)}")
    state = load_trainer_state(out)
    if tcfg.steps <= int(state["step"]):
        raise MTPError(f"--resume: {out} is already at step {state['step']}; ask for more --steps than that")
    return meta["model"], state


@dataclass
class _Run:
    """What the set-up gives the loop: the model and its wrapper, the optimizer, the data and
    where the run writes."""
    tcfg: TrainConfig
    dist: distributed.DistInfo
    out: Path
    model: MTPTransformer
    tokenizer: object
    par: object  # mtp.parallel.Parallel
    opt: torch.optim.Optimizer
    data: object  # mtp.data.TokenData
    start: int  # the first step to run (the checkpoint's, when resuming)
    base_weights: list[float]
    distill: Distill | None
    trunk_cache: object | None  # mtp.distill.TrunkCache
    pool_starts: object | None
    in_update: bool = False  # inside opt.step(): an interrupt then must not save
    completed: int = 0  # steps whose update is done

    @property
    def tokens_per_step(self) -> int:
        t = self.tcfg
        return t.batch_size * t.seq_len * t.grad_accum * self.dist.world_size

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, step: int) -> None:
        """Full weights and a name-keyed optimizer state (gathered to rank 0 under FSDP2), so a
        checkpoint resumes under any world size, sharded or not."""
        model_sd, optim_sd = self.par.full_state(self.opt)
        if self.dist.is_main:
            trainer_state = {"optimizer": optim_sd, "step": step, "rng": torch.get_rng_state()}
            save_checkpoint(self.out / "checkpoint", self.model, self.tokenizer, trainer_state=trainer_state,
                            train_config=self.tcfg.to_dict(), step=step, state_dict=model_sd)

    def evaluate(self) -> dict:
        with self.par.gathered():
            return evaluate(self.model, self.data.val, self.tcfg, self.dist.device, self.dist.rank,
                            self.dist.world_size)


def _model_and_tokenizer(tcfg: TrainConfig, mcfg: ModelConfig | None, resume: bool, sharded: bool,
                         dist_info: distributed.DistInfo):
    """(model or None: built after the data, model config, tokenizer, full weights to load or
    None): fine-tuning starts from a checkpoint's weights, --resume from the run's own."""
    device, model, model_state = dist_info.device, None, None
    if tcfg.init_from is not None and not resume:  # fine-tuning: weights and tokenizer from a checkpoint
        if tcfg.tokenizer is not None:
            raise MTPError(f"the tokenizer comes from {tcfg.init_from}: do not give one")
        torch.manual_seed(tcfg.seed)  # parameters without a pretrained counterpart start from the seed
        model, tokenizer = init_model(tcfg, "cpu")
        if mcfg is not None and mcfg.to_dict() != model.config.to_dict():
            raise MTPError(f"the model config given differs from the one fine-tuning {tcfg.init_from} gives: "
                           "leave it out")
        check_freeze(model.config, tcfg.freeze)
        return model, model.config, tokenizer, None
    if mcfg is None:
        raise MTPError("no model config given")
    check_freeze(mcfg, tcfg.freeze)
    if resume and sharded:  # rank 0 reads the weights; they are broadcast once the model is sharded
        _, tokenizer, _ = inspect_checkpoint(tcfg.out)  # every rank checks the file before any collective
        if dist_info.is_main:
            model_state = load_checkpoint(tcfg.out, "cpu")[0].state_dict()
    elif resume:
        model, tokenizer, _ = load_checkpoint(tcfg.out, device)
    else:
        tokenizer = get_tokenizer(tcfg.tokenizer)
        check_vocab(tokenizer, mcfg.vocab_size, "the model config")
    return model, mcfg, tokenizer, model_state


def setup(tcfg: TrainConfig, mcfg: ModelConfig | None, resume: bool, overwrite: bool, progress: bool) -> _Run:
    """Set-up and resume: the checks, the model (fresh, fine-tuned from a checkpoint or resumed),
    the data, the parallel wrapper and the optimizer, and the run directory."""
    dist_info = distributed.setup(tcfg.device)
    device, main = dist_info.device, dist_info.is_main
    out = Path(tcfg.out)
    mcfg, state = prepare_run(tcfg, mcfg, resume, overwrite)
    sharded = tcfg.fsdp and dist_info.world_size > 1
    if tcfg.freeze != "none" and sharded:
        raise MTPError("a frozen trunk is not supported with --fsdp: use data parallel (no --fsdp)")
    model, mcfg, tokenizer, model_state = _model_and_tokenizer(tcfg, mcfg, resume, sharded, dist_info)
    if tcfg.seq_len > mcfg.max_seq_len:
        raise MTPError(f"seq_len {tcfg.seq_len} exceeds the model's context max_seq_len {mcfg.max_seq_len}")
    if mcfg.head_offsets[-1] > tcfg.seq_len:
        raise MTPError(f"the head predicting offset {mcfg.head_offsets[-1]} would never see a target: "
                       f"use a seq_len of at least {mcfg.head_offsets[-1]} (got {tcfg.seq_len})")
    base_weights = parse_loss_weights(tcfg.loss_weights, mcfg.n_future)

    # data: tokenised once into the cache (rank 0 first, the others then open it)
    if main:
        data = load_data(tcfg, tokenizer, progress)
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    if not main:
        data = load_data(tcfg, tokenizer, False)
    check_tokens(data.train, tcfg.seq_len, "training split")
    check_tokens(data.val, tcfg.seq_len, "held-out split")

    torch.manual_seed(tcfg.seed)
    if model is None:
        model = MTPTransformer(mcfg)
    model = model.to(device)
    distributed.broadcast_params(model)
    apply_freeze(model, tcfg.freeze)  # before the optimizer: frozen parameters are left out of it
    # activation checkpointing, FSDP2, compilation: applied from outside the model
    par = parallelize(model, dist_info, tcfg)
    opt = make_optimizer(model, tcfg)
    start = 0
    if state is not None:
        par.load_full_state(opt, model_state, state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
    del model_state
    distill = Distill(tcfg.distill_weight, tcfg.distill_temperature) if tcfg.distill else None
    trunk_cache = pool_starts = None
    if tcfg.trunk_cache_windows:  # a fixed pool of windows whose frozen trunk states are cached
        from mtp.distill import TrunkCache, window_pool

        if dist_info.world_size > 1:
            raise MTPError("the trunk cache runs in one process only: drop --nproc or the cache")
        pool_starts = window_pool(data.train, tcfg.trunk_cache_windows, tcfg.seq_len, tcfg.seed)
        trunk_cache = TrunkCache(default_cache_dir() / "trunk", model, data.train, pool_starts, tcfg.seq_len,
                                 teacher=distill is not None, dtype=tcfg.trunk_cache_dtype)
    run = _Run(tcfg, dist_info, out, model, tokenizer, par, opt, data, start, base_weights, distill,
               trunk_cache, pool_starts)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:  # the old checkpoint stays until the new run saves over it
            run.metrics.unlink(missing_ok=True)
        _rewrite_metrics(run.metrics, start)
        atomic_write(out / "run.json", [json.dumps({"model": mcfg.to_dict(), "train": tcfg.to_dict(),
                                                    "world_size": dist_info.world_size}, indent=2) + "\n"])
    return run


@dataclass
class StepResult:
    """One optimizer step's figures, averaged over its micro-batches (and processes)."""
    lr: float
    weights: list[float]  # the heads' loss weights at this step
    loss: float
    per_head: list[float]
    grad_norm: float
    per_head_kl: list[float] | None  # distilling
    grad_cosine: list[float] | None  # n x n, flattened (log steps with --log-grad-cosine)


def train_step(run: _Run, step: int, log_step: bool) -> StepResult:
    """One optimizer step: grad_accum micro-batches forward and backward, the gradients reduced
    and clipped, then the update."""
    tcfg, dist_info, model, par, opt = run.tcfg, run.dist, run.model, run.par, run.opt
    device, n = dist_info.device, model.config.n_future
    ctx, compute_dtype = autocast_for(device, tcfg.dtype)
    lr = lr_at(step, tcfg)
    for group in opt.param_groups:
        group["lr"] = lr
    weights = loss_weights_at(step, run.base_weights, tcfg)
    total, per_head = 0.0, [0.0] * n
    cosine = None  # the heads' gradient cosines, summed over micro-batches (log steps only)
    per_kl = None  # distilling: the heads' KL to the teacher, averaged over micro-batches
    for micro in range(tcfg.grad_accum):
        cached = {}
        if run.trunk_cache is None:
            batch = sample_batch(run.data.train, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed, step=step,
                                 micro=micro, rank=dist_info.rank, world_size=dist_info.world_size).to(device)
        else:
            from mtp.distill import pool_indices, pool_windows

            idx = pool_indices(tcfg.trunk_cache_windows, tcfg.batch_size, seed=tcfg.seed, step=step,
                               micro=micro, grad_accum=tcfg.grad_accum)
            batch = pool_windows(run.data.train, run.pool_starts, idx, tcfg.seq_len).to(device)
            h_c, t_c = run.trunk_cache.states(model, idx, batch)
            cached = dict(trunk_out=h_c, teacher_out=t_c)
        with ctx, par.micro_batch(last=micro == tcfg.grad_accum - 1) as on_backward:
            if tcfg.memory_efficient:
                res = mtp_loss_backward(model, batch, weights, chunk=tcfg.ce_chunk,
                                        grad_scale=1 / tcfg.grad_accum, compute_dtype=compute_dtype,
                                        compile_ce=tcfg.compile, on_backward=on_backward,
                                        grad_cosine=tcfg.log_grad_cosine and log_step,
                                        distill=run.distill, **cached)
                if res.grad_cosine is not None:
                    cosine = res.grad_cosine if cosine is None else cosine + res.grad_cosine
            else:
                res = naive_loss(model, batch, weights, distill=run.distill)
                (res.loss / tcfg.grad_accum).backward()
        total += float(res.loss) / tcfg.grad_accum
        per_head = [a + b / tcfg.grad_accum for a, b in zip(per_head, res.per_head)]
        if res.per_head_kl is not None:  # distilling: each head's KL to the teacher
            per_kl = [a + b / tcfg.grad_accum for a, b in zip(per_kl or [0.0] * n, res.per_head_kl)]
    cos_list = None if cosine is None else (cosine / tcfg.grad_accum).flatten().tolist()
    if dist_info.world_size > 1:  # log the global batch's loss, the same on every rank
        reduced = distributed.mean_over_ranks([total, *per_head, *(cos_list or [])], device)
        total, per_head = reduced[0], reduced[1 : 1 + n]
        cos_list = reduced[1 + n:] if cos_list is not None else None
    if not math.isfinite(total):
        raise MTPError(f"training diverged at step {step}: loss is {total} (try a lower --lr)")
    par.reduce_grads()  # DDP: one all-reduce; FSDP2: reduce-scattered during the last backward
    grad_norm = par.clip_grad_norm(tcfg.grad_clip)
    run.in_update = True
    opt.step()
    run.completed, run.in_update = step + 1, False
    opt.zero_grad(set_to_none=True)
    return StepResult(lr, weights, total, per_head, grad_norm, per_kl, cos_list)


def _finite(xs: list[float]) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in xs]


def train_record(run: _Run, res: StepResult, done: int, tokens_per_s: float) -> dict:
    """The metrics.jsonl line of a logged step (None: a head that was skipped, or sends no
    gradient to the trunk)."""
    record = {"kind": "train", "step": done, "loss": res.loss, "per_head": _finite(res.per_head), "lr": res.lr,
              "loss_weights": res.weights, "grad_norm": res.grad_norm, "tokens_per_s": tokens_per_s,
              "tokens": done * run.tokens_per_step}
    if res.per_head_kl is not None:  # KL(teacher || head) per head, null for head 0
        record["per_head_kl"] = _finite(res.per_head_kl)
    if run.trunk_cache is not None:  # windows read from the cache / computed so far
        record["trunk_cache"] = {"hits": run.trunk_cache.hits, "misses": run.trunk_cache.misses}
    if res.grad_cosine is not None:  # n x n
        n = run.model.config.n_future
        record["grad_cosine"] = [_finite(res.grad_cosine[r * n:(r + 1) * n]) for r in range(n)]
    return record


@contextmanager
def stop_on_sigterm():
    """While training, SIGTERM (`kill PID`, a scheduler's stop) stops the run as Ctrl-C does: the
    last finished step is saved and the run can be resumed. A job that a non-interactive shell
    started in the background ignores SIGINT, so `kill -INT` does not reach it; SIGTERM does.
    Only the main thread can set a handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(tcfg: TrainConfig, mcfg: ModelConfig | None = None, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train a model. mcfg=None with resume=True takes the config from the checkpoint."""
    run = setup(tcfg, mcfg, resume, overwrite, progress)
    start, main = run.start, run.dist.is_main
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not (progress and main), dynamic_ncols=True)
    run.model.train()
    run.completed = start
    # tokens/s counts training steps only: evaluation and checkpointing are left out
    last_loss, tok_s, time_window, tokens_window = [], 0.0, 0.0, 0
    with stop_on_sigterm():  # `kill PID` saves the last finished step, as Ctrl-C does
        try:
            for step in range(start, tcfg.steps):
                t_step = time.perf_counter()
                done = step + 1
                log_step = done % tcfg.log_every == 0 or done == tcfg.steps
                res = train_step(run, step, log_step)
                tokens_window += run.tokens_per_step
                time_window += time.perf_counter() - t_step
                if log_step:
                    tok_s = tokens_window / max(time_window, 1e-9)
                    time_window, tokens_window = 0.0, 0
                    record = train_record(run, res, done, tok_s)
                    last_loss = record["per_head"]
                    run.log(record)
                    bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                    run.log({"kind": "eval", "step": done, **run.evaluate()})
                if tcfg.save_every and done % tcfg.save_every == 0 and done != tcfg.steps:
                    run.save(done)
        except KeyboardInterrupt:
            # keep what was trained: the last finished step is saved and can be resumed
            bar.close()
            if run.par.fsdp:  # saving gathers the shards, a collective the other ranks may not reach
                print("interrupted: not saved (sharded training); the last periodic checkpoint stands", file=sys.stderr)
            elif run.completed > start and not run.in_update:
                run.save(run.completed)
                print(f"interrupted: saved step {run.completed} to {run.out / 'checkpoint'}", file=sys.stderr)
            raise
    bar.close()
    final = run.evaluate()
    run.log({"kind": "eval", "step": tcfg.steps, **final})
    run.save(tcfg.steps)
    return TrainResult(run.out, tcfg.steps, final, tok_s, last_loss, run.model)
