"""Documents and plain completions: the text the model reads, what of it is trained, and long documents in chunks.

No chat template is involved. A document (continued pretraining) is trained whole and ends with EOS, so the model
learns where a text stops; a plain completion trains its completion and EOS after the prompt::

    document     [BOS] The cat sat on the mat.</s>          every token trained (BOS is context)
    completion   [BOS] Q: 2+2? A: 4</s>                     " 4</s>" trained, the prompt is context

BOS is there exactly when the tokenizer puts it in front of plain text (Llama, Mistral, Gemma do; Qwen and GPT-2 do
not), as it does for such a prompt at inference. A document longer than ``--max_length`` becomes consecutive chunks
that together cover it (:func:`chunk_bounds`); each chunk is an example of its own, packed and attended to alone
like any other.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from trainer.data.items import Completion, Document
from trainer.data.templates import Example, TemplateError


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts plain text with its BOS token."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and ids[0] == tokenizer.bos_token_id


class PlainText:
    """Text and trained spans of documents and plain completions, for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
        self.eos = tokenizer.eos_token

    def example(self, item: Document | Completion) -> Example:
        if not self.eos:
            raise TemplateError("the tokenizer has no EOS token: documents and plain completions end with EOS, so "
                                "that the model learns where a text stops; use a tokenizer that defines one")
        if isinstance(item, Document):
            text = self.bos + item.text + self.eos
            return Example(text, ((len(self.bos), len(text)),))
        text = self.bos + item.prompt + item.completion + self.eos
        return Example(text, ((len(self.bos) + len(item.prompt), len(text)),))


def chunk_bounds(length: int, max_length: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges covering a document of ``length`` tokens, each at most ``max_length`` long.

    Consecutive chunks overlap by one token: the first token of a chunk is the last of the one before, given again
    as context. The loss predicts each token from those before it, so the first token of any example is never a
    target; with the overlap every token of the document but its very first is a target exactly once, and none is
    lost at a chunk boundary.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 to split a document, got {max_length}")
    bounds, start = [], 0
    while True:
        end = min(start + max_length, length)
        bounds.append((start, end))
        if end == length:
            return bounds
        start = end - 1
