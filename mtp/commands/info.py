"""`mtp info CKPT`: the config and parameter counts of a checkpoint (no weights are read)."""

from __future__ import annotations

from mtp.commands.common import emit


def cmd_info(args) -> int:
    from mtp.checkpoint import inspect_checkpoint

    model, tok, meta = inspect_checkpoint(args.checkpoint)  # reads no weights
    cfg = model.config
    counts = model.param_counts()
    info = {"path": str(meta["path"]), "step": meta.get("step"), "config": cfg.to_dict(),
            "params": counts, "tokenizer": {"type": tok.name, "vocab_size": tok.vocab_size,
                                            "prompt_start_ids": list(tok.bos_ids)},
            "trunk_blocks": cfg.n_trunk, "head_offsets": cfg.head_offsets}
    lines = [f"checkpoint  {meta['path']} (step {meta.get('step')})",
             f"model       dim {cfg.dim}, {cfg.n_layers} blocks, {cfg.n_heads} attention heads "
             f"({cfg.n_kv_heads} kv), context {cfg.max_seq_len}, vocab {cfg.vocab_size}",
             f"heads       {cfg.n_future} x {cfg.head_type}, offsets {cfg.head_offsets}, "
             f"trunk {cfg.n_trunk} blocks"
             + (f", extra heads over {len(cfg.draft_vocab)} tokens (draft vocabulary)" if cfg.draft_vocab else ""),
             f"tokenizer   {tok.name} ({tok.vocab_size} ids), prompts: {tok.prompt_convention()}",
             "parameters  " + ", ".join(f"{k} {v:,}" for k, v in counts.items())]
    emit(info, args.json, "\n".join(lines))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="config and parameter counts of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
