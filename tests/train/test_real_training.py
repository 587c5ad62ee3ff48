"""The real path end to end on SmolLM2-135M-Instruct: a LoRA trained by `hotswap train` on the shipped chat task
(scripts/data/extract-*.jsonl: extract a name and a city as JSON) answers held-out chats exactly where the base
does not, `hotswap eval` and the gate say so, and the server answers as the trained model does, with the prompt
training rendered for the same conversation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hotswap import cli
from hotswap.basemodel import load_tokenizer
from hotswap.registry import Registry
from hotswap.serve.api.server import Server
from hotswap.serve.engine.chat import render
from hotswap.train import TrainConfig, TrainResult, train
from hotswap.train.data import load_jsonl, text_codec
from hotswap.train.evaluation import evaluate_refs
from tests.serve.serverutil import client
from tests.serve.test_http import http_server, oai

pytestmark = [pytest.mark.real, pytest.mark.slow]

DATA = Path(__file__).parents[2] / "scripts" / "data"
TRAIN, HELD_OUT = str(DATA / "extract-train.jsonl"), str(DATA / "extract-eval.jsonl")


@pytest.fixture(scope="module")
def trained(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    """extract@1: the demo's run (16 steps of 8 chats), published to a fresh registry."""
    root = tmp_path_factory.mktemp("real")
    config = TrainConfig(method="lora", steps=16, batch_size=8, lr=2e-3, eval_steps=16)
    result = train(config, real_base, TRAIN, root / "run", eval_data=HELD_OUT, push="extract",
                   registry=root / "registry", quiet=True)  # fmt: skip
    return result, root / "registry"


def test_the_adapter_answers_held_out_chats_the_base_does_not(real_base: Path, trained: tuple) -> None:
    result, registry = trained
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_untrained"] / 4
    scores = evaluate_refs(real_base, ["-", "extract@1"], HELD_OUT, registry=registry)
    base, adapter = scores.scores
    assert base.examples == adapter.examples == 20
    assert base.exact == 0  # the base answers in prose or fenced JSON, never the exact object
    assert adapter.exact >= 10, adapter
    assert adapter.eval_loss == pytest.approx(result.metrics["eval_loss"], abs=1e-3)  # training's own figure
    answer = json.loads(adapter.answers[0])  # well-formed JSON with the record's fields
    assert set(answer) == {"name", "city"}


def test_the_gate_promotes_the_adapter_over_the_base_and_records_it(
    real_base: Path, trained: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    _, registry = trained
    args = ["alias", "extract", "prod", "1", "--if-better-than", "prod", "--eval", HELD_OUT, "--base", str(real_base),
            "--registry", str(registry)]  # fmt: skip
    assert cli.main(args) == 0
    assert "extract:prod -> 1" in capsys.readouterr().out
    (entry,) = Registry(registry).alias_history("extract")
    assert entry["record"]["incumbent"]["resolved"] == "base"
    assert entry["record"]["candidate"]["exact"] > entry["record"]["incumbent"]["exact"] == 0


@pytest.fixture(scope="module")
def srv(real_base: Path, trained: tuple) -> Iterator[Server]:
    server = http_server(real_base, trained[1], max_seq_len=512)
    server.start()
    yield server
    server.stop()


def test_served_prompt_and_answer_are_training_s(real_base: Path, trained: tuple, srv: Server, tmp_path: Path) -> None:
    """For a held-out conversation: the question training rendered is serving's rendering of the chat, the OpenAI
    API renders it to as many tokens and answers as gRPC does from those ids, and that answer is the trained model's
    own greedy answer (recomputed token by token, PEFT's forward)."""
    result, _ = trained
    tok = load_tokenizer(real_base)
    record = json.loads(Path(HELD_OUT).read_text().splitlines()[3])
    messages = record["messages"][:-1]
    (tmp_path / "one.jsonl").write_text(json.dumps(record) + "\n")
    (example,) = load_jsonl(tmp_path / "one.jsonl", text_codec(tok, result.model.config)).examples
    question, _ = example.answer
    assert question == render(tok, messages)
    chat = oai(srv, token=None).chat.completions.create(model="extract@1", messages=messages, max_tokens=32,
                                                        temperature=0)  # fmt: skip
    assert chat.usage.prompt_tokens == len(question)
    with client(srv, token=None) as c:
        grpc = c.generate(prompt_ids=question, adapters=["extract@1"], max_new_tokens=32)
    assert chat.choices[0].message.content == grpc.text and chat.choices[0].finish_reason == grpc.finish_reason
    assert grpc.token_ids == _greedy(result.model, question, len(grpc.token_ids))
    assert json.loads(grpc.text) == json.loads(record["messages"][-1]["content"])


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
