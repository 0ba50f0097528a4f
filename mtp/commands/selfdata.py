"""`mtp selfdata CKPT [corpus ...] --out FILE.jsonl`: the model's own continuations of prompts
from the training split of a corpus, as a corpus to train heads on (`mtp.selfdata`).

    mtp selfdata runs/smollm2/base stdlib --out runs/smollm2/self.jsonl --n-prompts 512
    mtp finetune runs/smollm2/base runs/smollm2/self.jsonl --out runs/smollm2/heads --n-future 4 --mode heads

Greedy by default (then the heads' corpus loss is the loss towards what greedy verification
accepts); --temperature samples. A rerun with the same settings resumes the file.
"""

from __future__ import annotations

from mtp.commands.common import PACK_WEIGHTS, emit
from mtp.errors import MTPError


def cmd_selfdata(args) -> int:
    from mtp.bench import corpus_prompts
    from mtp.commands.common import load_for_decoding
    from mtp.selfdata import SelfDataConfig, write_self_data

    cfg = SelfDataConfig(n_prompts=args.n_prompts, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, speculative=args.speculative,
                         pack_weights=PACK_WEIGHTS[args.pack_weights])
    cfg.validate()
    model, tok, meta = load_for_decoding(args)
    train_cfg = meta.get("train") or {}
    corpus = args.corpus or train_cfg.get("corpus")
    if not corpus:
        raise MTPError(f"{args.checkpoint} records no training corpus: name one (a directory, file or 'stdlib')")
    val_fraction = train_cfg.get("val_fraction", 0.005)
    prompts = corpus_prompts(corpus, tok, cfg.n_prompts, cfg.prompt_len, val_fraction, split="train",
                             progress=not args.no_progress)
    source = {"checkpoint": str(args.checkpoint), "corpus": [str(c) for c in corpus], "val_fraction": val_fraction}
    res = write_self_data(model, tok, prompts, args.out, cfg, source=source, overwrite=args.overwrite,
                          progress=not args.no_progress)
    emit(res, args.json, f"{res['lines']} continuations in {res['file']} ({res['new_tokens']:,} new tokens this run, "
                         f"{res['tokens_per_s']:,.0f} tok/s; {res['resumed_from']} were there already)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("selfdata", help="the model's own continuations of corpus prompts, as a corpus for its heads")
    p.add_argument("checkpoint", help="a run directory or checkpoint directory")
    p.add_argument("corpus", nargs="*", default=None,
                   help="where the prompts come from (its training split): directories, globs, files or 'stdlib' "
                        "(default: the checkpoint's training corpus)")
    p.add_argument("--out", required=True, help="the .jsonl file to write (appended; resumed when rerun)")
    p.add_argument("--n-prompts", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=64, help="tokens of corpus per prompt")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="heads used to decode (default: all; the continuations do not depend on it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--pack-weights", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="start the file again")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_selfdata)
