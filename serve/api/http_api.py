"""The OpenAI wire format of :mod:`hotswap.serve.api.http`: request bodies (pydantic, so a malformed body is a 400
naming its field), their translation into a ``hotswap.v1`` GenerateRequest (the servicer core's input, so every
check of a generation is the gRPC one), and the answers' JSON.

Every adapter is a model: ``model`` is the base's name (:attr:`ServerConfig.model_name`) or an adapter ref
(``math``, ``math@2``, ``math:prod``, ``acme/tone``). What the OpenAI API has no field for travels as extra body
fields, named as in the gRPC request: ``adapters`` (a weighted list, ``[{"ref": "math@2", "weight": 1.0}]``),
``rank`` (methods trained at nested ranks), ``top_k``, ``stop_token_ids``, ``ignore_eos``. OpenAI fields hotswap
does not implement are refused when set (``logprobs``, ``n`` other than 1, penalties ...), never ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hotswap.errors import InvalidArgument, quote
from hotswap.serve.api.servicer import FINISH_FROM_PB
from hotswap.serve.engine.types import MAX_SEED, FinishReason
from hotswap.v1 import hotswap_pb2 as pb

UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Count = Annotated[int, Field(ge=1, le=2**32 - 1)]
# OpenAI's finish_reason for each of hotswap's (OpenAI has no "cancelled")
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop"}


class _Body(BaseModel):
    # strict: "5" is not a number; forbid: a misspelt or unsupported field is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class WeightedAdapter(_Body):
    ref: str
    weight: float = 1.0


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What completions and chat completions share."""

    model: str = Field(min_length=1)
    max_tokens: Count | None = None  # unset: the engine's default, as gRPC
    temperature: float = 1.0  # OpenAI's default (gRPC's is 0, greedy)
    top_p: float | None = None  # unset: the engine's default, as gRPC
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    # hotswap's own, as the gRPC request has them (the openai client sends them with extra_body)
    adapters: list[WeightedAdapter] | None = None
    rank: Count | None = None
    top_k: UInt32 = 0
    stop_token_ids: list[UInt32] = Field(default_factory=list)
    ignore_eos: bool = False
    # OpenAI's that hotswap does not implement: refused unless unset or off
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        return ["logprobs", "frequency_penalty", "presence_penalty", "logit_bias"]


class CompletionBody(_Generation):
    """``POST /v1/completions``: one prompt, as text or token ids (a list of one prompt is one prompt)."""

    prompt: str | list[UInt32] | list[str] | list[list[UInt32]]
    echo: bool | None = None
    best_of: Literal[1] | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return [*super().unsupported(), "echo", "suffix"]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Generation):
    """``POST /v1/chat/completions``: ``messages`` rendered by the base tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> list[str]:
        return [*super().unsupported(), "top_logprobs"]


Body = CompletionBody | ChatBody


def adapters_of(body: Body, base: str) -> list[tuple[str, float]]:
    """The request's adapters: ``adapters`` where given (``model`` then names the base or their first entry),
    else ``model`` itself unless it is the base."""
    if body.adapters is None:
        return [] if body.model == base else [(body.model, 1.0)]
    first = body.adapters[0].ref if body.adapters else base
    if body.model not in (base, first):
        raise InvalidArgument(
            f"model must be the base {base!r} or the first of adapters ({first!r}) when adapters is given, "
            f"got {quote(body.model)}"
        )
    return [(a.ref, a.weight) for a in body.adapters]


def route_key(body: Body, base: str) -> str:
    """Ray's routing id of ``body``: its first adapter's ref as written ("" for the base), as for gRPC."""
    if body.adapters is not None:
        return body.adapters[0].ref if body.adapters else ""
    return "" if body.model == base else body.model


def generate_request(body: Body, base: str) -> pb.GenerateRequest:
    """``body`` as the gRPC request it means; the checks of its values are the core's (``to_request``)."""
    for name in body.unsupported():
        if getattr(body, name) not in (None, False, 0, {}):
            raise InvalidArgument(f"{name} is not supported by hotswap; leave it unset")
    if body.n != 1:
        raise InvalidArgument(f"n must be 1 (one choice per request; send several requests), got {body.n}")
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options is only for stream = true")
    msg = pb.GenerateRequest(
        adapters=[pb.WeightedAdapter(ref=ref, weight=w) for ref, w in adapters_of(body, base)],
        temperature=body.temperature,
        top_k=body.top_k,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
    )
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody):
        msg.messages.extend(pb.ChatMessage(role=m.role, content=m.text) for m in body.messages)
        if body.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != body.max_completion_tokens:
                raise InvalidArgument("give max_completion_tokens or max_tokens, not two different values")
            max_tokens = body.max_completion_tokens
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a list of prompts
            if len(prompt) != 1:
                raise InvalidArgument(f"prompt: one prompt per request, got a list of {len(prompt)}")
            prompt = prompt[0]  # type: ignore[assignment]
        if isinstance(prompt, str):
            msg.prompt = prompt
        else:
            msg.prompt_ids.extend(prompt)  # type: ignore[arg-type]
    if max_tokens is not None:
        msg.max_new_tokens = max_tokens
    for name in ("top_p", "seed", "rank"):
        if (value := getattr(body, name)) is not None:
            setattr(msg, name, value)
    return msg


def usage(response: pb.GenerateResponse) -> dict[str, int]:
    prompt, completion = response.usage.prompt_tokens, response.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """The JSON of one request's answer: the whole of it, or its stream's chunks. Besides OpenAI's fields, each
    choice carries ``token_ids`` and the answer the ``adapters`` as resolved (exact versions, weights)."""

    def __init__(self, body: Body) -> None:
        self.chat = isinstance(body, ChatBody)
        self.rpc = "ChatCompletions" if self.chat else "Completions"
        self.model = body.model
        self.usage = body.stream_options is not None and body.stream_options.include_usage
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._role_sent = False

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, token_ids: list[int], finish: str | None, delta: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if self._role_sent else {"role": "assistant", "content": text}
            self._role_sent = True
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**choice, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}

    def whole(self, response: pb.GenerateResponse) -> dict[str, Any]:
        choice = self._choice(response.text, list(response.token_ids), _finish(response), delta=False)
        return {**self._head(False), "choices": [choice], "usage": usage(response), **_resolved(response)}

    def chunk(self, piece: pb.GenerateChunk) -> dict[str, Any]:
        """A chunk of the stream: the tokens of ``piece`` and the text they add."""
        out = {**self._head(True), "choices": [self._choice(piece.text, list(piece.token_ids), None, delta=True)]}
        return {**out, "usage": None} if self.usage else out

    def last(self, piece: pb.GenerateChunk) -> list[dict[str, Any]]:
        """The stream's last chunks: the text held back and the finish reason; then usage, if asked for."""
        response = piece.response
        choice = self._choice(piece.text, [], _finish(response), delta=True)
        out = [{**self._head(True), "choices": [choice], **_resolved(response)}]
        if self.usage:
            out = [{**out[0], "usage": None}, {**self._head(True), "choices": [], "usage": usage(response)}]
        return out


def _finish(response: pb.GenerateResponse) -> str:
    return FINISH[FINISH_FROM_PB[response.finish_reason]]


def _resolved(response: pb.GenerateResponse) -> dict[str, Any]:
    return {"adapters": [{"ref": a.ref, "weight": a.weight} for a in response.adapters]}
