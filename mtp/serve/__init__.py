"""`mtp serve`: an OpenAI-compatible server with continuous batching and self-speculative decoding.

`mtp.serve.engine.Engine` owns the model and decodes every running request as one ragged batch;
`mtp.serve.api` is the HTTP layer (Starlette + uvicorn, extra `mtp[serve]`); `make_app` builds
both and `run` serves them.
"""

from __future__ import annotations

from mtp.serve.engine import Engine, Event, Request


def make_app(model, tokenizer, *, model_name: str, api_key: str | None = None, **engine_kwargs):
    """(the ASGI app, its Server) for a loaded model; the engine starts with the app's lifespan."""
    from mtp.serve.api import Server, build_app

    server = Server(Engine(model, tokenizer, **engine_kwargs), model_name, api_key)
    return build_app(server), server


def run(app, *, host: str = "127.0.0.1", port: int = 8000, sock=None, log_level: str = "warning") -> None:
    """Serve an app from make_app with uvicorn until interrupted; `sock`: an already bound
    socket instead of host:port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    server.run(sockets=[sock] if sock is not None else None)


__all__ = ["Engine", "Event", "Request", "make_app", "run"]
