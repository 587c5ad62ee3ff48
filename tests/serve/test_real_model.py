"""A real instruct model served end to end: SmolLM2-135M-Instruct (imported from its GGUF file, ``real_base``)
answers chats over gRPC and over the OpenAI HTTP API exactly as transformers' own greedy ``generate`` does on
the same rendered prompt (``apply_chat_template(..., add_generation_prompt=True)``), token for token, while the
requests share batches. Where the model ends its answer with <|im_end|> (eos) the server stops there: finish
reason "stop", the eos neither in the tokens nor in the text; otherwise it stops at the limit with "length".

Short questions, a system message and a multi-turn conversation; the tiny random bases of the other tests
cannot show this: their answers never end and their text means nothing."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hotswap.basemodel import load_model, load_tokenizer
from hotswap.serve import Engine, Request
from hotswap.serve.api.server import Server
from tests.serve.serverutil import client, make_server

pytestmark = pytest.mark.real

N = 24  # max new tokens
EOS = 2  # <|im_end|>
Answer = tuple[list[int], str, str]  # (token ids without the eos, text, finish reason)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


CHATS = [
    user("What is the capital of France?"),  # these four end before N
    user("What is 2 + 2?"),
    user("Answer with one word: what color is grass?"),
    user("What is 3 times 3?"),
    user("Say hello."),
    user("Write a haiku about the sea."),
    [
        {"role": "system", "content": "You are a pirate. Answer in one short sentence."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    [
        {"role": "user", "content": "Hi, my name is Ana."},
        {"role": "assistant", "content": "Nice to meet you, Ana!"},
        {"role": "user", "content": "What is my name?"},
    ],
]


def hf_answer(model: PreTrainedModel, tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Answer:
    """transformers' greedy ``generate`` on one chat (no padding): (tokens without the eos, their text, finish)."""
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])  # (1, L)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()  # (<= N,)
    stop = new[-1] == EOS
    assert stop or len(new) == N
    tokens = new[:-1] if stop else new
    assert tokens and EOS not in tokens
    return tokens, tok.decode(new, skip_special_tokens=True), "stop" if stop else "length"


@pytest.fixture(scope="module")
def expected(real_base: Path) -> list[Answer]:
    """Every chat's answer by transformers itself, computed before the server starts."""
    tok, model = load_tokenizer(real_base), load_model(real_base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one row at a time: a second thread costs ~6x as soon as another process is busy
    try:
        answers = [hf_answer(model, tok, messages) for messages in CHATS]
    finally:
        torch.set_num_threads(threads)
    reasons = [reason for _, _, reason in answers]
    assert reasons.count("stop") >= 4 and reasons.count("length") >= 3  # both endings are covered
    assert "Paris" in answers[0][1]  # a real model indeed
    return answers


@pytest.fixture(scope="module")
def srv(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real base, no adapters, no auth, gRPC and HTTP on free ports of 127.0.0.1; a batch holds every chat."""
    config = make_server(real_base, tmp_path_factory.mktemp("registry"), max_batch=len(CHATS)).config
    s = Server(replace(config, http_port=0)).start()
    yield s
    s.stop(grace=1)


def test_grpc_answers_are_transformers_generate(expected: list[Answer], srv: Server) -> None:
    with client(srv, token=None) as c, ThreadPoolExecutor(len(CHATS)) as pool:
        got = list(pool.map(lambda messages: c.generate(messages=messages, max_new_tokens=N), CHATS))
    for messages, g, (tokens, text, reason) in zip(CHATS, got, expected, strict=True):
        assert (g.token_ids, g.finish_reason) == (tokens, reason), messages
        assert g.text == text and "<|im_end|>" not in g.text
        assert g.completion_tokens == len(tokens)


def test_http_chat_answers_are_transformers_generate(srv: Server, real_base: Path, expected: list[Answer]) -> None:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert c.models.list().data[0].id == real_base.name  # the base, named after its directory

    def chat(messages: list[dict[str, str]]) -> openai.types.chat.ChatCompletion:
        return c.chat.completions.create(model=real_base.name, messages=messages, max_tokens=N, temperature=0)

    with ThreadPoolExecutor(len(CHATS)) as pool:
        got = list(pool.map(chat, CHATS))
    for messages, g, (tokens, text, reason) in zip(CHATS, got, expected, strict=True):
        choice = g.choices[0]
        assert (choice.message.content, choice.finish_reason) == (text, reason), messages
        assert "<|im_end|>" not in choice.message.content and choice.message.role == "assistant"
        assert g.usage.completion_tokens == len(tokens)


def test_nf4_answers_are_transformers_generate_on_the_nf4_model(real_base: Path, tmp_path: Path) -> None:
    """The real base quantized to NF4 at load still answers correctly, token for token as transformers' greedy
    generate on the same NF4 model."""
    pytest.importorskip("bitsandbytes")
    tok, model = load_tokenizer(real_base), load_model(real_base, quantize="nf4")
    chats = CHATS[:3]
    expected = [hf_answer(model, tok, messages) for messages in chats]
    assert "Paris" in expected[0][1] and "4" in expected[1][1]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in chats]
    with Engine(real_base, tmp_path / "registry", max_batch=len(chats), max_seq_len=256, quantize="nf4") as engine:
        got = engine.generate([Request(prompt_ids=p, max_new_tokens=N) for p in prompts])
    assert [(g.token_ids, g.finish_reason.value) for g in got] == [(t, r) for t, _, r in expected]
