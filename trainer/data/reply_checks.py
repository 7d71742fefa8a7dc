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
    """A tool call the rendered reply does not hold: its function name fewer times than the turn calls it (a template
    that renders no calls, or only the first: gpt-oss, Llama 3.x raise or keep one), or one of its argument values
    missing (however the template writes arguments: JSON, XML tags, Python calls, each scalar value is in it)."""
    calls = message.get("tool_calls") or []
    for call in calls:
        name = call["function"]["name"]
        wanted = sum(1 for c in calls if c["function"]["name"] == name)
        if reply.count(name) < wanted:
            many = f"{wanted} calls to {name!r}" if wanted > 1 else f"a call to {name!r}"
            return (f"assistant turn at message {turn} makes {many}, but the chat template renders that turn "
                    f"with {reply.count(name)} (it renders no tool calls, or only the first of parallel calls): the "
                    "model would learn a different turn; use a chat template that renders every call, or split "
                    "parallel calls into consecutive turns")
        for key, value in _scalars(call["function"]["arguments"]):
            if not any(form in reply for form in _value_forms(value)):
                return (f"assistant turn at message {turn}: the chat template renders the call to {name!r} without "
                        f"its argument {key}={value!r}: the model would learn a different call")
    return None


def _scalars(arguments: object, path: str = "") -> list[tuple[str, object]]:
    """The scalar values of a call's arguments, with where they sit."""
    if isinstance(arguments, dict):
        return [pair for k, v in arguments.items() for pair in _scalars(v, f"{path}.{k}" if path else str(k))]
    if isinstance(arguments, list):
        return [pair for i, v in enumerate(arguments) for pair in _scalars(v, f"{path}[{i}]")]
    return [(path, arguments)]


def _value_forms(value: object) -> tuple[str, ...]:
    """How a template may write a scalar argument: as text, as JSON, as Python (``True``, ``None``)."""
    if isinstance(value, str):
        return (value, json.dumps(value, ensure_ascii=False)[1:-1])
    return (json.dumps(value), str(value))


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
