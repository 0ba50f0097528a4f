"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn) in front of the engine.

`POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Bad requests get a
400 with OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`); unknown fields
are ignored, as OpenAI does. With an API key every request needs `Authorization: Bearer KEY`
(401 otherwise; compared in constant time). A client that goes away, streaming or not, has its
request dropped before the engine's next step.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mtp.errors import MTPError
from mtp.serve.chat import ChatError, ChatFormat, parse_messages
from mtp.serve.engine import Engine, Event, Request, next_id


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_body(message: str, param=None, code=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    body = error_body(message, param, code, kind)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request fields -------------------------------------------------------------------------
@dataclass
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer", name)
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be at least {lo}, got {v}", name)
    return v


def parse_sampling(body: dict, max_tokens_name: str = "max_tokens") -> Sampling:
    max_tokens = _integer(body, max_tokens_name, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None:  # an extension (vLLM's): -1 or 0 means no limit
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise APIError(400, "'top_k' must be an integer >= 1 (or -1 for none)", "top_k")
        top_k = top_k if top_k >= 1 else None
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stop) > 4 or any(s == "" for s in stop):
        raise APIError(400, "'stop' takes up to 4 non-empty strings", "stop")
    seed = _integer(body, "seed")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, "only n = 1 is supported", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise APIError(400, "only best_of = 1 is supported", "best_of")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported", "logprobs")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", "echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", "user")
    return Sampling(max_tokens, temperature, top_p, top_k, stop, seed, bool(stream), bool(opts.get("include_usage")))


# ---- auth -------------------------------------------------------------------------------------
class BearerAuth:
    """Pure ASGI middleware: every HTTP request needs `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    def ok(self, headers) -> bool:
        value = b""
        for name, v in headers:
            if name.lower() == b"authorization":
                value = v
        scheme, _, token = value.partition(b" ")
        given = hashlib.sha256(token.strip()).digest()  # equal lengths: compare_digest's time is constant
        return hmac.compare_digest(given, self._digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.ok(scope.get("headers", [])):
            resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- streaming ----------------------------------------------------------------------------
async def _wait_disconnect(receive) -> None:
    while True:
        if (await receive())["type"] == "http.disconnect":
            return


class _Pending:
    """A request submitted to the engine, its events arriving on an asyncio queue."""

    def __init__(self, server: "Server", prompt: list[int], s: Sampling, max_tokens: int):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.server = server
        self.req = Request(prompt=prompt, max_tokens=max_tokens, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, seed=s.seed, stop=s.stop,
                           emit=lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))
        self.finished = False

    def submit(self) -> None:
        try:
            self.server.engine.submit(self.req)
        except MTPError as e:
            raise APIError(503, str(e), kind="server_error") from None

    async def next(self, disconnected: asyncio.Task) -> Event | None:
        """The next event, or None when the client has gone (the request is then cancelled)."""
        get = asyncio.ensure_future(self.queue.get())
        await asyncio.wait({get, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            ev = get.result()
            if ev.kind in ("done", "error"):
                self.finished = True
            return ev
        get.cancel()
        self.cancel()
        return None

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.server.engine.cancel(self.req)


class EventStream(Response):
    """Server-sent events from a _Pending request, in OpenAI's chunk format (`chunks` turns a
    delta or done event into zero or more JSON objects; an error event becomes OpenAI's error
    object), ending with `data: [DONE]`."""

    media_type = "text/event-stream"

    def __init__(self, pending: _Pending, chunks, first: list[dict]):
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.pending, self.chunks, self.first = pending, chunks, first

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            for obj in self.first:
                await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})
            while True:
                ev = await self.pending.next(disconnected)
                if ev is None:
                    return
                objs = [error_body(ev.message, kind="server_error")] if ev.kind == "error" else self.chunks(ev)
                for obj in objs:
                    await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})
                if ev.kind in ("done", "error"):
                    break
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:  # the connection broke while sending
            pass
        finally:
            disconnected.cancel()
            self.pending.cancel()


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _reply_maker(rid: str, model: str):
    """The envelope of every object one request answers with: obj(kind, choices[, usage])."""
    created = int(time.time())

    def obj(kind: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out
    return obj


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


# ---- the server ---------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.chat = ChatFormat(engine.tokenizer)
        self.created = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}

    # -- helpers --------------------------------------------------------------------------
    async def _body(self, request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")
        return body

    def _max_tokens(self, s: Sampling, prompt: list[int], default: int | None) -> int:
        # the engine stops a row at the end of the context, as generate does (finish_reason "length")
        return s.max_tokens or default or self.engine.context - len(prompt)

    async def _collect(self, request: HTTPRequest, pending: _Pending):
        """Wait for a non-streamed request: (text, done event); None if the client went away."""
        disconnected = asyncio.ensure_future(_wait_disconnect(request.receive))
        parts = []
        try:
            while True:
                ev = await pending.next(disconnected)
                if ev is None:
                    return None
                if ev.kind == "error":
                    raise APIError(500, ev.message, kind="server_error")
                parts.append(ev.text)
                if ev.kind == "done":
                    return "".join(parts), ev
        finally:
            disconnected.cancel()
            pending.cancel()

    def _count(self, route: str, status: int) -> None:
        key = (route, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    # -- endpoints ------------------------------------------------------------------------
    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        s = parse_sampling(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.engine.tokenizer.encode_prompt(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)  # token ids, as given
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise APIError(400, "one prompt per request (n = 1): send several requests", "prompt")
        else:
            raise APIError(400, "'prompt' must be a string (or a list of token ids)", "prompt")
        self.engine_check(ids)
        pending = _Pending(self, ids, s, self._max_tokens(s, ids, 16))
        pending.submit()
        obj = _reply_maker(next_id("cmpl"), self.model_name)

        if s.stream:
            def chunks(ev: Event):
                out = []
                if ev.text or ev.kind == "done":
                    out.append(obj("text_completion", [{"index": 0, "text": ev.text, "logprobs": None,
                                                        "finish_reason": ev.finish if ev.kind == "done" else None}]))
                if ev.kind == "done" and s.include_usage:
                    out.append(obj("text_completion", [], _usage(ev)))
                return out
            return EventStream(pending, chunks, [])
        result = await self._collect(request, pending)
        if result is None:
            return Response(status_code=499)
        text, ev = result
        return JSONResponse(obj("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": ev.finish}], _usage(ev)))

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        if "max_completion_tokens" in body and body.get("max_tokens") is None:
            s = parse_sampling(body, "max_completion_tokens")
        else:
            s = parse_sampling(body)
        if not self.chat.available:
            raise APIError(400, "this model has no chat template: use /v1/completions with a prompt",
                           "messages", "chat_template_missing")
        try:
            ids = self.chat.encode(parse_messages(body.get("messages")))
        except ChatError as e:
            raise APIError(400, str(e), "messages") from None
        self.engine_check(ids)
        pending = _Pending(self, ids, s, self._max_tokens(s, ids, None))
        pending.submit()
        obj = _reply_maker(next_id("chatcmpl"), self.model_name)

        if s.stream:
            def chunks(ev: Event):
                out = []
                if ev.text:
                    out.append(obj("chat.completion.chunk", [{"index": 0, "delta": {"content": ev.text},
                                                             "logprobs": None, "finish_reason": None}]))
                if ev.kind == "done":
                    out.append(obj("chat.completion.chunk", [{"index": 0, "delta": {}, "logprobs": None,
                                                             "finish_reason": ev.finish}]))
                    if s.include_usage:
                        out.append(obj("chat.completion.chunk", [], _usage(ev)))
                return out
            first = [obj("chat.completion.chunk", [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])]
            return EventStream(pending, chunks, first)
        result = await self._collect(request, pending)
        if result is None:
            return Response(status_code=499)
        text, ev = result
        return JSONResponse(obj("chat.completion", [{"index": 0, "message": {"role": "assistant", "content": text},
                                                     "logprobs": None, "finish_reason": ev.finish}], _usage(ev)))

    def engine_check(self, ids: list[int]) -> None:
        try:
            self.engine.check_prompt(ids)
        except MTPError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, str(e), "prompt", code) from None

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtp",
             "max_model_len": self.engine.context}]})

    async def health(self, request: HTTPRequest) -> Response:
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def metrics(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def metrics_text(self) -> str:
        e = self.engine
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

        metric("mtp_http_requests_total", "counter", "HTTP requests answered, by route and status",
               [({"route": r, "status": st}, n) for (r, st), n in sorted(self.http_requests.items())])
        metric("mtp_requests_total", "counter", "completions finished, by outcome",
               [({"outcome": k}, v) for k, v in e.requests_done.items()])
        metric("mtp_queue_length", "gauge", "requests waiting for a row", [({}, e.queue_length)])
        metric("mtp_running_rows", "gauge", "requests decoding now", [({}, e.running)])
        metric("mtp_max_batch", "gauge", "rows in the pool (--max-batch)", [({}, e.max_batch)])
        metric("mtp_speculative_k", "gauge", "heads drafting and verifying per step (1: plain)", [({}, e.k)])
        metric("mtp_prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, e.prompt_tokens)])
        metric("mtp_generated_tokens_total", "counter", "tokens generated", [({}, e.generated_tokens)])
        metric("mtp_forward_passes_total", "counter", "model forward passes (prefills and decode steps)",
               [({}, e.forward_passes)])
        metric("mtp_row_steps_total", "counter", "rows decoded in decode steps", [({}, e.row_steps)])
        metric("mtp_tokens_per_second", "gauge", "tokens generated per second, last 10 s", [({}, f"{e.tokens_per_s():.3f}")])
        metric("mtp_tokens_per_forward", "gauge", "tokens committed per row per decode step",
               [({}, f"{e.step_tokens / e.row_steps:.4f}" if e.row_steps else "0")])
        metric("mtp_accepted_drafts_total", "counter", "row steps that accepted head h's draft (h = 2..k)",
               [({"head": str(j + 2)}, a) for j, a in enumerate(e.accepted)])
        metric("mtp_acceptance_rate", "gauge", "share of row steps accepting head h's draft (h = 2..k)",
               [({"head": str(j + 2)}, f"{a / e.row_steps:.4f}" if e.row_steps else "0") for j, a in enumerate(e.accepted)])
        return "\n".join(lines) + "\n"


def build_app(server: Server) -> Starlette:
    """The ASGI app; the engine's thread starts and stops with the app's lifespan."""
    import contextlib

    def route(path, fn, methods):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                resp = await fn(request)
            except APIError as e:
                resp = e.response()
            except MTPError as e:
                resp = error_response(400, str(e))
            server._count(path, resp.status_code)
            return resp
        return Route(path, endpoint, methods=methods)

    async def not_found(request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None)

    async def server_error(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.close()

    app = Starlette(routes=[
        route("/v1/completions", server.completions, ["POST"]),
        route("/v1/chat/completions", server.chat_completions, ["POST"]),
        route("/v1/models", server.models, ["GET"]),
        route("/health", server.health, ["GET"]),
        route("/metrics", server.metrics, ["GET"]),
    ], exception_handlers={HTTPException: not_found, Exception: server_error}, lifespan=lifespan)
    if server.api_key:
        app.add_middleware(BearerAuth, api_key=server.api_key)
    return app
