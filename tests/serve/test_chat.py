"""Chat requests (``messages``) on a base shaped like a real checkpoint: sharded safetensors, a BPE tokenizer
with a chat template. The engine, the gRPC server, the Python client and ``hotswap generate --chat``
answer a chat exactly as they answer its rendered prompt_ids; a base without a template refuses chats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import cli
from hotswap.basemodel import SAFE_INDEX, fingerprint, load_model, load_tokenizer
from hotswap.client import build_request
from hotswap.errors import MAX_MESSAGE_CHARS, InvalidArgument
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.serve.api.server import Server
from hotswap.serve.engine.chat import NO_TEMPLATE, has_template, render
from hotswap.serve.engine.types import MAX_MESSAGES, MAX_ROLE_CHARS
from hotswap.train import RandomLoraConfig, random_lora
from tests.chatbase import CHAT_TEMPLATE, chat_tokenizer, save_chat_base
from tests.serve.serverutil import client, make_server

CHAT = [
    {"role": "system", "content": "answer in four words"},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "what is two plus two"},
]
N = 8  # new tokens per request


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_base(tmp_path_factory.mktemp("bases") / "chat")


@pytest.fixture(scope="module")
def chat_registry(chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("chat-registry")
    lora = random_lora(chat_base, d / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.3))
    Registry(d / "registry").publish(lora, "tutor", base_fingerprint=fingerprint(chat_base))
    return d / "registry"


@pytest.fixture(scope="module")
def rendered(chat_base: Path) -> list[int]:
    """CHAT's prompt ids, rendered by transformers itself from the saved tokenizer (not through hotswap)."""
    tokenizer = load_tokenizer(chat_base)
    assert tokenizer.chat_template == CHAT_TEMPLATE  # saved with the base
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert isinstance(ids, list) and ids[0] == 0 and ids[-1] == 5  # <s> ... <|assistant|>
    return ids


@pytest.fixture(scope="module")
def chat_engine(chat_base: Path, chat_registry: Path) -> Iterator[Engine]:
    with Engine(chat_base, chat_registry, max_batch=4, max_seq_len=128) as eng:
        yield eng


@pytest.fixture(scope="module")
def chat_server(chat_base: Path, chat_registry: Path) -> Iterator[Server]:
    srv = make_server(chat_base, chat_registry).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def plain_server(text_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A base whose (real, MiniLM) tokenizer has no chat template."""
    assert not has_template(load_tokenizer(text_base))
    srv = make_server(text_base, tmp_path_factory.mktemp("empty-registry")).start()
    yield srv
    srv.stop(grace=1)


# -- the request and the rendering -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "1-1024 messages"),
        ([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1), "1-1024 messages"),
        ("hello", "messages must be a list"),
        (["hello"], "messages[0] must be a dict"),
        ([{"role": "user"}], "messages[0] must have exactly the keys role and content"),
        ([CHAT[0], {"role": "user", "content": "x", "name": "bob"}], "messages[1] must have exactly the keys"),
        ([{"role": "", "content": "x"}], "messages[0].role must be a string of 1-64"),
        ([{"role": "r" * (MAX_ROLE_CHARS + 1), "content": "x"}], "messages[0].role"),
        ([{"role": 3, "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string, got NoneType"),
    ],
)
def test_request_refuses_malformed_messages_naming_the_field(messages: object, words: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        Request(messages=messages)  # type: ignore[arg-type]
    assert words in str(e.value)


_JUNK = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=70), st.binary(max_size=3), st.lists(st.text())
)
_KEYS = st.one_of(st.sampled_from(["role", "content", "name"]), st.integers(), st.text())
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.text(max_size=70), _JUNK), "content": st.one_of(st.text(), _JUNK)}),
    st.dictionaries(_KEYS, _JUNK, max_size=3),
    _JUNK,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(messages=st.one_of(st.lists(_MESSAGE, max_size=4), _JUNK))
def test_any_messages_are_valid_or_one_line_invalid_argument(messages: object) -> None:
    try:
        r = Request(messages=messages)  # type: ignore[arg-type]
    except InvalidArgument as e:
        assert len(str(e)) <= MAX_MESSAGE_CHARS and "\n" not in str(e) and "messages" in str(e)
        return
    assert isinstance(r.messages, list) and 0 < len(r.messages) <= MAX_MESSAGES
    for m in r.messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str)
        assert isinstance(m["role"], str) and 0 < len(m["role"]) <= MAX_ROLE_CHARS


def test_request_takes_exactly_one_of_prompt_prompt_ids_and_messages() -> None:
    assert Request(messages=CHAT).messages == CHAT
    for extra in ({"prompt": "x"}, {"prompt_ids": [1]}):
        with pytest.raises(InvalidArgument, match="exactly one of prompt"):
            Request(messages=CHAT, **extra)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="exactly one of prompt"):
        Request()


def test_render_is_the_tokenizers_own_template_with_the_generation_prompt() -> None:
    tok = chat_tokenizer()
    ids = render(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == (
        "<s><|system|>answer in four words</s><|user|>hello, how are you?</s><|assistant|>fine thanks</s>"
        "<|user|>what is two plus two</s><|assistant|>"
    )


def test_render_refuses_without_a_template_or_when_the_template_refuses() -> None:
    for tokenizer in (None, chat_tokenizer(template=None)):
        with pytest.raises(InvalidArgument) as e:
            render(tokenizer, CHAT)
        assert str(e.value) == NO_TEMPLATE
    with pytest.raises(InvalidArgument, match="chat template refused them: unknown role robot"):
        render(chat_tokenizer(), [{"role": "robot", "content": "beep"}])


# -- the engine ---------------------------------------------------------------------------------------
def test_engine_answers_a_chat_as_its_rendered_prompt_and_as_hf(
    chat_base: Path, chat_engine: Engine, rendered: list[int]
) -> None:
    assert (chat_base / SAFE_INDEX).is_file() and not (chat_base / "model.safetensors").exists()
    params = dict(max_new_tokens=N, ignore_eos=True)
    results = chat_engine.generate(
        [
            Request(messages=CHAT, **params),  # type: ignore[arg-type]
            Request(prompt_ids=rendered, **params),  # type: ignore[arg-type]
            Request(messages=CHAT, adapters=["tutor"], **params),  # type: ignore[arg-type]
            Request(prompt_ids=rendered, adapters=["tutor"], **params),  # type: ignore[arg-type]
        ]
    )
    chat, ids, chat_lora, ids_lora = results
    assert chat.token_ids == ids.token_ids and chat.text == ids.text and len(chat.token_ids) == N
    assert chat_lora.token_ids == ids_lora.token_ids and chat_lora.adapters == [("tutor@1", 1.0)]
    assert chat_lora.token_ids != chat.token_ids  # the adapter did change the answer
    assert chat.prompt_tokens == len(rendered)
    assert chat.text  # real text, not only special tokens (which decode to nothing)
    # the sharded checkpoint is served as transformers itself computes it: greedy over full forwards
    model = load_model(chat_base)
    seq = torch.tensor([rendered])  # (1, L)
    with torch.no_grad():
        for _ in range(N):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (1, L+1)
    assert seq[0, len(rendered) :].tolist() == chat.token_ids


def test_engine_refuses_chats_on_a_base_without_a_template(text_base: Path, chat_engine: Engine) -> None:
    with Engine(text_base, max_batch=1, max_seq_len=64) as eng, pytest.raises(InvalidArgument) as e:
        eng.submit(Request(messages=CHAT))
    assert str(e.value) == NO_TEMPLATE
    with pytest.raises(InvalidArgument, match="unknown role robot"):
        chat_engine.submit(Request(messages=[{"role": "robot", "content": "beep"}]))


# -- gRPC, the Python client and the CLI -------------------------------------------------------------
def test_server_answers_messages_as_the_engine(chat_server: Server, chat_engine: Engine, rendered: list[int]) -> None:
    [expected] = chat_engine.generate([Request(prompt_ids=rendered, adapters=["tutor"], max_new_tokens=N)])
    with client(chat_server, token=None) as c:
        got = c.generate(messages=CHAT, adapters=["tutor"], max_new_tokens=N)
        stream = c.stream(messages=CHAT, adapters=["tutor"], max_new_tokens=N)
        chunks = list(stream)
        with pytest.raises(InvalidArgument, match="unknown role robot"):
            c.generate(messages=[{"role": "robot", "content": "beep"}])
        with pytest.raises(InvalidArgument, match="exactly one of prompt"):
            c.generate("hello", messages=CHAT)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.prompt_tokens == len(rendered)
    assert [t for ch in chunks for t in ch.token_ids] == expected.token_ids
    assert stream.response is not None and stream.response.text == expected.text


def test_server_without_a_template_refuses_messages_with_invalid_argument(plain_server: Server) -> None:
    with client(plain_server, token=None) as c, pytest.raises(InvalidArgument) as e:
        c.generate(messages=CHAT)
    assert str(e.value) == NO_TEMPLATE


def test_client_checks_messages_before_sending() -> None:
    assert [(m.role, m.content) for m in build_request(messages=CHAT[:2]).messages] == [
        (m["role"], m["content"]) for m in CHAT[:2]
    ]
    for bad in (["hi"], [{"role": "user"}], [{"role": "user", "content": 1}]):
        with pytest.raises(InvalidArgument, match=r"messages\[0\]"):
            build_request(messages=bad)  # type: ignore[arg-type]


def test_generate_chat_command(
    chat_server: Server, plain_server: Server, capsys: pytest.CaptureFixture[str], chat_engine: Engine
) -> None:
    target = f"127.0.0.1:{chat_server.port}"
    system, user = "answer in four words", "what is two plus two"
    expected = chat_engine.generate(
        [Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": user}], max_new_tokens=N)]
    )[0]
    args = ["generate", "--server", target, "--max-new-tokens", str(N), "--chat", "--system", system]
    assert cli.main([*args, user]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    assert cli.main([*args, "--json", "--stream", user]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["token_ids"] == expected.token_ids and data["prompt_tokens"] == expected.prompt_tokens
    # one-line refusals: --chat sends the prompt text; --system only with --chat; a base without a template
    for argv in (
        ["generate", "--server", target, "--chat", "--prompt-ids", "1,2"],
        ["generate", "--server", target, "--system", "be brief", user],
        ["generate", "--server", f"127.0.0.1:{plain_server.port}", "--chat", user],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hotswap: error: ") and err.count("\n") == 1
    assert NO_TEMPLATE in err
