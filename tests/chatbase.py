"""A base shaped like a real chat checkpoint, built offline by tests: sharded safetensors with their index, and
a small byte-level BPE tokenizer (trained here by the ``tokenizers`` library) carrying a Jinja chat template."""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hotswap.basemodel import SAFE_INDEX, build_with_tokenizer

ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
# Known roles only (an unknown one is refused by the template itself), each turn closed by eos, and the
# assistant's turn opened when the generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT = ("the quick brown fox jumps over a lazy dog", "hello world how are you", "fine thanks what is two plus four")
SHARD_SIZE = "100KB"  # the tiny shape's weights in several shards


def chat_tokenizer(template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 320 tokens trained on sentences made of ``TEXT``'s words (any text encodes), with
    ``template``."""
    words = " ".join(TEXT).split()
    sentences = [*TEXT, *(" ".join(p) for p in itertools.permutations(words[:7], 3))]
    sentences += [" ".join(words[i : i + 5]) for i in range(len(words))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>", *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens=list(ROLES)
    )
    fast.chat_template = template
    return fast


def save_chat_base(
    out: Path, *, seed: int = 0, tie_word_embeddings: bool = False, template: str | None = CHAT_TEMPLATE
) -> Path:
    """A tiny base with the vocabulary and special tokens of :func:`chat_tokenizer`, saved the way hub checkpoints
    are: ``model-0000x-of-0000N.safetensors`` + ``model.safetensors.index.json``, and the tokenizer beside them.
    Untied by default: a tied random tiny model mostly echoes the prompt's last token (here the special
    ``<|assistant|>``, which decodes to no text), so its answers would show little."""
    chat_tokenizer(template).save_pretrained(out)
    model, _ = build_with_tokenizer("tiny", str(out), seed=seed, tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    assert (out / SAFE_INDEX).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1, "not sharded"
    return out
