"""Reference for :mod:`hotswap.serve.engine.detok`: the same interface, decoding the whole output again on every token
(O(n²) per stream). The test oracle (tests/serve/test_detok.py); nothing serves with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ReferenceDetokenizer:
    """Like :class:`~hotswap.serve.engine.detok.Detokenizer`, by full re-decode."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.stopped = False
        self.sent = ""

    @property
    def text(self) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        self.tokens.append(token)
        self.stopped = self.stopped or any(s in self.text for s in self.stop)
        return self.stopped

    def feed(self, token: int) -> str:
        if self.add(token) or self.tokenizer is None:
            return ""
        text = self.text
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back the longest tail that is a proper prefix of s
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : safe], text[:safe]
        return delta

    def final_text(self) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.text
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text

    def rest(self, final_text: str) -> str:
        return final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
