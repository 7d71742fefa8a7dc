"""Conversations → token ids + labels, with loss only on what the assistant says.

One mechanism serves every template, built-in or the tokenizer's own: the conversation is rendered as text
by a Jinja chat template, and the character spans that belong to assistant turns are found by rendering
prefixes of the conversation::

    render(messages[:i], add_generation_prompt=True)  "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
    render(messages[:i+1])                             "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
                                                       "Hello<|im_end|>\\n"
                                                        └── trained ───┘└ not
The difference is the assistant turn *including its end-of-turn marker* (``<|im_end|>``, ``</s>``…), which must
be learned or the model never stops. Trailing whitespace after the marker is not trained: at inference the
model stops at the marker and never generates it.

The full text is then tokenised once, with character offsets, and a token is labelled when it overlaps a
trained span (a tokenizer may merge the newline before an answer with its first characters: that token is
trained rather than losing the start of the answer). Tokenising once (rather than piece by piece) keeps the
ids identical to what ``apply_chat_template(..., tokenize=True)`` gives at inference time, whatever the
tokenizer's prefix-space rules.

Built-in templates are plain Jinja too, so the template used for training is saved with the tokenizer and
``tokenizer.apply_chat_template`` reproduces the training prompt anywhere the model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama-2 chat format, as used by the Tang-poem recipe: the system prompt sits inside the first [INST] block.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{{- (bos_token or '') + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- (bos_token or '') + '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- ' ' + message['content'] + ' ' + (eos_token or '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama2": LLAMA2}


class TemplateError(ValueError):
    """A chat template that cannot be used to find assistant spans (or is missing)."""


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja source for ``--template``: ``auto`` = the tokenizer's own, else a built-in by name."""
    if name == "auto":
        if tokenizer.chat_template:
            return tokenizer.chat_template
        raise TemplateError(
            "--template auto: the tokenizer has no chat template (a base model?). "
            f"Pick a built-in one with --template {'|'.join(BUILTIN_TEMPLATES)}."
        )
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(f"--template {name!r}: unknown; use auto or one of {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[name]


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: Sequence[dict], prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=prompt
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: Sequence[dict]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the ``[start, end)`` character spans of every assistant turn (with end-of-turn)."""
    text = _render(tokenizer, template, messages, prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], prompt=True)
        through = _render(tokenizer, template, messages[: i + 1], prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError(
                "the chat template renders earlier turns differently depending on what follows, so assistant "
                "turns cannot be located; use a built-in template with --template "
                + "|".join(BUILTIN_TEMPLATES)
            )
        answer = through[len(before) :]
        end = len(before) + len(answer.rstrip())
        spans.append((len(before), end))
    return text, spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: Sequence[dict], max_length: int | None = None
) -> Tokenized:
    """Ids and labels for one conversation: labels are ``IGNORE_INDEX`` except on assistant turns."""
    text, spans = assistant_spans(tokenizer, template, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    k = 0
    for t, (start, end) in enumerate(encoding["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and end > spans[k][0]:  # overlaps the span: a token merging "\n" + answer is trained
            labels[t] = input_ids[t]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Tokenized(input_ids, labels, truncated)


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase, template: str) -> int:
    """The token that closes an assistant turn, so that generation can stop where training taught it to."""
    probe = tokenize_conversation(
        tokenizer, template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    )
    labelled = [t for t, label in zip(probe.input_ids, probe.labels) if label != IGNORE_INDEX]
    return labelled[-1]
