"""One request's generated text, decoded incrementally, and its stop strings: the engine's stop check, the final
text and the streaming text deltas every transport forwards, all from one :class:`Detokenizer` (the request
handle's).

Decoding the whole output again on every token costs O(n²) per stream. Instead, as vLLM and TGI do, each update
decodes a small window: a few tokens already in the text (the window's *context*, whose text is known) and the
new ones; the new text is what the window decodes to beyond its context. Both decodes start at the same token,
so whatever a decode does at its start (WordPiece keeps a leading ``##``, SentencePiece strips a leading space)
happens in both and cancels. The window starts where the text was once committed (never inside a character),
``CONTEXT_TOKENS`` commits back. Against the reference, a full decode (:mod:`hotswap.serve.engine.detok_ref`):

- special tokens never enter the window (decode drops them, and a window of only special tokens would lose the
  space before the next word);
- new text ending in U+FFFD is a partial character: it is pending, decoded again with the next token, and never
  streamed; the text is exact again once the character completes;
- a window whose text does not extend its context's text means the decode rewrote earlier text (Python-level
  ``clean_up_tokenization_spaces`` joins ``do n ' t`` into ``don't``; SentencePiece byte fallback turns a whole
  run of byte tokens into U+FFFD once it turns out invalid): the text is decoded whole once, and the window goes
  on from there. The context is long enough that such a rewrite always shows in the window;
- the final text is one full decode (O(n) once), so it is exact for every decoder.

The stream holds back what may still change or be cut: the pending partial character, and any tail that could
still become a stop string; so the deltas concatenate to a prefix of the final text. Only a rewrite of text
already streamed (the two cases above) can break that: the stream then stops there and the result has the text,
as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTEXT_TOKENS = 4  # commits (>= tokens) decoded again before the new tokens; a cleanup rewrite spans 4 (do n ' t)


def cut_at_stops(text: str, stop: Sequence[str]) -> str:
    """The text a request returns: ``text`` cut before its stop strings, each in turn in the order given."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text


def stop_prefix_len(text: str, end: int, stop: str) -> int:
    """Length of the longest suffix of ``text[:end]`` that is a proper prefix of ``stop`` (could still become it)."""
    i = text.find(stop[0], max(0, end - len(stop) + 1), end)
    while i != -1 and not stop.startswith(text[i:end]):
        i = text.find(stop[0], i + 1, end)
    return 0 if i == -1 else end - i


def skipped_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` drops: the special tokens, named or added."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(tokenizer.all_special_ids) | added


class Detokenizer:
    """The text of one request's generated tokens so far, and whether one of its stop strings occurs in it.

    A request's handle (:class:`~hotswap.serve.engine.request.RequestHandle`) calls :meth:`feed` per token (the stream's
    delta, and :attr:`stopped`), :meth:`final_text` and :meth:`rest` at the end. Without a tokenizer there is no
    text (``final_text`` is None, deltas are empty). Decoding is lazy: without stop strings, :meth:`add` only
    appends.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.stopped = False  # a stop string occurs in the text (the request ends on this token)
        self._skip = skipped_ids(tokenizer) if tokenizer is not None else frozenset()
        self._longest = max(map(len, self.stop), default=0)
        self._tokens: list[int] = []  # every token given
        self._ids: list[int] = []  # the tokens decode keeps
        self._decoded = 0  # ids[:_decoded] are in the text
        self._commits = deque([0], maxlen=CONTEXT_TOKENS + 1)  # recent commit points (ids[:c] made whole text)
        self._context: str | None = ""  # decode(ids[window start:last commit]); None until needed
        self._committed = ""  # the text of ids[:last commit]: it never changes again, except by a rewrite
        self._pending = ""  # the window's text past its context while it ends in a partial character
        self._sent = 0  # feed() returned _committed[:_sent]
        self._diverged = False  # a rewrite changed text already sent: the stream cannot take it back

    @property
    def text(self) -> str:
        """``decode(tokens, skip_special_tokens=True)``, stop strings included ("" without a tokenizer); while it
        ends in a partial character, that character (or, with byte fallback, its run of bytes) may show otherwise."""
        self._catch_up()
        return self._committed + self._pending

    def add(self, token: int) -> bool:
        """Append one generated token; True once a stop string occurs in the text."""
        self._tokens.append(token)
        if token not in self._skip:
            self._ids.append(token)
        if self.stop:
            self._update()
        return self.stopped

    def feed(self, token: int) -> str:
        """Append one token and return the text that became safe to stream: never a partial character, nor a tail
        that could still become a stop string, nor anything once a stop string occurs (:meth:`rest` has it)."""
        self.add(token)
        self._update()
        if self.stopped or self._diverged:
            return ""
        text = self._committed  # never a partial character: that stays pending
        safe = len(text)
        for s in self.stop:
            safe -= stop_prefix_len(text, safe, s)
        if safe <= self._sent:
            return ""
        delta, self._sent = text[self._sent : safe], safe
        return delta

    def final_text(self) -> str | None:
        """The request's text: all tokens decoded at once, cut before its stop strings; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return cut_at_stops(self.tokenizer.decode(self._tokens, skip_special_tokens=True), self.stop)

    def rest(self, final_text: str) -> str:
        """What :meth:`feed` has not returned of ``final_text`` (the result's text), for the stream's last chunk."""
        sent = self._committed[: self._sent]
        return final_text[self._sent :] if not self._diverged and final_text.startswith(sent) else ""

    def _update(self) -> None:
        """Decode what is new and look for the stop strings where the text changed (earlier text was searched)."""
        changed = None if self.stopped else self._catch_up()
        if changed is not None and self.stop:
            start = max(0, changed - self._longest + 1)
            region = self._committed[start:] + self._pending
            self.stopped = any(s in region for s in self.stop)

    def _catch_up(self) -> int | None:
        """Decode the tokens not in the text yet; returns where the text may have changed (None: nothing new)."""
        n = len(self._ids)
        if self.tokenizer is None or n == self._decoded:
            return None
        changed = len(self._committed)
        start, read = self._commits[0], self._commits[-1]
        if self._context is None:
            self._context = self._decode(self._ids[start:read])
        window = self._decode(self._ids[start:])
        self._decoded = n
        if window.endswith("\ufffd"):  # a partial character: decode it again with the next token
            self._pending = window[len(self._context) :]
            return changed
        if window.startswith(self._context):
            self._committed += window[len(self._context) :]
        else:  # the decode rewrote text before the new tokens: decode it whole once
            full = self._decode(self._ids)
            self._diverged = self._diverged or not full.startswith(self._committed[: self._sent])
            self._committed, changed = full, 0
        self._pending, self._context = "", None
        self._commits.append(n)
        return changed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[union-attr]
