"""`mtp serve` against the live server: uvicorn on a free port of 127.0.0.1 in this process,
talked to with the official `openai` client. Greedy outputs are compared with `generate` on the
same prompt alone (another copy of the model), sampled ones with `generate` at the same seed."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from mtp.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mtp.config import ModelConfig  # noqa: E402
from mtp.generate import GenerationConfig, generate  # noqa: E402
from mtp.losses import naive_loss  # noqa: E402
from mtp.model import MTPTransformer  # noqa: E402
from mtp.serve import make_app  # noqa: E402
from mtp.tokenizers import ByteTokenizer  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CONTEXT = 128
KEY = "sekrit-key"


ALPHABET = "abcdefghijklmnopqrstuvwxyz .,:;!"  # 32 printable characters
STEPS = 120


def _chain(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """Byte rows of a partly predictable chain over ALPHABET: letter i is followed by letter
    (5i + 3) mod 32 when i < 24, by a random one otherwise (as tests/test_generate.py's)."""
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, 32, (B,), generator=g)
    for t in range(1, T):
        rand = torch.randint(0, 32, (B,), generator=g)
        x[:, t] = torch.where(x[:, t - 1] >= 24, rand, (5 * x[:, t - 1] + 3) % 32)
    return torch.tensor(list(ALPHABET.encode()))[x]


@functools.lru_cache(maxsize=None)
@torch.enable_grad()  # trained on first use, whatever grad mode its caller is in
def _tiny_weights():
    """A byte-level model with 4 parallel heads trained briefly on _chain: its greedy output is
    printable and depends on the prompt; its drafts are accepted in some steps, not in others."""
    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=5, n_heads=4, max_seq_len=CONTEXT,
                                       n_future=4, multiple_of=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        loss = naive_loss(model, _chain(g, 16, 65), [1.0] * 4).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # drafting heads that predict "the same token again": right in the runs of one character
        for head in model.extra_heads:
            head.load_state_dict(model.layers[-1].state_dict())
    return model.eval()


def _tiny_checkpoint(path, chat_template):
    tok = ByteTokenizer()
    tok.chat_template = chat_template
    save_checkpoint(path, _tiny_weights(), tok)
    return path


class LiveServer:
    """uvicorn serving make_app(...) in a thread, on a port the OS picked."""

    def __init__(self, ckpt, **kwargs):
        import uvicorn

        model, tok, _ = load_checkpoint(ckpt)
        self.app, self.server = make_app(model, tok, model_name="tiny", **kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, api_key="none", async_=False):
        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def get(self, path, headers=None):
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post_raw(self, path, data: bytes, headers=None):
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name):
        _, text = self.get("/metrics", {"Authorization": f"Bearer {KEY}"})
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if line.split(" ")[0] == name or name.endswith("}"):
                    return float(line.split(" ")[-1])
        raise KeyError(name)

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return _tiny_checkpoint(root / "chat", CHAT_TEMPLATE), _tiny_checkpoint(root / "plain", None)


@pytest.fixture(scope="module")
def ref_model(ckpts):
    model, tok, _ = load_checkpoint(ckpts[0])  # the same weights in both checkpoints
    return model, tok


@pytest.fixture(scope="module")
def spec(ckpts):
    """Speculative (all 4 heads), 8 rows, a chat template, no key."""
    s = LiveServer(ckpts[0], max_batch=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain(ckpts):
    """Plain decoding (k = 1), 4 rows, no chat template, an API key."""
    s = LiveServer(ckpts[1], max_batch=4, speculative=1, api_key=KEY)
    yield s
    s.stop()


def reference(ref_model, ids, max_tokens, k, stop=(), temperature=0.0, seed=None):
    model, tok = ref_model
    out = generate(model, [ids], GenerationConfig(max_new_tokens=max_tokens, speculative=k, eot_id=tok.eot_id,
                                                  stop=tuple(stop), temperature=temperature, seed=seed), tokenizer=tok)
    reason = "length" if out.stop_reasons[0] in ("length", "context") else "stop"
    return out.texts[0], len(out.tokens[0]), reason


def chat_ids(ref_model, messages):
    from mtp.serve.chat import ChatFormat, parse_messages

    tok = ByteTokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ids = ChatFormat(tok).encode(parse_messages(messages))
    assert ids == tok.encode("<system>be brief\n<user>hello there\n<assistant>")
    return ids


# ---- the endpoints ---------------------------------------------------------------------------
def test_models_health_metrics(spec):
    client = spec.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert spec.get("/health") == (200, json.dumps({"status": "ok"}, separators=(",", ":")))
    status, text = spec.get("/metrics")
    assert status == 200
    for name in ("mtp_requests_total", "mtp_queue_length", "mtp_running_rows", "mtp_tokens_per_second",
                 "mtp_tokens_per_forward", "mtp_acceptance_rate{head=\"2\"}", "mtp_generated_tokens_total"):
        assert name in text, name
    assert "# TYPE mtp_queue_length gauge" in text


def test_completion_equals_generate(spec, ref_model):
    tok = ref_model[1]
    client = spec.client()
    prompt = "def parse(text):\n    "
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    text, n, reason = reference(ref_model, tok.encode_prompt(prompt), 40, 4)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(tok.encode_prompt(prompt)) and r.usage.completion_tokens == n
    assert r.object == "text_completion" and r.model == "tiny"
    # streamed: the same text in pieces, then finish_reason, usage when asked for
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == n
    # default max_tokens (16, as OpenAI's) and unknown fields ignored
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, extra_body={"frobnicate": 3})
    assert r.choices[0].text == reference(ref_model, tok.encode_prompt(prompt), 16, 4)[0]


def test_stop_strings_and_max_tokens(spec, ref_model):
    tok = ref_model[1]
    client = spec.client()
    prompt = "lmnop"
    full, _, _ = reference(ref_model, tok.encode_prompt(prompt), 60, 4)
    stop = full[10:13]
    text, n, reason = reference(ref_model, tok.encode_prompt(prompt), 60, 4, stop=[stop])
    assert reason == "stop" and stop not in text and len(text) < len(full)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=[stop, "\x00\x01"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # a budget past the context stops at the context's end
    r = client.completions.create(model="tiny", prompt="x" * 100, max_tokens=500, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT and r.choices[0].finish_reason == "length"


def test_chat(spec, plain, ref_model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = chat_ids(ref_model, messages)
    text, n, reason = reference(ref_model, ids, 30, 4)
    client = spec.client()
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    # content as text parts
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             messages[1]]
    r = client.chat.completions.create(model="tiny", messages=parts, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == text
    # a model without a chat template: a clear 400
    with pytest.raises(openai.BadRequestError) as e:
        plain.client(KEY).chat.completions.create(model="tiny", messages=messages)
    assert e.value.status_code == 400 and "no chat template" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "chat_template_missing"


def test_bad_requests_get_400s(spec):
    client = spec.client()
    bad = [dict(temperature=-1), dict(temperature=3), dict(top_p=0), dict(top_p=1.5), dict(n=2), dict(max_tokens=0),
           dict(max_tokens="10"), dict(stop=["a", "b", "c", "d", "e"]), dict(stop=[""]), dict(seed=1.5),
           dict(extra_body={"top_k": 0.5}), dict(logprobs=2), dict(prompt=["one", "two"]), dict(prompt=[]),
           dict(prompt="x" * CONTEXT), dict(prompt=[1, 2, 999])]
    for kwargs in bad:
        kwargs = {"model": "tiny", "prompt": "hi", **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        body = e.value.body
        assert e.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"], kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 500)
    assert e.value.body["code"] == "context_length_exceeded" and "context of 128" in e.value.body["message"]
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 3}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=messages)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    for raw in (b"{not json", b"[1, 2]", b'"text"'):
        status, body = spec.post_raw("/v1/completions", raw)
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = spec.get("/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    # the server is still fine
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_auth(plain, ref_model):
    with pytest.raises(openai.AuthenticationError) as e:
        plain.client("wrong-key").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        assert plain.get("/health", headers)[0] == 401
        assert plain.get("/v1/models", headers)[0] == 401
    assert plain.get("/health", {"Authorization": f"Bearer {KEY}"})[0] == 200
    r = plain.client(KEY).completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0)
    assert r.choices[0].text == reference(ref_model, ref_model[1].encode_prompt("hello"), 12, 1)[0]


def test_seeded_sampling_is_reproducible(spec, ref_model):
    tok = ref_model[1]
    client = spec.client()
    prompt = "class Parser:\n"
    kw = dict(model="tiny", prompt=prompt, max_tokens=30, temperature=0.9, top_p=0.95, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    text, _, _ = reference(ref_model, tok.encode_prompt(prompt), 30, 4, temperature=0.9, seed=1234)
    assert a == text
    assert client.completions.create(**kw).choices[0].text == a
    assert client.completions.create(**{**kw, "seed": 99}).choices[0].text != a


# ---- load ---------------------------------------------------------------------------------------
async def _clients(server, jobs, disconnect):
    """Run the jobs as concurrent streaming clients, each arriving after its delay; the ones in
    `disconnect` read two chunks and hang up -> {i: text} of the others."""
    client = server.client(async_=True)

    async def one(i, job):
        await asyncio.sleep(job["delay"])
        stream = await client.completions.create(model="tiny", prompt=job["prompt"], max_tokens=job["max_tokens"],
                                                 temperature=job["temperature"], seed=job["seed"], stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            if i in disconnect and len(parts) == 2:
                await stream.close()
                return i, None, None
        return i, "".join(parts), finish

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i, j) for i, j in enumerate(jobs))), 90)
    finally:
        await client.close()
    return {i: (text, finish) for i, text, finish in results if i not in disconnect}


def _jobs(n, seed, sampled=()):
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60)))
        jobs.append(dict(prompt=prompt, max_tokens=rng.randint(8, 40), delay=rng.uniform(0, 0.6),
                         temperature=0.8 if i in sampled else 0.0, seed=i if i in sampled else None))
    return jobs


def _check_load(server, ref_model, jobs, disconnect, k):
    tok = ref_model[1]
    before = dict(server.server.engine.requests_done)
    got = asyncio.run(_clients(server, jobs, disconnect))
    assert sorted(got) == sorted(set(range(len(jobs))) - set(disconnect))  # none lost
    for i, (text, finish) in got.items():
        j = jobs[i]
        want, _, reason = reference(ref_model, tok.encode_prompt(j["prompt"]), j["max_tokens"], k,
                                    temperature=j["temperature"], seed=j["seed"])
        assert (text, finish) == (want, reason), (i, j)
    engine = server.server.engine
    deadline = time.monotonic() + 20
    while engine.running or engine.queue_length:  # the hung-up clients' rows are freed
        assert time.monotonic() < deadline, (engine.running, engine.queue_length)
        time.sleep(0.05)
    done = {key: n - before[key] for key, n in engine.requests_done.items()}
    # every request ended once, none in error; a client that hung up was cancelled unless its
    # request had already ended (decoding may run ahead of a slow client by the time it closes)
    assert sum(done.values()) == len(jobs) and done["error"] == 0, done
    assert 1 <= done["cancelled"] <= len(disconnect), done


def test_load_32_streaming_clients_speculative(spec, ref_model):
    jobs = _jobs(32, seed=0, sampled=(5, 17))
    disconnect = {3, 11, 20, 27}
    for i in disconnect:
        jobs[i]["max_tokens"] = 100  # still decoding when they hang up
    _check_load(spec, ref_model, jobs, disconnect, k=4)
    engine = spec.server.engine
    assert engine.accepted[0] > 0 and engine.accepted[0] < engine.row_steps  # drafts accepted and rejected
    # the server still answers
    assert spec.client().completions.create(model="tiny", prompt="ok", max_tokens=5, temperature=0).usage.completion_tokens == 5
    assert spec.get("/health")[0] == 200


def test_load_plain_decoding(plain, ref_model):
    jobs = _jobs(12, seed=1)
    jobs[4]["max_tokens"] = 100  # still decoding when it hangs up (with 8-40 it could finish first)
    server = plain
    orig = server.client
    server.client = lambda api_key=KEY, async_=False: orig(KEY, async_)
    try:
        _check_load(server, ref_model, jobs, {4}, k=1)
    finally:
        server.client = orig


def test_cli_serve_bad_input(ckpts, capsys, tmp_path):
    from helpers import assert_one_line_error, run_cli

    from mtp.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.max_batch, args.speculative, args.api_key) == ("127.0.0.1", 8000, 16, None, None)
    assert_one_line_error(*run_cli(["serve", tmp_path / "missing"], capsys)[::2])
    assert_one_line_error(*run_cli(["serve", ckpts[0], "--max-batch", "0"], capsys)[::2], "--max-batch")
    assert_one_line_error(*run_cli(["serve", ckpts[0], "--speculative", "9"], capsys)[::2], "--speculative 9")


def test_engine_with_a_draft_vocab_decodes_greedy_s_tokens(ref_model):
    """The engine's heads draft among draft_vocab only (mtp.decode.draft_vocab), in its fused
    greedy round and its prefill's first drafts: the text stays greedy's; with none of greedy's
    tokens in the draft vocabulary no draft is accepted, with all of them some are."""
    import threading

    from mtp.serve.engine import Engine, Request

    model, tok = ref_model
    ids = tok.encode_prompt("def parse(text):\n    ")
    text, n, _ = reference(ref_model, ids, 24, 4)
    out = generate(model, [ids], GenerationConfig(max_new_tokens=24, speculative=1))
    used = sorted(set(out.tokens[0]))
    for vocab, accepts in ((used, True), ([t for t in range(model.config.vocab_size) if t not in used], False)):
        engine = Engine(model, tok, max_batch=2, draft_vocab=vocab).start()
        try:
            done, parts = threading.Event(), []

            def emit(ev):
                if ev.kind == "delta":
                    parts.append(ev.text)
                elif ev.kind in ("done", "error"):
                    done.set()

            engine.submit(Request(prompt=list(ids), max_tokens=24, emit=emit))
            assert done.wait(60)
            assert "".join(parts) == text
            assert (sum(engine.accepted) > 0) is accepts
        finally:
            engine.close()
