"""Tool calling in records: the tools offered, the calls an assistant makes — normalised once, checked once.

The normal form is the one ``apply_chat_template(messages, tools=...)`` takes at inference (transformers'
``get_json_schema``, OpenAI-compatible servers), so a chat template renders training data as it renders a live
conversation::

    tools       [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}, ...]
    tool_calls  [{"type": "function", "function": {"name": ..., "arguments": {...}}, "id": ...}, ...]

Accepted as well, and brought to that form: a ``tools`` field holding a JSON string (LLaMA-Factory's convention),
flat specs ``{"name", "description", "parameters"}``, flat calls ``{"name", "arguments"}``, and arguments stored as
a JSON string. The last matters most: templates write arguments with ``tojson``, and a string would be encoded a
second time (``"{\\"city\\": \\"Paris\\"}"``), teaching the model a form it must never produce. Decoding it here,
once, means no template sees a string where an object belongs.
"""

from __future__ import annotations

import json
from typing import Any

from trainer.data.items import Message, RecordError


def _type_name(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_tools(value: object, what: str = "field 'tools'") -> list[dict] | None:
    """The record's tools in normal form; None when it offers none (absent, null, empty)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(f"{what} is a string but not valid JSON ({err.msg} at column {err.colno})") from None
        if value is None or value == []:
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"{what} must be a list of function specs, got a JSON {_type_name(value)}")
    tools = []
    for k, spec in enumerate(value):
        if not isinstance(spec, dict):
            raise RecordError(f"{what}[{k}] must be an object (a function spec), got a JSON {_type_name(spec)}")
        function = spec["function"] if "function" in spec else spec
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{what}[{k}] has no function name (expected {{\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"parameters\": ...}} or {\"name\": ..., \"parameters\": ...})")
        tools.append({**spec, "type": spec.get("type", "function")} if "function" in spec
                     else {"type": "function", "function": spec})
    return tools


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def parse_arguments(value: object, what: str) -> dict:
    """A call's arguments as an object: an object as it is, a JSON string decoded (once), absent as ``{}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            decoded = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise RecordError(f"{what} is neither an object nor valid JSON ({err.msg} at column {err.colno}): "
                              f"{value[:60]!r}") from None
        if not isinstance(decoded, dict):
            raise RecordError(f"{what} must decode to a JSON object, got a JSON {_type_name(decoded)}")
        return decoded
    if isinstance(value, dict):
        return value
    raise RecordError(f"{what} must be an object or a JSON string of one, got a JSON {_type_name(value)}")


def parse_tool_calls(value: object, what: str) -> list[dict]:
    """The calls of one assistant message in normal form (one call may be given alone, not in a list)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{what} must be a non-empty list of calls, got a JSON {_type_name(value)}")
    calls = []
    for k, call in enumerate(value):
        where = f"{what}[{k}]"
        if not isinstance(call, dict):
            raise RecordError(f"{where} must be an object, got a JSON {_type_name(call)}")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{where} has no function name (expected {{\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"arguments\": ...}})")
        normal: dict[str, Any] = {"type": "function", "function": {
            "name": function["name"], "arguments": parse_arguments(function.get("arguments"), f"{where}.arguments")}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise RecordError(f"{where}.id must be a string, got a JSON {_type_name(call['id'])}")
            normal["id"] = call["id"]
        calls.append(normal)
    return calls


def parse_function_call_text(value: object, what: str) -> list[dict]:
    """LLaMA-Factory's ShareGPT ``function_call`` turn: a JSON string (or object) of one call or a list of calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(f"{what} is not valid JSON ({err.msg} at column {err.colno}); a function_call turn "
                              "holds {\"name\": ..., \"arguments\": ...} or a list of them") from None
    return parse_tool_calls(value, what)


def check_calls(messages: list[Message], tools: list[dict] | None) -> None:
    """Every call names a function the record offers: the model must not learn to call tools it was never shown.

    A record without ``tools`` is not checked: its tools may be described in its system message, as some models
    (DeepSeek-V3) expect them."""
    names = tool_names(tools)
    if not names:
        return
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            name = call["function"]["name"]
            if name not in names:
                raise RecordError(f"message {i} calls {name!r}, which is not among the record's tools "
                                  f"({', '.join(names)})")
