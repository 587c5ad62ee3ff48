"""Chat-format training data (``{"messages": [...]}`` records): rendered by the base tokenizer's own chat template
as serving renders a chat, scored on every assistant turn through its end-of-turn token and on nothing else,
and refused in one line naming the file and line when it cannot be trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hotswap import cli
from hotswap.basemodel import load_model, load_tokenizer
from hotswap.errors import InvalidArgument
from hotswap.serve.engine.chat import render
from hotswap.train import TrainConfig, train
from hotswap.train.data import Example, TextCodec, load_jsonl, text_codec
from hotswap.train.loss import IGNORE, collate
from tests.chatbase import chat_tokenizer, save_chat_base

SYSTEM = {"role": "system", "content": "answer in four words"}
TURNS = [
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "what is two plus four"},
    {"role": "assistant", "content": "the quick brown fox"},
]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_base(tmp_path_factory.mktemp("bases") / "chat")


@pytest.fixture(scope="module")
def codec(chat_base: Path) -> TextCodec:
    codec = text_codec(load_tokenizer(chat_base), load_model(chat_base).config)
    assert codec is not None
    return codec


def write(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def one(path: Path, codec: TextCodec, messages: list[dict[str, str]]) -> Example:
    (ex,) = load_jsonl(write(path / "chat.jsonl", {"messages": messages}), codec).examples
    return ex


def scored_text(tok: object, ex: Example) -> list[str]:
    """The scored tokens of ``ex`` as collate labels them, decoded one by one."""
    labels = collate([ex])["labels"][0]
    return [tok.decode([int(t)]) for t in labels[labels != IGNORE]]  # type: ignore[attr-defined]


def test_one_turn_is_the_served_prompt_then_the_answer_and_its_eos(
    chat_base: Path, codec: TextCodec, tmp_path: Path
) -> None:
    tok = load_tokenizer(chat_base)
    messages = [SYSTEM, *TURNS[:2]]
    ex = one(tmp_path, codec, messages)
    assert ex.prompt == render(tok, messages[:-1])  # what serving renders for the conversation so far
    assert ex.scored is None  # every completion token
    assert tok.decode(ex.completion) == "fine thanks</s>"
    assert ex.completion[-1] == tok.eos_token_id  # the template's end of turn: the model learns to stop


def test_every_assistant_turn_is_scored_and_no_user_turn(chat_base: Path, codec: TextCodec, tmp_path: Path) -> None:
    tok = load_tokenizer(chat_base)
    messages = [SYSTEM, *TURNS]
    ex = one(tmp_path, codec, messages)
    assert ex.prompt == render(tok, messages[:2])  # context up to the first assistant turn
    assert "".join(scored_text(tok, ex)) == "fine thanks</s>the quick brown fox</s>"
    # the question of the last turn is the served prompt of the conversation before it
    question, answer = ex.answer
    assert question == render(tok, messages[:-1])
    assert tok.decode(answer) == "the quick brown fox</s>"
    # turns after the last assistant message teach nothing: they are not part of the example
    assert one(tmp_path, codec, [*messages, {"role": "user", "content": "hello"}]) == ex


def test_loss_ignores_the_user_turns_between_answers(chat_base: Path, codec: TextCodec, tmp_path: Path) -> None:
    """Changing a user turn's tokens between two answers leaves the scored positions' labels where they were."""
    ex = one(tmp_path, codec, [SYSTEM, *TURNS])
    labels = collate([ex])["labels"][0]
    user = torch.tensor([not s for s in ex.scored])  # type: ignore[union-attr]
    assert user.any() and (labels[len(ex.prompt) :][user] == IGNORE).all()


def test_conversations_train_through_hotswap_train(chat_base: Path, tmp_path: Path) -> None:
    """The pipeline end to end on the tiny random base (the real model's learning is tests/test_real_model.py's)."""
    data = write(tmp_path / "chat.jsonl", *({"messages": [SYSTEM, *TURNS]} for _ in range(4)))
    result = train(TrainConfig(method="lora", steps=30, lr=3e-2, batch_size=4), chat_base, str(data),
                   tmp_path / "run", quiet=True)  # fmt: skip
    m = result.metrics
    assert m["eval_loss"] < 0.9 * m["eval_loss_untrained"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": []}, "give 1-"),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}, TURNS[1]]}, "role 'robot' is not one of"),
        ({"messages": [TURNS[0], {"role": "assistant", "content": "  "}]}, "messages[1] (assistant) is empty"),
        ({"messages": [TURNS[0], {"role": "assistant", "content": 3}]}, "content must be a string"),
        ({"messages": [TURNS[0], {"role": "assistant"}]}, "exactly the keys role and content"),
        ({"messages": [TURNS[0]], "prompt": "x"}, "expected keys prompt+completion, text or messages"),
    ],
)
def test_bad_records_are_refused_naming_file_and_line(
    codec: TextCodec, tmp_path: Path, record: dict, message: str
) -> None:
    good = {"messages": TURNS[:2]}
    path = write(tmp_path / "chat.jsonl", good, record)
    with pytest.raises(InvalidArgument, match=r"chat\.jsonl:2: ") as e:
        load_jsonl(path, codec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_base_without_a_chat_template_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = save_chat_base(tmp_path / "plain", template=None)
    data = write(tmp_path / "chat.jsonl", {"messages": TURNS[:2]})
    capsys.readouterr()
    code = cli.main(["train", "--method", "lora", "--base", str(base), "--data", str(data), "--steps", "1",
                     "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the --quiet-less run's loading bar
    assert code != 0
    assert err == f"hotswap: error: {data}:1: messages need a base whose tokenizer has a chat template"
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_template_that_does_not_render_turn_by_turn_is_refused(tmp_path: Path) -> None:
    """A template that rewrites earlier turns once a later one exists (here: the last user message shouted) has no
    prefix to train on; refusing is better than scoring the wrong tokens."""
    tok = chat_tokenizer(
        "{% for m in messages %}{% if loop.last and m['role'] == 'user' %}{{ m['content'] | upper }}"
        "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    )
    codec = TextCodec(
        encode_prompt=tok.encode,
        encode_text=tok.encode,
        eos_id=tok.eos_token_id,
        render_chat=lambda messages, opened: tok.apply_chat_template(
            messages, add_generation_prompt=opened, tokenize=True, return_dict=False
        ),
    )
    with pytest.raises(InvalidArgument, match="does not render a conversation turn by turn"):
        load_jsonl(write(tmp_path / "chat.jsonl", {"messages": TURNS[:2]}), codec)
