"""Training data: JSONL files and built-in synthetic tasks, as token-id examples with a digest.

JSONL: one object per line, either ``{"prompt": ..., "completion": ...}`` (loss on the completion
tokens only), ``{"text": ...}`` (loss on every token) or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(a conversation, the format of OpenAI's fine-tuning API and TRL's conversational datasets: rendered by the
base tokenizer's own chat template, exactly as serving renders a chat, with loss on every assistant turn
through the template's end-of-turn token, and none on the system and user turns). Any other key is an
error (a typo such as ``"completon"`` must not silently train on nothing); blank lines are skipped. Text
needs a base with a tokenizer, conversations one with a chat template.

Built-in tasks (``builtin:NAME``) are token-id tasks that a small random-init model learns in seconds
on CPU, so tests and demos show learning without downloads or a tokenizer. Each task is one fixed
function (the same for every seed); the seed only picks which examples a split draws.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap.basemodel import encode_prompt
from hotswap.errors import InvalidArgument
from hotswap.serve.engine.chat import has_template, template_ids
from hotswap.serve.engine.types import check_messages

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"
_TASK_SEED = 1234  # defines the tasks themselves (e.g. the mapping); never varies
_FIRST = 10  # task symbols are token ids _FIRST.._FIRST+n (inside any vocabulary of >= 64 tokens)
_MARK, _SEP = 5, 6


CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    prompt: list[int]  # context tokens (no loss)
    completion: list[int]  # target tokens (loss, and accuracy on built-in tasks)
    # Which completion tokens are scored, where not all are: a multi-turn conversation's user turns between
    # its assistant turns. None: every completion token.
    scored: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        assert self.scored is None or len(self.scored) == len(self.completion)

    @property
    def answer(self) -> tuple[list[int], list[int]]:
        """(the context, the last scored run of tokens): what a model is asked and must answer, e.g. a
        conversation's last assistant turn after everything before it."""
        if self.scored is None:
            return self.prompt, self.completion
        end = len(self.scored) - self.scored[::-1].index(True)
        start = end - 1
        while start > 0 and self.scored[start - 1]:
            start -= 1
        return self.prompt + self.completion[:start], self.completion[start:end]


@dataclass(frozen=True)
class Dataset:
    name: str
    examples: list[Example]
    digest: str  # sha256 of the token ids as consumed, recorded in the adapter's lineage

    @classmethod
    def of(cls, name: str, examples: list[Example]) -> Dataset:
        if not examples:
            raise InvalidArgument(f"{name}: no examples")
        h = hashlib.sha256()
        for ex in examples:
            record = [ex.prompt, ex.completion] if ex.scored is None else [ex.prompt, ex.completion, ex.scored]
            h.update(json.dumps(record).encode())
        return cls(name, examples, "sha256:" + h.hexdigest())


def _mapping(rng: random.Random, n: int) -> list[Example]:
    """A fixed random bijection on 32 symbols: [MARK, x] -> [f(x)]."""
    symbols = list(range(_FIRST, _FIRST + 32))
    image = symbols[:]
    random.Random(_TASK_SEED).shuffle(image)
    f = dict(zip(symbols, image, strict=True))
    return [Example([_MARK, x], [f[x]]) for x in (rng.choice(symbols) for _ in range(n))]


def _reverse(rng: random.Random, n: int) -> list[Example]:
    """[MARK, a, b, c, d, SEP] -> [d, c, b, a] over 8 symbols."""
    out = []
    for _ in range(n):
        seq = [rng.randrange(_FIRST, _FIRST + 8) for _ in range(4)]
        out.append(Example([_MARK, *seq, _SEP], seq[::-1]))
    return out


def _modadd(rng: random.Random, n: int) -> list[Example]:
    """[a, b, SEP] -> [(a + b) mod 10], digits as tokens _FIRST.._FIRST+9."""
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(Example([_FIRST + a, _FIRST + b, _SEP], [_FIRST + (a + b) % 10]))
    return out


BUILTIN_TASKS: dict[str, Callable[[random.Random, int], list[Example]]] = {
    "mapping": _mapping,
    "reverse": _reverse,
    "modadd": _modadd,
}


def builtin(name: str, n: int, seed: int) -> Dataset:
    if name not in BUILTIN_TASKS:
        raise InvalidArgument(f"unknown built-in task {name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    return Dataset.of(f"{BUILTIN_PREFIX}{name}", BUILTIN_TASKS[name](random.Random(seed), n))


def _text_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TextCodec:
    """How text becomes ids for this base: prompts as the engine encodes them (leading bos), completions
    bare, then eos so the model learns to stop; conversations through the chat template
    (``hotswap.serve.engine.chat.template_ids``; None when the tokenizer has none)."""

    encode_prompt: Callable[[str], list[int]]
    encode_text: Callable[[str], list[int]]
    eos_id: int | None
    render_chat: Callable[[list[dict[str, str]], bool], list[int]] | None = None  # (messages, generation prompt)


def text_codec(tokenizer: PreTrainedTokenizerBase | None, config: PretrainedConfig) -> TextCodec | None:
    """The codec of a base with this tokenizer and model config (None: the base has no tokenizer)."""
    if tokenizer is None:
        return None
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return TextCodec(
        encode_prompt=lambda text: encode_prompt(tokenizer, text, config.bos_token_id),
        encode_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        eos_id=eos,
        render_chat=(lambda messages, opened: template_ids(tokenizer, messages, generation_prompt=opened))
        if has_template(tokenizer)
        else None,
    )


def _chat_example(codec: TextCodec, messages: object, where: str) -> Example:
    """A conversation as one example: its text up to the last assistant turn, scored on every assistant turn.

    Turn i's tokens are what the template adds to ``messages[:i]`` rendered with the assistant's turn opened
    (the very prompt serving renders for that conversation) when ``messages[i]`` is appended, cut after its
    last end-of-turn (eos) token: whatever the template writes after it (a newline) is context, not answer."""
    if codec.render_chat is None:
        raise InvalidArgument(f"{where}: messages need a base whose tokenizer has a chat template")
    if not isinstance(messages, list):
        raise InvalidArgument(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    try:
        check_messages(messages)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise InvalidArgument(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InvalidArgument(f"{where}: no assistant message (nothing to learn)")
    if (empty := next((i for i in turns if not messages[i]["content"].strip()), None)) is not None:
        raise InvalidArgument(f"{where}: messages[{empty}] (assistant) is empty")
    ids = codec.render_chat(messages[: turns[-1] + 1], False)
    scored = [False] * len(ids)
    for i in turns:
        opened = codec.render_chat(messages[:i], True)
        closed = codec.render_chat(messages[: i + 1], False)
        if ids[: len(closed)] != closed or closed[: len(opened)] != opened:
            raise InvalidArgument(f"{where}: the chat template does not render a conversation turn by turn")
        turn = closed[len(opened) :]
        if codec.eos_id in turn:
            turn = turn[: len(turn) - turn[::-1].index(codec.eos_id)]
        scored[len(opened) : len(opened) + len(turn)] = [True] * len(turn)
        end = len(opened) + len(turn)
    first = scored.index(True)
    kept = tuple(scored[first:end])
    return Example(ids[:first], ids[first:end], None if all(kept) else kept)


def load_jsonl(path: Path, codec: TextCodec | None) -> Dataset:
    """Read a JSONL file; ``codec`` None means the base has no tokenizer, which text data needs."""
    if codec is None:
        raise InvalidArgument(f"{path}: text data needs a base with a tokenizer (or use builtin:TASK)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidArgument(f"data file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InvalidArgument(f"{where}: expected a JSON object, got {type(record).__name__}")
        keys = set(record)
        if keys == {"messages"}:
            examples.append(_chat_example(codec, record["messages"], where))
            continue
        if keys == {"prompt", "completion"}:
            prompt = codec.encode_prompt(_text_field(record, "prompt", where))
            completion = codec.encode_text(_text_field(record, "completion", where))
        elif keys == {"text"}:
            prompt = codec.encode_prompt("")
            completion = codec.encode_text(_text_field(record, "text", where))
        else:
            raise InvalidArgument(
                f"{where}: expected keys prompt+completion, text or messages, got {sorted(keys)} "
                "(unknown keys are refused)"
            )
        if not completion:
            raise InvalidArgument(f"{where}: empty completion")
        if codec.eos_id is not None:
            completion = [*completion, codec.eos_id]
        examples.append(Example(prompt, completion))
    if not examples:
        raise InvalidArgument(f"{path}: no records (the file is empty)")
    return Dataset.of(str(path), examples)


def load_data(spec: str, codec: TextCodec | None, *, size: int = 512, seed: int = 0) -> Dataset:
    """``builtin:NAME`` (``size`` examples drawn with ``seed``) or a JSONL path."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin(spec.removeprefix(BUILTIN_PREFIX), size, seed)
    return load_jsonl(Path(spec), codec)
