"""Chat messages -> prompt token ids, through the base tokenizer's own chat template (never one of ours).

The template decides everything about the prompt's format, including a leading bos; the assistant's turn is
opened after the last message (``add_generation_prompt``), so the model's answer is what gets generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from hotswap.errors import InvalidArgument, clip_message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NO_TEMPLATE = "the base's tokenizer has no chat template; send prompt or prompt_ids"


def has_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """Whether ``tokenizer`` can render chat messages."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def template_ids(
    tokenizer: PreTrainedTokenizerBase | None, messages: list[dict[str, str]], *, generation_prompt: bool
) -> list[int]:
    """``apply_chat_template``'s ids of ``messages``, with the assistant's turn opened after them when
    ``generation_prompt``: the one rendering of serving (``render``) and of chat training data. Raises
    InvalidArgument when there is no template or the template refuses the messages."""
    if tokenizer is None or not has_template(tokenizer):
        raise InvalidArgument(NO_TEMPLATE)
    from jinja2 import TemplateError  # transformers' template engine; its raise_exception() raises this

    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    except TemplateError as e:
        raise InvalidArgument(clip_message(f"messages: the base's chat template refused them: {e}")) from e
    ids = out["input_ids"] if isinstance(out, Mapping) else out  # a BatchEncoding where return_dict is ignored
    return [int(t) for t in ids]


def render(tokenizer: PreTrainedTokenizerBase | None, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of ``messages`` (already checked by ``Request``), the assistant's turn opened."""
    ids = template_ids(tokenizer, messages, generation_prompt=True)
    if not ids:
        raise InvalidArgument("messages: the base's chat template rendered them to no tokens")
    return ids
