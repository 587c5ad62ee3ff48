"""The incremental detokenizer against its reference (full re-decode on every token) on random token streams of
the real MiniLM tokenizer: the same text, the same stop decision and the same stream deltas at every token,
stop strings spanning token boundaries and multi-byte characters included; and bounded decode work per token.
Byte-level and SentencePiece-style tokenizers (built here: MiniLM has no byte tokens) cover characters cut
across tokens."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hotswap.basemodel import bundled_tokenizer
from hotswap.serve.engine.detok import CONTEXT_TOKENS, Detokenizer, cut_at_stops
from hotswap.serve.engine.detok_ref import ReferenceDetokenizer

# Pieces where decoding is tricky: special tokens (dropped), multi-byte characters, "##" continuations,
# punctuation and the pieces of "do n't" / "x's" that Python-level cleanup joins across tokens.
TRICKY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused3]", "日", "本", "語", "ß", "—", "€", "あ",
          "##あ", "™", "°", "##s", "##ing", "##a", "'", "n", "t", "s", "m", "do", ".", ",", "!", "?", "...", "-",
          "a", "ab"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(text_base: Path) -> object:
    tok = bundled_tokenizer(text_base)
    assert tok is not None
    return tok


def _stream(rng: random.Random, tok: object, n: int) -> list[int]:
    tricky = tok.convert_tokens_to_ids(TRICKY)  # type: ignore[attr-defined]
    vocab = len(tok)  # type: ignore[arg-type]
    return [rng.choice(tricky) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(n)]


def _stops(rng: random.Random, text: str) -> list[str]:
    """Stop strings: pieces of the stream's own text (so they occur, often across a token boundary), and some
    that may never occur."""
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            start = rng.randrange(len(text) // 3, len(text))
            stops.append(text[start : start + rng.randint(1, 8)])
        else:
            stops.append(rng.choice(["' s", "日本", "n't", "a a", "##", "—€", ". ", "x"]))
    return stops


@pytest.mark.parametrize("seed", range(300))
def test_stream_matches_full_redecode(tokenizer: object, seed: int) -> None:
    rng = random.Random(seed)
    ids = _stream(rng, tokenizer, rng.randint(1, 60))
    stop = _stops(rng, tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    fast, ref = Detokenizer(tokenizer, stop), ReferenceDetokenizer(tokenizer, stop)  # type: ignore[arg-type]
    deltas, fed = [], []
    for token in ids:
        fed.append(token)
        delta = fast.feed(token)
        assert delta == ref.feed(token)
        assert fast.text == ref.text and fast.stopped == ref.stopped
        deltas.append(delta)
        if fast.stopped:  # the engine ends the request on this token
            break
    final = fast.final_text()
    assert final == ref.final_text() == cut_at_stops(tokenizer.decode(fed, skip_special_tokens=True), stop)  # type: ignore[attr-defined]
    assert fast.rest(final) == ref.rest(final)  # type: ignore[arg-type]
    assert "".join(deltas) + fast.rest(final) == final  # type: ignore[arg-type, operator]


@pytest.mark.parametrize("seed", range(100))
def test_engine_side_matches_full_redecode(tokenizer: object, seed: int) -> None:
    """The engine's use: add() per token (decoding only when there are stop strings), the final text at the end."""
    rng = random.Random(1000 + seed)
    ids = _stream(rng, tokenizer, rng.randint(1, 60))
    stop = _stops(rng, tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    fast, ref = Detokenizer(tokenizer, stop), ReferenceDetokenizer(tokenizer, stop)  # type: ignore[arg-type]
    for token in ids:
        assert fast.add(token) == ref.add(token)
        if ref.stopped:
            break
    assert fast.final_text() == ref.final_text()


@pytest.mark.parametrize("seed", range(100))
def test_rewriting_cleanup_stays_exact(tokenizer: object, seed: int) -> None:
    """With Python-level clean_up_tokenization_spaces a later token rewrites earlier text ("do n ' t" -> "don't"):
    the text and the stop decision still equal a full decode at every token."""
    tok = copy.deepcopy(tokenizer)
    tok.clean_up_tokenization_spaces = True  # type: ignore[attr-defined]
    rng = random.Random(2000 + seed)
    ids = _stream(rng, tok, rng.randint(1, 60))
    stop = _stops(rng, tok.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    fast, ref = Detokenizer(tok, stop), ReferenceDetokenizer(tok, stop)  # type: ignore[arg-type]
    for token in ids:
        fast.feed(token)
        ref.add(token)
        assert fast.text == ref.text and fast.stopped == ref.stopped
        if ref.stopped:
            break
    assert fast.final_text() == ref.final_text()


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style: every byte is a token (shown as a printable character), some merged pieces besides."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<eos>", *sorted(alphabet), "Ġthe", "Ġa", "æĹ¥", "ĠæĹ¥æľ¬", "ðŁĺ", "'s"])}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _sentencepiece() -> PreTrainedTokenizerFast:
    """Llama 2 style: "▁" for a space (the text's first one stripped), unknown characters as <0xXX> byte tokens."""
    pieces = ["<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁the", "the", "▁日本", "語", "ж", "▁a", "a"]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(pieces)}, [], byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _run(tok: PreTrainedTokenizerFast, ids: list[int], stop: list[str]) -> tuple[Detokenizer, list[str]]:
    """Stream ``ids`` through both; the text and stop decision agree at every token, except that while the text
    ends in a partial character the incremental one may show that character otherwise; the final texts agree."""
    fast, ref = Detokenizer(tok, stop), ReferenceDetokenizer(tok, stop)
    deltas = []
    for token in ids:
        deltas.append(fast.feed(token))
        ref.add(token)
        assert fast.stopped == ref.stopped
        assert fast.text == ref.text or ref.text.endswith("\ufffd")
        if ref.stopped:
            break
    assert fast.final_text() == ref.final_text()
    return fast, deltas


@pytest.mark.parametrize("make", [_byte_level, _sentencepiece])
@pytest.mark.parametrize("seed", range(100))
def test_characters_cut_across_tokens(make: object, seed: int) -> None:
    """Random ids, so partial and invalid UTF-8 everywhere; stop strings from the text (none holding U+FFFD)."""
    tok = make()  # type: ignore[operator]
    rng = random.Random(3000 + seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
    stop = [s for s in _stops(rng, tok.decode(ids, skip_special_tokens=True)) if "\ufffd" not in s]
    fast, deltas = _run(tok, ids, stop)
    final = fast.final_text()
    if make is _byte_level:  # its decode never rewrites earlier text, so the stream is always a prefix
        assert "".join(deltas) + fast.rest(final) == final  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(100))
def test_byte_fallback_stream(seed: int) -> None:
    """SentencePiece with byte fallback on text a model would write (characters outside the vocabulary as their
    UTF-8 bytes, consecutive): the stream concatenates to the final text."""
    tok = _sentencepiece()
    rng = random.Random(4000 + seed)
    text = "".join(rng.choice(["the", " the", " a", " 日本", "語", "ж", " ", "é", "😀", "ß", "€"]) for _ in range(12))
    ids = tok.encode(text, add_special_tokens=False)
    stop = _stops(rng, text)
    fast, deltas = _run(tok, ids, stop)
    final = fast.final_text()
    assert "".join(deltas) + fast.rest(final) == final  # type: ignore[arg-type]


def test_decode_work_per_token_is_bounded(tokenizer: object) -> None:
    """A 2,000-token stream decodes a bounded window per token, not the whole output again (O(n), not O(n²)),
    and all of it once at the end."""
    decoded = []
    original = tokenizer.decode  # type: ignore[attr-defined]

    def decode(ids: list[int], **kw: object) -> str:
        decoded.append(len(ids))
        return original(ids, **kw)

    tok = copy.deepcopy(tokenizer)
    tok.decode = decode  # type: ignore[attr-defined]
    detok = Detokenizer(tok, ["never occurs"])  # type: ignore[arg-type]
    ids = _stream(random.Random(0), tokenizer, 2000)
    text = "".join(detok.feed(t) for t in ids)
    assert max(decoded) <= CONTEXT_TOKENS + 1 and sum(decoded) < 2 * (CONTEXT_TOKENS + 1) * len(ids)
    decoded.clear()
    assert text + detok.rest(detok.final_text()) == original(ids, skip_special_tokens=True)  # type: ignore[operator]
    assert decoded == [len(ids)]  # the final text: one full decode


def test_without_a_tokenizer_there_is_no_text() -> None:
    detok = Detokenizer(None, [])
    assert detok.feed(5) == "" and not detok.add(6) and detok.final_text() is None and detok.rest("") == ""
