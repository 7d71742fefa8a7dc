"""Conversations → training examples: the rendered text and the character spans the model must learn to say.

The rule is the one inference defines. For each assistant turn ``i`` the model, at inference time, is given::

    before_i  = render(messages[:i], add_generation_prompt=True)     "...<|im_start|>assistant\\n"
    through_i = render(messages[:i + 1])                              "...<|im_start|>assistant\\nHello<|im_end|>\\n"
                                                                                                 └── trained ───┘└ not
and must produce what ``through_i`` adds after ``before_i``: the reply *including its end-of-turn marker*
(``<|im_end|>``, ``</s>``, ``<|return|>``…), or it never learns to stop. Trailing whitespace after the marker is not
trained: generation stops at the marker and never produces it. So the trained text of turn ``i`` is exactly that
difference, *in exactly the context* ``before_i``, and nothing else is trained.

Many templates are prefix-consistent: ``through_i`` is a prefix of the whole rendered conversation for every ``i``,
so one example (the whole conversation, one span per turn) trains every turn in its inference context. Others
re-render history — Qwen3 and DeepSeek-R1 drop the reasoning of earlier turns, Mistral v0.3 moves the system prompt
into the last user turn, gpt-oss ends only the final turn with ``<|return|>`` — and the whole conversation then shows
earlier turns in a context the model never sees at inference. Such a conversation becomes several examples::

    through_j (the latest turn not yet covered) is one example; it trains every turn i <= j whose through_i is a
    prefix of it (turn j itself at least); repeat with the latest turn left.

which is one example for a prefix-consistent template and one per assistant turn for Qwen3-like ones, with the same
number of renders (two per assistant turn) either way. Two published templates render a turn so that its prompt is
*not* a prefix of it; the reply is then derived from a rendering of the turn with a placeholder content (see
:meth:`ChatRenderer._reply`): DeepSeek-R1 distills prompt with ``<think>\n`` and strip reasoning from every turn (the
model must write the reasoning, so the data must have it), Mistral v0.3 moves the system prompt out of history.
A template that writes no end-of-turn marker at all (GLM-4) gets EOS after each reply: a model that never sees
its stop token in training never stops. Templates that mark replies with ``{% generation %}`` are
rendered with those marks as well, and the marked spans must agree with the inference rule (else: an error naming
the turn), so a template's own notion of "assistant text" can never silently differ from what is trained.

Rendering goes through transformers' own ``render_jinja_template`` with the variables ``apply_chat_template`` passes
(the tokenizer's special tokens, then template options such as ``enable_thinking``), so the text is the one inference
renders; ``tests/data/test_published_templates.py`` checks that on the published templates of popular models.
Built-in templates are plain Jinja too: the template used for training is saved with the tokenizer, and
``tokenizer.apply_chat_template`` reproduces the training prompt wherever the model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from trainer.errors import UserError

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

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(UserError, ValueError):
    """A chat template that cannot be used for training on this data (or is missing); the message says why."""


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


@dataclass(frozen=True)
class Example:
    """One training example: the rendered ``text`` and the ``[start, end)`` character spans that are trained."""

    text: str
    spans: tuple[tuple[int, int], ...]


class ChatRenderer:
    """Renders conversations exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` does, and splits
    them into training examples (see the module docstring).

    ``template_kwargs`` are the extra variables a template may read (``enable_thinking`` for Qwen3); as in
    ``apply_chat_template`` they override the tokenizer's special tokens of the same name. Cheap to pickle: worker
    processes get their own copy.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str,
                 template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.template = template
        self.variables = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
        self.marks_generation = bool(_GENERATION_TAG.search(template))
        self.reads_reasoning = any(key in template for key in REASONING_KEYS)
        self.special_tokens = tuple(sorted({t for t in tokenizer.all_special_tokens if t}
                                           | {t.content for t in tokenizer.added_tokens_decoder.values()
                                              if t.special}, key=len, reverse=True))
        self.eos_token = tokenizer.eos_token
        self._compiled = None
        self._marks_checked = 0

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        # transformers' own compiled template, called as render_jinja_template calls it, minus its per-call copy of
        # every message into plain JSON types: validated conversations are plain JSON already (str role and
        # content), and this is the hot loop of data preparation (tests compare with apply_chat_template).
        if self._compiled is None:
            self._compiled = _compile_jinja_template(self.template)
        return self._compiled.render(messages=_with_reasoning_aliases(messages), tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.variables)

    def __getstate__(self) -> dict:  # a compiled template does not pickle: workers compile their own
        return {**self.__dict__, "_compiled": None}

    def render_marked(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans the template itself marks with ``{% generation %}``."""
        rendered, indices = render_jinja_template(conversations=[list(messages)], chat_template=self.template,
                                                  return_assistant_tokens_mask=True, **self.variables)
        return rendered[0], [tuple(span) for span in indices[0]]

    def examples(self, messages: Sequence[Mapping[str, Any]]) -> list[Example]:
        """The training examples of one conversation (see the module docstring), in conversation order."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        before: dict[int, str] = {}
        through: dict[int, str] = {}  # the prompt followed by the reply, as inference sees it
        alone = set()  # turns whose text exists only as (prompt + reply), never inside a rendered conversation
        for i in turns:
            if messages[i].get("reasoning_content") and not self.reads_reasoning:
                raise TemplateError(
                    f"message {i} has reasoning_content, which this chat template never renders (it would be "
                    "dropped); put the reasoning into the content, as the model writes it (e.g. "
                    "'<think>…</think>answer'), or use a template that reads reasoning_content"
                )
            before[i] = self.render(messages[:i], add_generation_prompt=True)
            rendered = self.render(messages[: i + 1])
            if rendered.startswith(before[i]):
                reply = rendered[len(before[i]):]
            else:
                reply = self._reply(messages, i, before[i])
            if reply is None:
                raise TemplateError(_not_a_continuation(i, before[i], rendered))
            if not reply.rstrip().endswith(self.special_tokens) and self.eos_token:
                # No end-of-turn marker (GLM-4 ends a reply only by starting the next turn): the model must
                # still learn to stop, so the reply ends with EOS, a stop token of its generation config.
                reply = reply.rstrip() + self.eos_token
            _check_reasoning_kept(messages[i], reply, i)
            through[i] = before[i] + reply
            if through[i] != rendered:
                alone.add(i)
        examples = []
        left = list(reversed(turns))
        while left:
            text = through[left[0]]
            covered = [left[0]] if left[0] in alone else \
                [i for i in left if i not in alone and text.startswith(through[i])]
            spans = tuple((len(before[i]), len(through[i].rstrip())) for i in reversed(covered))
            if self.marks_generation and left[0] not in alone and self._marks_checked < MARKS_CHECKED:
                self._check_marks(messages[: left[0] + 1], text, spans, [before[i] for i in reversed(covered)])
            examples.append(Example(text, spans))
            left = [i for i in left if i not in covered]
        return examples[::-1]

    def _reply(self, messages: Sequence[Mapping[str, Any]], i: int, before: str) -> str | None:
        """The reply of turn ``i`` after the prompt ``before``, for templates whose prompt is not a prefix of
        their rendering of the turn; None when no reply can be derived.

        Two published patterns, found by rendering the turn with a placeholder content:

        - a prompt that opens something the turn's rendering strips (DeepSeek-R1 distills: the prompt ends with
          ``<think>\n``, the rendered turn drops everything up to ``</think>``): the model writes the content as the
          data has it, minus the opener the prompt already holds, then the turn's end marker;
        - history rendered differently once the conversation ends with the reply (Mistral v0.3 puts the system
          prompt into the last user message only while it is the last message): the reply is the turn's own
          rendering (header, content, end marker), after the prompt as inference renders it.
        """
        placeholder = "\ue000\ue001"
        marked = self.render([*messages[:i], {**messages[i], "content": placeholder}])
        if marked.count(placeholder) != 1:
            return None
        start = marked.index(placeholder)
        end_marker = marked[start + len(placeholder):]
        content = messages[i]["content"]
        opener = before[start:] if before.startswith(marked[:start]) else ""
        if opener:  # the prompt opens the reply itself
            for form in (opener, opener.strip()):
                if form and content.startswith(form):
                    content = content[len(form):]
                    break
            closing = _closing_tag(opener)
            if closing and closing not in content:
                return None  # the reply would leave the opened block (e.g. <think>) unclosed
            return content + end_marker
        rendered = self.render(messages[: i + 1])
        if not (rendered.startswith(marked[:start]) and rendered.endswith(end_marker)):
            return None
        user = next((m["content"].strip() for m in reversed(messages[:i]) if m["role"] == "user"), "")
        at, in_before = marked.rfind(user, 0, start), before.rfind(user)
        if not user or at < 0 or in_before < 0:
            return None
        tail = before[in_before + len(user):]  # what the prompt adds after the user's words, e.g. "[/INST]"
        if marked[at + len(user) : at + len(user) + len(tail)] != tail:
            return None
        header = marked[at + len(user) + len(tail) : start]
        return header + rendered[start : len(rendered) - len(end_marker)] + end_marker

    def _check_marks(self, messages: Sequence[Mapping[str, Any]], text: str, spans: tuple[tuple[int, int], ...],
                     prompts: list[str]) -> None:
        self._marks_checked += 1
        marked_text, marked = self.render_marked(messages)
        ours = [text[a:b].strip() for a, b in spans]
        theirs = [marked_text[a:b].strip() for a, b in marked]
        # Marks may also cover the assistant header that the generation prompt ends with (SmolLM3 does): that part
        # is prompt at inference, so it is left out of training, and the rest must be the same.
        agree = marked_text == text and len(ours) == len(theirs) and all(
            t == o or (t.endswith(o) and prompt.rstrip().endswith(t[: len(t) - len(o)].strip()))
            for o, t, prompt in zip(ours, theirs, prompts))
        if not agree:
            raise TemplateError(
                "the chat template's {% generation %} marks disagree with what inference renders as the reply: "
                f"marked {theirs!r}, but the generation prompt is followed by {ours!r}. Fix the template's marks "
                "(or remove them)."
            )


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Conversations whose {% generation %} marks are checked against the inference rule, per renderer (every worker
# checks its first ones): a template's marks either agree on every conversation or break on the first few.
MARKS_CHECKED = 200


def _with_reasoning_aliases(messages: Sequence[Mapping[str, Any]]) -> list:
    """As transformers passes messages to templates: reasoning under every name a template may read it by."""
    out = []
    for message in messages:
        reasoning = message.get("reasoning_content")
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


def _closing_tag(opener: str) -> str | None:
    """``</think>`` for a prompt that ends by opening ``<think>``."""
    match = re.search(r"<([A-Za-z_][\w-]*)>\s*$", opener)
    return f"</{match[1]}>" if match else None


def _check_reasoning_kept(message: Mapping[str, Any], reply: str, turn: int) -> None:
    """Reasoning in the data must be in what is trained: a template (or option) that drops it is an error."""
    reasoning = message.get("reasoning_content") or ""
    if not reasoning and "</think>" in message["content"]:
        reasoning = message["content"].split("</think>")[0].replace("<think>", "")
    if reasoning.strip() and reasoning.strip() not in reply:
        raise TemplateError(
            f"assistant turn at message {turn} carries reasoning, but the chat template renders that turn without "
            "it, so training would drop it. With --enable_thinking false a thinking template prompts with an empty "
            "thinking block: leave it on (or unset) for reasoning data, or remove the reasoning from the data."
        )


def _not_a_continuation(turn: int, before: str, rendered: str) -> str:
    common = 0
    for a, b in zip(before, rendered):
        if a != b:
            break
        common += 1
    return (
        f"assistant turn at message {turn}: the chat template's generation prompt is not how it renders that turn, "
        f"and no reply can be derived that matches inference. The prompt continues with {before[common:][:80]!r}, "
        f"the rendered turn with {rendered[common:][:80]!r}. This happens when a template forces a prefix the data "
        "lacks: '<think>' in the prompt but no reasoning closed by '</think>' in the answer (add the reasoning to "
        "the content), or a prompt option that contradicts the data (e.g. --enable_thinking false on reasoning)."
    )


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def label_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Which tokens are trained: those whose characters overlap a trained span.

    A tokenizer may merge the newline before an answer with its first characters: that token is trained rather than
    the start of the answer lost. ``spans`` must be sorted and disjoint.
    """
    out, k = [], 0
    for start, end in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        out.append(k < len(spans) and end > spans[k][0])
    return out


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example,
                     max_length: int | None = None) -> Tokenized:
    """Ids and labels of one example: the whole text tokenised once, as ``apply_chat_template`` tokenises it."""
    encoding = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    trained = label_tokens(encoding["offset_mapping"], example.spans)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(input_ids, trained)]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Tokenized(input_ids, labels, truncated)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[Tokenized]:
    """Ids and labels of every training example of one conversation (one for a prefix-consistent template)."""
    renderer = ChatRenderer(tokenizer, template, template_kwargs)
    return [tokenize_example(tokenizer, example, max_length) for example in renderer.examples(messages)]


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase, template: str,
                         template_kwargs: Mapping[str, Any] | None = None) -> int:
    """The token that closes an assistant turn, so that generation can stop where training taught it to."""
    (probe,) = tokenize_conversation(
        tokenizer, template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        template_kwargs=template_kwargs,
    )
    labelled = [t for t, label in zip(probe.input_ids, probe.labels) if label != IGNORE_INDEX]
    return labelled[-1]
