"""`mtp serve CKPT`: an OpenAI-compatible HTTP server (mtp.serve) for a checkpoint."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from mtp.errors import MTPError


def served_name(checkpoint: str) -> str:
    """The model id clients send: the run's directory name (`runs/demo/n4` -> `n4`)."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint" and path.parent.name else path.name


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    from mtp.commands.common import PACK_WEIGHTS, load_for_decoding

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MTPError("mtp serve needs the serve extra: pip install 'mtp[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise MTPError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise MTPError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.speculative is not None and args.speculative < 1:
        raise MTPError(f"--speculative must be at least 1, got {args.speculative}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MTP_API_KEY") or None
    if args.api_key == "":
        raise MTPError("--api-key is empty")
    if args.draft_vocab is not None and args.draft_vocab < 1:
        raise MTPError(f"--draft-vocab must be at least 1, got {args.draft_vocab}")
    model, tok, meta = load_for_decoding(args)
    draft_vocab = None
    if args.draft_vocab is not None:
        from mtp.decode.draft_vocab import checkpoint_draft_vocab

        draft_vocab = checkpoint_draft_vocab(meta, tok, args.draft_vocab, model.config.vocab_size, args.corpus)
    from mtp.serve import make_app, run

    name = args.served_model_name or served_name(args.checkpoint)
    # the engine is built (and every option checked) before anything is bound or printed
    app, server = make_app(model, tok, model_name=name, api_key=api_key, speculative=args.speculative,
                           max_batch=args.max_batch, max_context=args.max_context,
                           pack_weights=PACK_WEIGHTS[args.pack_weights], draft_vocab=draft_vocab)
    if not _loopback(args.host) and not api_key:
        print(f"mtp serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    e = server.engine
    print(f"mtp serve: {name} on http://{args.host}:{args.port}/v1 (max batch {e.max_batch}, speculative k = {e.k}, "
          f"context {e.context}{', API key required' if api_key else ''}{', chat template' if server.chat.available else ''}); "
          f"Ctrl-C stops", file=sys.stderr)
    run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server: continuous batching, self-speculative decoding")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together; the rest wait in order")
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="heads drafting and verifying per step (default: all; 1: plain decoding)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (default: $MTP_API_KEY, else none)")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context); the KV cache "
                        "holds max-batch x this many positions")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="the heads draft only among the N most frequent tokens of the training split of --corpus "
                        "(default: the checkpoint's training corpus): a cheaper draft, the same output")
    p.add_argument("--corpus", nargs="*", default=None, help="--draft-vocab's corpus")
    p.add_argument("--served-model-name", default=None, help="the model id of /v1/models (default: the run's name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--pack-weights", choices=["auto", "on", "off"], default="auto",
                   help="CPU: the kernel of the linear layers: F.linear, prepacked for oneDNN, or mtp's rowdot "
                        "(see mtp generate)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info: one line per request)")
    p.set_defaults(func=cmd_serve)
