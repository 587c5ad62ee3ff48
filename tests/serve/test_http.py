"""The OpenAI-compatible HTTP API end to end: a real server on 127.0.0.1 (gRPC and HTTP on free ports), the
official ``openai`` package as the client (raw ``http.client`` where a test needs what a client would not send),
answers compared with gRPC ``Generate`` on the same server."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from hotswap.errors import ERROR_TABLE, HotswapError
from hotswap.serve.api.server import Server
from hotswap.serve.api.status import HTTP_STATUS, http_error
from tests.serve.serverutil import ACME, GLOBEX, PROMPT, client, make_server, scrape, self_signed_cert, wait_idle

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


def http_server(base: Path, registry: Path, auth: Path | None = None, **engine: object) -> Server:
    """serverutil's small server, with the HTTP API on a free port and /metrics on it too."""
    config = make_server(base, registry, auth, **engine).config
    return Server(replace(config, http_port=0, http_metrics=True))


def oai(srv: Server, token: str | None = ACME, **kw: Any) -> openai.OpenAI:
    """The openai client for ``srv`` with bearer ``token`` (None: a server without auth; the client needs one)."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key=token or "unused", max_retries=0,
                         timeout=60, **kw)  # fmt: skip


def raw(
    port: int | None, method: str, path: str, body: bytes | dict | None = None, token: str | None = ACME
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of one request to the API on ``port``, as sent, without a client's checks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(payload) if payload else {}
    finally:
        conn.close()


def open_stream(port: int | None, body: dict, token: str | None = None) -> tuple[http.client.HTTPConnection, Any]:
    """A streaming completion, its response open at the first event (read with ``events``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def events(resp: Any) -> Iterator[dict | str]:
    """The Server-Sent Events of ``resp``: each JSON chunk, then "[DONE]"."""
    while line := resp.fp.readline():
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            yield data if data == "[DONE]" else json.loads(data)


@pytest.fixture(scope="module")
def chat_base(text_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """text_base with a chat template: same weights and config, so the same fingerprint (its adapters apply)."""
    out = tmp_path_factory.mktemp("bases") / "tiny-chat"
    shutil.copytree(text_base, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def srv(chat_base: Path, server_registry: Path, tokens_file: Path) -> Iterator[Server]:
    s = http_server(chat_base, server_registry, tokens_file).start()
    yield s
    s.stop(grace=1)


# -- answers ------------------------------------------------------------------------------------------------
def test_models_are_the_base_and_the_callers_adapters(srv: Server) -> None:
    acme = {m.id: m for m in oai(srv, ACME).models.list()}
    globex = {m.id for m in oai(srv, GLOBEX).models.list()}
    assert next(iter(acme)) == "tiny-chat"  # the base first, named after its directory
    assert {"tiny-chat", "math", "acme/tone", "acme/shared", "long"} <= set(acme) and "globex/secret" not in acme
    assert "globex/secret" in globex and "acme/tone" not in globex and "acme/shared" in globex
    tone = acme["acme/tone"].model_dump()
    assert tone["owned_by"] == "acme" and acme["math"].owned_by == "public"
    assert tone["method"] == "dora" and tone["latest"] == 1 and tone["versions"] == [1]
    assert tone["visibility"] == "private" and tone["parent"] == "tiny-chat" and isinstance(tone["resident"], list)
    assert abs(tone["created"] - time.time()) < 24 * 3600


@pytest.mark.parametrize(
    ("model", "adapters"),
    [("tiny-chat", []), ("math", ["math"]), ("math@1", ["math@1"]), ("acme/tone:latest", ["acme/tone:latest"]),
     ("acme/shared", ["acme/shared"])],
)  # fmt: skip
def test_completion_equals_grpc_generate(srv: Server, model: str, adapters: list[str]) -> None:
    """Same request, same server: the same tokens, text, finish reason and usage as gRPC Generate, greedy and
    seeded sampling, text and token-id prompts."""
    c = oai(srv)
    with client(srv) as g:
        for params in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.8, "seed": 7}):
            want = g.generate(PROMPT, adapters=adapters, max_new_tokens=8, **params)
            got = c.completions.create(model=model, prompt=PROMPT, max_tokens=8, **params)
            choice = got.choices[0]
            assert (choice.text, choice.token_ids, choice.finish_reason) == (want.text, want.token_ids, "length")
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 8)
            assert got.usage.total_tokens == want.prompt_tokens + 8 and got.model == model
            assert [(a["ref"], a["weight"]) for a in got.adapters] == want.adapters
        ids = [101, 1996, 3007, 1997]
        want = g.generate(prompt_ids=ids, adapters=adapters, max_new_tokens=5, ignore_eos=True)
        extra = {"ignore_eos": True}
        got = c.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0, extra_body=extra)
        assert got.choices[0].token_ids == want.token_ids and got.usage.prompt_tokens == len(ids)


def test_weighted_adapters_and_stop_strings(srv: Server) -> None:
    """Weighted composition in extra_body (``model`` the base or the first adapter); stop strings cut the text
    as on gRPC, in a stream too."""
    c = oai(srv)
    weighted = [("math", 1.0), ("acme/tone", 0.5)]
    extra = {"adapters": [{"ref": r, "weight": w} for r, w in weighted]}
    with client(srv) as g:
        want = g.generate(PROMPT, adapters=weighted, max_new_tokens=10)
        for model in ("tiny-chat", "math"):
            got = c.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=extra)
            assert got.choices[0].token_ids == want.token_ids
            assert got.adapters == [{"ref": "math@1", "weight": 1.0}, {"ref": "acme/tone@1", "weight": 0.5}]
        with pytest.raises(openai.BadRequestError, match="first of adapters"):
            c.completions.create(model="acme/tone", prompt=PROMPT, extra_body=extra)
        full = g.generate(PROMPT, adapters=["math"], max_new_tokens=12, ignore_eos=True).text
        stop = full.strip()[len(full.strip()) // 2 :][:3]
        want = g.generate(PROMPT, adapters=["math"], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert want.finish_reason == "stop" and stop not in want.text
    got = c.completions.create(model="math", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                               extra_body={"ignore_eos": True})  # fmt: skip
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    chunks = list(c.completions.create(model="math", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                       stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == want.text and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_streams_incrementally_with_a_final_usage_chunk(srv: Server) -> None:
    """Chat through the base's template: the stream's text, token by token, is the whole answer and gRPC's;
    its first chunk arrives while the row is still generating; usage comes last, counted exactly."""
    c = oai(srv)
    with client(srv) as g:
        want = g.generate(messages=CHAT, adapters=["math"], max_new_tokens=150, ignore_eos=True)
    whole = c.chat.completions.create(model="math", messages=CHAT, max_completion_tokens=150, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert whole.choices[0].message.content == want.text and whole.choices[0].message.role == "assistant"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (want.prompt_tokens, 150)
    options = {"include_usage": True}
    stream = iter(c.chat.completions.create(model="math", messages=CHAT, max_tokens=150, temperature=0, stream=True,
                                            stream_options=options, extra_body={"ignore_eos": True}))  # fmt: skip
    chunks = [next(stream)]
    assert srv.engine is not None and srv.engine.counts()[1] == 1  # still generating: this chunk came early
    chunks += list(stream)
    *content, last, usage = chunks
    assert chunks[0].choices[0].delta.role == "assistant" and len(content) > 1
    assert "".join(ch.choices[0].delta.content or "" for ch in [*content, last]) == want.text
    assert sum(len(ch.choices[0].token_ids) for ch in content) == 150 and last.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 150
    assert usage.usage.prompt_tokens == want.prompt_tokens
    assert all(ch.usage is None for ch in [*content, last])


# -- errors -------------------------------------------------------------------------------------------------
ERRORS = [
    (ACME, {"model": "nope"}, openai.NotFoundError, "adapter_not_found", "nope"),
    (ACME, {"model": "math@9"}, openai.NotFoundError, "adapter_not_found", "math"),
    (ACME, {"model": "math:prod"}, openai.NotFoundError, "adapter_not_found", "prod"),
    ("wrong-token", {}, openai.AuthenticationError, "unauthenticated", "unknown token"),
    (ACME, {"model": "globex/secret"}, openai.PermissionDeniedError, "permission_denied", "tenant globex"),
    (ACME, {"model": "globex/nothing-here"}, openai.PermissionDeniedError, "permission_denied", "tenant globex"),
    (GLOBEX, {"model": "acme/tone"}, openai.PermissionDeniedError, "permission_denied", "tenant acme"),
    (ACME, {"model": "elsewhere"}, openai.ConflictError, "base_model_mismatch", "base"),
    (ACME, {"model": "corrupt"}, openai.ConflictError, "integrity_error", "sha256"),
    (ACME, {"model": "Not A Ref!"}, openai.BadRequestError, "invalid_adapter_ref", "Not A Ref"),
    (ACME, {"prompt": list(range(1, 300))}, openai.BadRequestError, "invalid_argument", "max_seq_len"),
    (ACME, {"extra_body": {"rank": 2}}, openai.BadRequestError, "invalid_argument", "DyLoRA"),
    (ACME, {"n": 2}, openai.BadRequestError, "invalid_argument", "n must be 1"),
    (ACME, {"logprobs": 2}, openai.BadRequestError, "invalid_argument", "logprobs is not supported"),
    (ACME, {"prompt": ["a", "b"]}, openai.BadRequestError, "invalid_argument", "one prompt per request"),
    (ACME, {"prompt": [10**6]}, openai.BadRequestError, "invalid_argument", "outside the vocabulary"),
    # malformed by type or range: pydantic's 400, naming the field
    (ACME, {"max_tokens": 0}, openai.BadRequestError, "invalid_argument", "max_tokens: Input should be greater"),
    (ACME, {"temperature": "hot"}, openai.BadRequestError, "invalid_argument", "temperature: Input should be a"),
    (ACME, {"seed": -1}, openai.BadRequestError, "invalid_argument", "seed: Input should be greater"),
    (ACME, {"extra_body": {"adapters": [{"ref": "math", "weight": "x"}]}}, openai.BadRequestError, "invalid_argument",
     "adapters.0.weight: Input should be a valid number"),
    (ACME, {"extra_body": {"top_k": 3.5}}, openai.BadRequestError, "invalid_argument", "top_k: Input should be"),
    (ACME, {"extra_body": {"bogus": 1}}, openai.BadRequestError, "invalid_argument", "bogus: Extra inputs"),
]  # fmt: skip


@pytest.mark.parametrize(("token", "params", "error", "code", "words"), ERRORS)
def test_errors_have_their_status_and_an_openai_body(
    srv: Server, token: str | None, params: dict, error: type, code: str, words: str
) -> None:
    params = {"model": "math", "prompt": PROMPT, "max_tokens": 4, **params}
    with pytest.raises(error, match=re.escape(words)) as info:
        oai(srv, token).completions.create(**params)
    assert info.value.body["code"] == code and info.value.body["type"] == HTTP_STATUS[_status(info.value)][1]
    if error is openai.AuthenticationError:
        assert info.value.response.headers["www-authenticate"] == "Bearer"
    assert oai(srv).completions.create(model="math", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def _status(err: openai.APIStatusError) -> str:
    return next(name for name, (status, _) in HTTP_STATUS.items() if status == err.status_code)


def test_a_bug_is_500_with_a_generic_message_and_its_traceback_logged(
    srv: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def bug(refs: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(srv.metrics, "adapter_label", bug)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError, match="internal error; see the server log") as info:
            oai(srv).completions.create(model="math", prompt=PROMPT, max_tokens=2, stream=stream)
        assert info.value.status_code == 500 and "a bug" not in str(info.value)
    assert sum(r.message == "Completions failed" and r.exc_info is not None for r in caplog.records) == 2


def test_every_error_class_has_an_http_status() -> None:
    for cls in ERROR_TABLE:
        status, body, _ = http_error(cls("x"))
        assert 400 <= status < 600 and body["error"]["message"] == "x"
    assert http_error(HotswapError("bug"))[0] == 500


def test_a_request_without_a_token_is_401(srv: Server) -> None:
    for path, body in (("/v1/completions", {"model": "math", "prompt": PROMPT}), ("/v1/models", None)):
        status, headers, answer = raw(srv.http_port, "POST" if body else "GET", path, body, token=None)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert "Bearer" in answer["error"]["message"] and answer["error"]["code"] == "unauthenticated"


def test_foreign_names_look_the_same(srv: Server) -> None:
    messages = []
    for ref in ("globex/secret", "globex/nothing-here"):
        with pytest.raises(openai.PermissionDeniedError) as info:
            oai(srv, ACME).chat.completions.create(model=ref, messages=CHAT)
        messages.append(info.value.body["message"].replace("nothing-here", "secret"))
    assert messages[0] == messages[1]


def test_malformed_bodies_are_400_naming_the_field_never_500(srv: Server) -> None:
    cases = [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "Input should be a valid dictionary"),
        ({"prompt": PROMPT}, "model: Field required"),
        ({"model": "math", "prompt": {"a": 1}}, "prompt"),
        ({"model": "math", "prompt": PROMPT, "stream": "yes"}, "stream: Input should be a valid boolean"),
        ({"model": "math", "prompt": PROMPT, "stop": [1]}, "stop"),
    ]
    for body, words in cases:
        status, _, answer = raw(srv.http_port, "POST", "/v1/completions", body)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
        assert answer["error"]["type"] == "invalid_request_error"
    status, _, answer = raw(srv.http_port, "POST", "/v1/chat/completions", {"model": "math", "messages": []})
    assert status == 400 and "messages: List should have at least 1 item" in answer["error"]["message"]
    one = {"model": "math", "messages": [{"role": "user"}]}
    status, _, answer = raw(srv.http_port, "POST", "/v1/chat/completions", one)
    assert status == 400 and "messages.0.content: Field required" in answer["error"]["message"]
    for model, words in (("math", "unknown role robot"), ("tiny-chat", "unknown role robot")):
        with pytest.raises(openai.BadRequestError, match=words):  # the template's own refusal
            oai(srv).chat.completions.create(model=model, messages=[{"role": "robot", "content": "hi"}])
    assert raw(srv.http_port, "GET", "/v1/nothing")[0] == 404 and raw(srv.http_port, "GET", "/v1/completions")[0] == 405


def test_loading_is_503_and_a_base_without_a_chat_template_refuses_messages(
    text_base: Path, server_registry: Path
) -> None:
    s = http_server(text_base, server_registry).open()
    try:
        status, headers, answer = raw(s.http_port, "POST", "/v1/completions", {"model": "math", "prompt": PROMPT})
        assert status == 503 and headers["retry-after"] == "1" and "loading" in answer["error"]["message"]
        assert raw(s.http_port, "GET", "/health")[0] == 503
        s.load()
        status, _, answer = raw(s.http_port, "GET", "/health")
        assert (status, answer) == (200, {"status": "SERVING"})
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            oai(s).chat.completions.create(model="tiny-text", messages=CHAT)
        assert oai(s).completions.create(model="tiny-text", prompt=PROMPT, max_tokens=2).choices[0].text
    finally:
        s.stop(grace=1)


# -- limits, disconnects, shutdown --------------------------------------------------------------------------
@pytest.fixture
def one_slot(text_base: Path, server_registry: Path) -> Iterator[Server]:
    """One batch row and a queue of one, no auth."""
    s = http_server(text_base, server_registry, max_batch=1, max_queue=1, max_seq_len=4096).start()
    yield s
    s.stop(grace=1)


LONG = {"model": "math", "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}


def test_full_queue_is_429_with_retry_after(one_slot: Server) -> None:
    with client(one_slot, None) as g:
        running = g.stream(PROMPT, adapters=["math"], max_new_tokens=4000, ignore_eos=True)
        next(iter(running))  # it holds the only row
        waiting = g.stream(PROMPT, adapters=["math"], max_new_tokens=4000, ignore_eos=True)  # the call starts here
        end = time.monotonic() + 30
        while one_slot.engine.counts() != (1, 1):  # type: ignore[union-attr]
            assert time.monotonic() < end
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue is full") as info:
            oai(one_slot, None).completions.create(model="math", prompt=PROMPT, max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1" and info.value.body["code"] == "capacity_exceeded"
        running.cancel()
        waiting.cancel()
    wait_idle(one_slot)


def test_disconnect_frees_the_row(one_slot: Server) -> None:
    """A client that goes away mid-stream, or while waiting for a whole answer, ends its generation: the row is
    free again long before 4000 tokens, the call is no longer in flight, and it counts as cancelled."""
    before = scrape(one_slot)
    conn, resp = open_stream(one_slot.http_port, LONG)
    assert next(events(resp))["choices"][0]["token_ids"]
    conn.close()  # mid-stream
    wait_idle(one_slot)
    conn = http.client.HTTPConnection("127.0.0.1", one_slot.http_port, timeout=0.5)
    conn.request("POST", "/v1/completions", body=json.dumps(LONG), headers={"content-type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()  # the whole answer would take long: the client gives up waiting
    conn.close()
    wait_idle(one_slot)
    assert oai(one_slot, None).completions.create(model="math", prompt=PROMPT, max_tokens=3, extra_body={
        "ignore_eos": True}).usage.completion_tokens == 3  # fmt: skip
    after = scrape(one_slot)
    key = ("hotswap_requests_total", (("adapter", "math@1"), ("api", "http"), ("status", "cancelled")))
    assert after[key] - before.get(key, 0) == 2
    tokens = ("hotswap_generated_tokens_total", (("adapter", "math@1"), ("api", "http")))
    assert after[tokens] - before.get(tokens, 0) < 1000


def test_sigterm_drains_an_http_stream(chat_base: Path, server_registry: Path, tmp_path: Path) -> None:
    """`hotswap serve --http-port`: SIGTERM turns /health 503 and refuses new requests (503) while a stream in
    flight runs to its end; then the process exits 0."""
    config = tmp_path / "serve.toml"
    config.write_text(
        f'base = "{chat_base}"\nregistry = "{server_registry}"\nno_auth = true\nport = 0\nmetrics_port = 0\n'
        "http_port = 0\ngrace = 120\nmax_batch = 2\nmax_seq_len = 2048\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "hotswap.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"OpenAI API http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line + proc.stderr.read()  # type: ignore[union-attr]
        port = int(match.group(1))
        conn, resp = open_stream(port, {**LONG, "max_tokens": 300})
        stream = events(resp)
        tokens = len(next(stream)["choices"][0]["token_ids"])
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while raw(port, "GET", "/health")[0] != 503:
            assert time.monotonic() < end
            time.sleep(0.05)
        status, _, answer = raw(port, "POST", "/v1/completions", {"model": "math", "prompt": PROMPT})
        assert status == 503 and "shutting down" in answer["error"]["message"]
        rest = list(stream)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert tokens + sum(len(e["choices"][0]["token_ids"]) for e in rest[:-1]) == 300
        conn.close()
        assert proc.wait(timeout=60) == 0
        out, err = proc.communicate()
        assert "shutting down" in out
        assert re.search(r"Completions adapter=math@1 status=ok prompt_tokens=\d+ tokens=300 finish=length", err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- metrics ------------------------------------------------------------------------------------------------
def test_http_requests_land_in_the_same_series_with_api_http(srv: Server) -> None:
    before = scrape(srv)
    with client(srv) as g:
        g.generate(PROMPT, adapters=["long"], max_new_tokens=4, ignore_eos=True)
    c = oai(srv)
    for _ in range(2):
        c.completions.create(model="long", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    list(c.chat.completions.create(model="long", messages=CHAT, max_tokens=4, stream=True,
                                   extra_body={"ignore_eos": True}))  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="long@7", prompt=PROMPT)
    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("hotswap_requests_total", adapter="long@1", status="ok", api="http") == 3
    assert delta("hotswap_requests_total", adapter="long@1", status="ok", api="grpc") == 1
    assert delta("hotswap_requests_total", adapter="unresolved", status="not_found", api="http") == 1
    for hist in ("queue_wait", "time_to_first_token", "request_duration"):
        assert delta(f"hotswap_{hist}_seconds_count", adapter="long@1", api="http") == 3
    assert delta("hotswap_inter_token_latency_seconds_count", adapter="long@1", api="http") == 3 * 3
    assert delta("hotswap_generated_tokens_total", adapter="long@1", api="http") == 12
    assert all(dict(labels)["api"] in ("grpc", "http") for name, labels in after if name == "hotswap_requests_total")
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)  # /metrics on the API's port too
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'hotswap_requests_total{adapter="long@1",api="http",status="ok"}' in text


def test_tls_covers_the_http_api(text_base: Path, server_registry: Path, tmp_path: Path) -> None:
    """With --tls-cert/--tls-key the HTTP API is HTTPS too: tokens never travel in clear."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, cert = self_signed_cert(openssl, tmp_path)
    s = http_server(text_base, server_registry)
    s = Server(replace(s.config, tls_cert=cert, tls_key=key)).start()
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", s.http_port, timeout=30,
                                           context=ssl.create_default_context(cafile=str(cert)))  # fmt: skip
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            raw(s.http_port, "GET", "/health")  # plaintext to the TLS port gets no answer
    finally:
        s.stop(grace=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--http-metrics"], "http_metrics serves /metrics on the HTTP API's port: give http_port too"),
        (["--ray", "--http-port", "0"], "Ray Serve's HTTP proxy needs a fixed --http-port"),
        (["--ray", "--http-port", "8000", "--http-metrics"], "with --ray, Ray's metrics endpoint has them"),
        (["--http-port", "8000", "--ray-http-port", "8001"], "give it or --ray-http-port"),
    ],
)
def test_serve_refuses_http_settings_that_cannot_work(
    text_base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    from hotswap.cli import main, serve

    monkeypatch.setattr(serve, "_stop_on_signals", lambda stop: None)  # keep pytest's own handlers
    assert main(["serve", "--base", str(text_base), "--no-auth", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
