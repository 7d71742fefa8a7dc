"""Conversations → training examples: the rendered text and the character spans the model must learn to say.

The rule is the one inference defines. For each assistant turn ``i`` the model, at inference time, is given::

    before_i  = render(messages[:i], add_generation_prompt=True)     "...<|im_start|>assistant\\n"
    through_i = render(messages[:i + 1])                              "...<|im_start|>assistant\\nHello<|im_end|>\\n"
                                                                                                 └── trained ───┘└ not
and must produce what ``through_i`` adds after ``before_i``: the reply *including its end-of-turn marker*
(``<|im_end|>``, ``</s>``, ``<|return|>``…), or it never learns to stop. Whatever follows the reply's stop token
(EOS, or the marker the template writes after an answer: :meth:`ChatRenderer.stop_tokens`) is not trained —
trailing whitespace, or the next turn's header that some templates write after every turn: generation stops at
the marker and never produces it. So the trained text of turn ``i`` is exactly that difference up to its stop,
*in exactly the context* ``before_i``, and nothing else is trained.

Agent trajectories follow the same rule, rendered with the record's ``tools`` (as ``apply_chat_template(messages,
tools=...)``): every assistant turn is trained, tool-call turns included; tool specs and results are context. A
template that would drop part of a turn — its calls, the text beside them, the tool results of its prompt, the
tools offered — is refused with what it drops (:mod:`trainer.data.reply_checks`), and one that refuses a
conversation itself (``raise_exception``) is named, so no turn is ever trained on something the data does not hold.

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

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from trainer.data.reply_checks import (
    dropped_calls,
    dropped_content,
    dropped_results,
    ignored_tools,
    rendered_forms,
    tool_result_spans,
)
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


NO_TEMPLATE = (f"--template auto: the tokenizer has no chat template (a base model?), and chat records need one. "
               f"Pick a built-in one with --template {'|'.join(BUILTIN_TEMPLATES)}.")


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase, required: bool = True) -> str:
    """The Jinja source for ``--template``: ``auto`` = the tokenizer's own, else a built-in by name. A tokenizer
    without a chat template gives ``""`` when not ``required`` (documents and plain completions need none; a chat
    record is then refused, see :meth:`ChatRenderer.render`)."""
    if name == "auto":
        if tokenizer.chat_template:
            return tokenizer.chat_template
        if not required:
            return ""
        raise TemplateError(NO_TEMPLATE)
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(f"--template {name!r}: unknown; use auto or one of {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[name]


@dataclass(frozen=True)
class Example:
    """One training example: the rendered ``text``, the ``[start, end)`` character spans that are trained, and where
    tool results sit in it (context, never trained; counted in the data report)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    tool_spans: tuple[tuple[int, int], ...] = ()


MISSING_REASONING = ("error", "empty")


class ChatRenderer:
    """Renders conversations exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` does, and splits
    them into training examples (see the module docstring).

    ``template_kwargs`` are the extra variables a template may read (``enable_thinking`` for Qwen3); as in
    ``apply_chat_template`` they override the tokenizer's special tokens of the same name. ``missing_reasoning``
    says what to do with a plain answer where the generation prompt opens a reasoning block (``--missing_reasoning``:
    ``error``, or ``empty`` to train the empty block first). Cheap to pickle: worker processes get their own copy.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str,
                 template_kwargs: Mapping[str, Any] | None = None, missing_reasoning: str = "error") -> None:
        if missing_reasoning not in MISSING_REASONING:
            raise ValueError(f"missing_reasoning must be one of {MISSING_REASONING}, got {missing_reasoning!r}")
        self.template = template
        self.variables = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
        self.marks_generation = bool(_GENERATION_TAG.search(template))
        self.reads_reasoning = any(key in template for key in REASONING_KEYS)
        self.special_tokens = tuple(sorted({t for t in tokenizer.all_special_tokens if t}
                                           | {t.content for t in tokenizer.added_tokens_decoder.values()
                                              if t.special}, key=len, reverse=True))
        self.eos_token = tokenizer.eos_token
        self.missing_reasoning = missing_reasoning
        self.arguments_as_text = False  # set for templates that concatenate arguments as text (DeepSeek-V3)
        self._stop_tokens: tuple[str, ...] | None = None
        self._empty_blocks: dict[tuple[str, str], str] = {}
        self._compiled = None
        self._marks_checked = 0

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        # transformers' own compiled template, called as render_jinja_template calls it, minus its per-call copy of
        # every message into plain JSON types: validated conversations are plain JSON already (str role and
        # content), and this is the hot loop of data preparation (tests compare with apply_chat_template).
        if self._compiled is None:
            if not self.template:
                raise TemplateError(NO_TEMPLATE)
            self._compiled = _compile_jinja_template(self.template)
        return self._compiled.render(messages=_template_messages(messages, self.arguments_as_text), tools=tools,
                                     documents=None, add_generation_prompt=add_generation_prompt, **self.variables)

    def __getstate__(self) -> dict:  # a compiled template does not pickle: workers compile their own
        return {**self.__dict__, "_compiled": None}

    def render_marked(self, messages: Sequence[Mapping[str, Any]], tools: list[dict] | None = None
                      ) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans the template itself marks with ``{% generation %}``."""
        rendered, indices = render_jinja_template(
            conversations=[_template_messages(messages, self.arguments_as_text)], tools=tools,
            chat_template=self.template, return_assistant_tokens_mask=True, **self.variables)
        return rendered[0], [tuple(span) for span in indices[0]]

    def examples(self, messages: Sequence[Mapping[str, Any]], tools: list[dict] | None = None,
                 first_trained: int = 0) -> list[Example]:
        """The training examples of one conversation (see the module docstring), in conversation order: every
        assistant turn from message ``first_trained`` on, rendered with ``tools`` offered."""
        try:
            return self._examples(messages, tools, first_trained)
        except TypeError as error:
            # A template that concatenates arguments as text ("'<｜tool▁sep｜>' + arguments", DeepSeek-V3) cannot
            # take them as an object; it is given them as JSON text, the form its model was served with.
            if self.arguments_as_text or "dict" not in str(error) or not any(m.get("tool_calls") for m in messages):
                raise TemplateError(f"the chat template failed on this conversation: {error}") from None
            self.arguments_as_text = True
            try:
                return self._examples(messages, tools, first_trained)
            except TypeError as again:
                self.arguments_as_text = False
                raise TemplateError(f"the chat template failed on this conversation: {again}") from None

    def _examples(self, messages: Sequence[Mapping[str, Any]], tools: list[dict] | None,
                  first_trained: int) -> list[Example]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
        before: dict[int, str] = {}
        through: dict[int, str] = {}  # the prompt followed by the reply, as inference sees it
        trained: dict[int, int] = {}  # how much of the reply is trained: up to its stop token
        alone = set()  # turns whose text exists only as (prompt + reply), never inside a rendered conversation
        for i in turns:
            if messages[i].get("reasoning_content") and not self.reads_reasoning:
                raise TemplateError(
                    f"message {i} has reasoning_content, which this chat template never renders (it would be "
                    "dropped); put the reasoning into the content, as the model writes it (e.g. "
                    "'<think>…</think>answer'), or use a template that reads reasoning_content"
                )
            before[i] = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            if tools and i == turns[0]:
                _raise_if(ignored_tools(before[i], self._render_or_none(messages[:i])))
            _raise_if(dropped_results(messages, before[i], i))
            rendered = self.render(messages[: i + 1], tools=tools)
            if rendered.startswith(before[i]):
                reply = rendered[len(before[i]):]
            else:
                reply = self._reply(messages, i, before[i], tools)
            if reply is None:
                raise TemplateError(_not_a_continuation(i, before[i], rendered))
            said, tail = self._until_stop(reply)
            if not said.rstrip().endswith(self.special_tokens) and self.eos_token:
                # No end-of-turn marker (GLM-4 ends a reply only by starting the next turn): the model must
                # still learn to stop, so the reply ends with EOS, a stop token of its generation config.
                said, tail = said.rstrip() + self.eos_token, ""
            _check_reasoning_kept(messages[i], said, i)
            _raise_if(dropped_content(messages[i], said, i) or dropped_calls(messages[i], said, i))
            through[i] = before[i] + said + tail
            trained[i] = len(before[i]) + len(said.rstrip())
            if through[i] != rendered:
                alone.add(i)
        examples = []
        has_results = any(m["role"] == "tool" for m in messages)
        left = list(reversed(turns))
        while left:
            text = through[left[0]]
            covered = [left[0]] if left[0] in alone else \
                [i for i in left if i not in alone and text.startswith(through[i])]
            spans = tuple((len(before[i]), trained[i]) for i in reversed(covered))
            if self.marks_generation and left[0] not in alone and self._marks_checked < MARKS_CHECKED:
                self._check_marks(messages[: left[0] + 1], text, spans, [before[i] for i in reversed(covered)],
                                  tools)
            results = tool_result_spans(messages[: left[0]], text) if has_results else ()
            examples.append(Example(text, spans, results))
            left = [i for i in left if i not in covered]
        return examples[::-1]

    def _render_or_none(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        """The generation prompt without tools, or None where the template cannot render one (Hermes' tool-use
        template requires tools)."""
        try:
            return self.render(messages, add_generation_prompt=True)
        except Exception:  # whatever the template raises: it renders tools, which is all this asks
            return None

    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens that end a reply: EOS, and the marker the template writes right after an answer (found by
        rendering a one-turn probe). Generation stops at them, so nothing after one of them is ever produced."""
        if self._stop_tokens is None:
            stops = {self.eos_token} if self.eos_token else set()
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\ue003"}]
            try:
                after = self.render(probe)
            except Exception:  # a template that cannot render the probe (it needs reasoning, a system prompt...)
                after = ""
            after = after[after.find("\ue003") + 1:].lstrip() if "\ue003" in after else ""
            stops |= {t for t in self.special_tokens if after.startswith(t)}
            self._stop_tokens = tuple(sorted(stops, key=len, reverse=True))
        return self._stop_tokens

    def _until_stop(self, reply: str) -> tuple[str, str]:
        """``reply`` split after its last stop token: what the model says, and what the template writes after it
        (a next-turn header some templates append to every turn), which is context, never trained."""
        stops = self.stop_tokens()
        end = max((reply.rfind(t) + len(t) for t in stops if t in reply), default=-1)
        if end < 0 or not reply[end:].strip():
            return reply, ""
        return reply[:end], reply[end:]

    def _reply(self, messages: Sequence[Mapping[str, Any]], i: int, before: str,
               tools: list[dict] | None = None) -> str | None:
        """The reply of turn ``i`` after the prompt ``before``, for templates whose prompt is not a prefix of
        their rendering of the turn; None when no reply can be derived.

        Two published patterns, found by rendering the turn with a placeholder content:

        - a prompt that opens something the turn's rendering strips (DeepSeek-R1 distills: the prompt ends with
          ``<think>\n``, the rendered turn drops everything up to ``</think>``): the model writes the content as the
          data has it, minus the opener the prompt already holds, then the turn's end marker. A plain answer (no
          ``</think>``) has no such reply; with ``--missing_reasoning empty`` it is given the empty reasoning block
          (:meth:`_empty_block`) first;
        - history rendered differently once the conversation ends with the reply (Mistral v0.3 puts the system
          prompt into the last user message only while it is the last message): the reply is the turn's own
          rendering (header, content, end marker), after the prompt as inference renders it.
        """
        placeholder = "\ue000\ue001"
        marked = self.render([*messages[:i], {**messages[i], "content": placeholder}], tools=tools)
        if marked.count(placeholder) == 1:
            start = marked.index(placeholder)
            end_marker = marked[start + len(placeholder):]
            content = messages[i]["content"] or ""
            opener = before[start:] if before.startswith(marked[:start]) else ""
            if opener:  # the prompt opens the reply itself
                closing = _closing_tag(opener)
                if closing and closing not in content:
                    if self.missing_reasoning != "empty":
                        raise TemplateError(_missing_reasoning(i, opener, closing))
                    answer = content
                    content = self._empty_block(opener, closing, i) + content
                    check = self.render([*messages[:i], {**messages[i], "content": content}], tools=tools)
                    if answer.strip() + end_marker not in check:
                        raise TemplateError(f"assistant turn at message {i}: --missing_reasoning empty: the chat "
                                            "template does not render a turn that starts with an empty reasoning "
                                            f"block {content[: len(content) - len(answer)]!r} as that answer "
                                            "followed by its end marker, so the block cannot be trained")
                for form in (opener, opener.strip()):
                    if form and content.startswith(form):
                        content = content[len(form):]
                        break
                return content + end_marker
        rendered = self.render(messages[: i + 1], tools=tools)
        # The generation prompt as the template writes it after history; the turn's rendering starts with it too,
        # right after the message before the turn, which the template may write differently when it is not last
        # (Hermes ends a last tool result without the newline it writes otherwise; gpt-oss drops the analysis of a
        # tool call once a final answer follows): the reply is what follows that header in the turn's rendering.
        history = self.render(messages[:i], tools=tools)
        header = before[len(history):] if before.startswith(history) else ""
        previous = (messages[i - 1].get("content") or "").strip() if i else ""
        if header.strip() and previous:
            anchor = max((rendered.rfind(form) + len(form) for form in rendered_forms(previous)
                          if form in rendered), default=-1)
            at = rendered.find(header, anchor) if anchor >= 0 else -1
            if at >= 0:
                return rendered[at + len(header):]
        # The turn rendered after the last user message: its own rendering (header, content or calls, end marker)
        # follows what the prompt adds after the user's words (e.g. Mistral's "[/INST]").
        user = next((m["content"].strip() for m in reversed(messages[:i]) if m["role"] == "user"), "")
        at, in_before = rendered.rfind(user), before.rfind(user)
        if not user or at < 0 or in_before < 0:
            return None
        tail = before[in_before + len(user):]
        if rendered[at + len(user) : at + len(user) + len(tail)] != tail:
            return None
        return rendered[at + len(user) + len(tail):]

    def _empty_block(self, opener: str, closing: str, turn: int) -> str:
        """The empty reasoning block for a plain answer, as the template itself writes one: a literal such as
        ``'<think>\n\n</think>\n\n'`` in its source (Qwen3's non-thinking prompt), else the opener closed the way
        those templates close it (``<think>\n`` + ``\n</think>\n\n``). Refused when the prompt opens more than a bare
        tag (prefilled text), which has no empty form."""
        if (opener, closing) in self._empty_blocks:
            return self._empty_blocks[opener, closing]
        tag = opener.strip()
        if not re.fullmatch(r"<[A-Za-z_][\w-]*>", tag):
            raise TemplateError(f"assistant turn at message {turn}: --missing_reasoning empty: the chat template's "
                                f"prompt opens {opener!r}, which has no empty form to train")
        found = (match[0].replace("\\n", "\n") for match in
                 re.finditer(re.escape(tag) + r"(?:\\n|\s)*" + re.escape(closing) + r"(?:\\n|\s)*", self.template))
        block = next((b for b in found if b.startswith(opener)), None) or \
            (f"{opener}\n{closing}\n\n" if opener.endswith("\n") else f"{opener}\n\n{closing}\n\n")
        self._empty_blocks[opener, closing] = block
        return block

    def _check_marks(self, messages: Sequence[Mapping[str, Any]], text: str, spans: tuple[tuple[int, int], ...],
                     prompts: list[str], tools: list[dict] | None = None) -> None:
        self._marks_checked += 1
        marked_text, marked = self.render_marked(messages, tools)
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


def _raise_if(problem: str | None) -> None:
    if problem:
        raise TemplateError(problem)


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Conversations whose {% generation %} marks are checked against the inference rule, per renderer (every worker
# checks its first ones): a template's marks either agree on every conversation or break on the first few.
MARKS_CHECKED = 200


def _template_messages(messages: Sequence[Mapping[str, Any]], arguments_as_text: bool = False) -> list:
    """As transformers passes messages to templates: reasoning under every name a template may read it by; with
    ``arguments_as_text``, tool-call arguments as JSON text (for templates that concatenate them)."""
    out = []
    for message in messages:
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if arguments_as_text and message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {**call, "function": {**call["function"],
                                      "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                for call in message["tool_calls"]]}
        out.append(message)
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


def _missing_reasoning(turn: int, opener: str, closing: str) -> str:
    return (f"assistant turn at message {turn} has no reasoning, but the chat template's generation prompt opens "
            f"{opener.strip()!r}, so the model writes reasoning closed by {closing!r} before every answer: add the "
            f"reasoning (reasoning_content, or '{opener.strip()}…{closing}' before the answer), or pass "
            "--missing_reasoning empty to train the template's empty reasoning block before the answer")


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
        "the content), a prompt option that contradicts the data (e.g. --enable_thinking false on reasoning), or a "
        "template that renders tool-call turns unlike its own generation prompt (DeepSeek-R1's writes a second "
        "tool-call turn without its assistant header), which cannot train such a trajectory."
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
    """The token that closes an assistant turn, so that generation can stop where training taught it to (EOS where
    there is no chat template: documents and plain completions end with it)."""
    if not template:
        return tokenizer.eos_token_id
    # A plain answer, with the empty reasoning block where the prompt opens one (R1 distills): only its end counts.
    renderer = ChatRenderer(tokenizer, template, template_kwargs, missing_reasoning="empty")
    (example,) = renderer.examples([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    probe = tokenize_example(tokenizer, example)
    labelled = [t for t, label in zip(probe.input_ids, probe.labels) if label != IGNORE_INDEX]
    return labelled[-1]
