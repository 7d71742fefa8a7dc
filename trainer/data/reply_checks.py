"""What a rendered turn must keep, so that a template can never drop a part of the data without a word.

Each check takes what the chat template rendered and the message it rendered from, and returns the problem in one
sentence (None when there is none); :class:`trainer.data.templates.ChatRenderer` raises it as a ``TemplateError``.
Templates differ in what they render: Llama 3.1 drops the content of a turn that calls a tool, Gemma 3 and Phi-4
render no tool calls at all, DeepSeek-R1 ignores the tools offered, Qwen3 drops the reasoning of earlier turns.
Training on such a rendering would teach the model a turn the data does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def _answer(content: str | None) -> str:
    """The answer part of a content that may carry its reasoning inline (``<think>…</think>answer``)."""
    return (content or "").split("</think>")[-1].strip()


def rendered_forms(text: str) -> tuple[str, ...]:
    """How a template may write a text: as it is (trimmed), or JSON-encoded (``tojson``, as Llama 3.1 writes tool
    results and gpt-oss its tool messages)."""
    return (text.strip(), json.dumps(text, ensure_ascii=False))


def dropped_content(message: Mapping[str, Any], reply: str, turn: int) -> str | None:
    """An answer the rendered reply does not contain."""
    answer = _answer(message.get("content"))
    if answer and not any(form in reply for form in rendered_forms(answer)):
        what = "a turn that calls tools" if message.get("tool_calls") else "this turn"
        return (f"assistant turn at message {turn}: the chat template renders {what} without its content "
                f"({answer[:40]!r}…), so training would drop it; move that text into a turn of its own or use a "
                "template that renders both")
    return None


def dropped_calls(message: Mapping[str, Any], reply: str, turn: int) -> str | None:
    """A tool call whose function name the rendered reply does not contain (a template that renders no calls)."""
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        if name not in reply:
            return (f"assistant turn at message {turn} calls {name!r}, but the chat template renders that turn "
                    "without the call (it does not render tool_calls): the model would never learn to call it; use "
                    "a chat template with tool calling")
    return None


def dropped_results(messages: Sequence[Mapping[str, Any]], prompt: str, turn: int) -> str | None:
    """A tool result, since the previous assistant turn, that the prompt of ``turn`` does not contain."""
    for j in range(turn - 1, -1, -1):
        message = messages[j]
        if message["role"] == "assistant":
            break
        if message["role"] == "tool" and message["content"].strip() \
                and not any(form in prompt for form in rendered_forms(message["content"])):
            return (f"the tool result at message {j} is missing from the chat template's prompt for the assistant "
                    f"turn at message {turn} (the template does not render tool results): the model would answer "
                    "without seeing it; use a chat template with tool calling")
    return None


def ignored_tools(with_tools: str, without_tools: str | None) -> str | None:
    """A template that renders the same prompt whether tools are offered or not: it never shows them."""
    if with_tools == without_tools:
        return ("the record offers tools but the chat template never renders them (it ignores the 'tools' "
                "variable): the model would learn to call functions it is never shown; use a chat template with "
                "tool calling, or describe the tools in the system message and drop the 'tools' field")
    return None


def tool_result_spans(messages: Sequence[Mapping[str, Any]], text: str) -> tuple[tuple[int, int], ...]:
    """Where the tool results of ``messages`` sit in ``text`` (searched in order), for counting their tokens."""
    spans, at = [], 0
    for message in messages:
        if message["role"] != "tool" or not message["content"].strip():
            continue
        for form in rendered_forms(message["content"]):
            found = text.find(form, at)
            if found >= 0:
                spans.append((found, found + len(form)))
                at = found + len(form)
                break
    return tuple(spans)
