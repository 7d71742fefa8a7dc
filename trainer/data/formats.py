"""Records on disk -> validated conversations.

Everything downstream (templates, labels, packing) assumes a clean conversation: an optional system message, then
user/assistant turns strictly alternating, ending on a non-empty answer. Checking that here, once, with the file and
line of the offending record, turns a confusing failure deep inside tokenisation into a message the user can act on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

Message = dict[str, str]
Conversation = list[Message]

FORMATS = ("alpaca", "messages", "sharegpt", "alternating")
ON_BAD_RECORD = ("error", "skip")
EXTENSIONS = (".json", ".jsonl")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")
_WS = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A problem with training data the user must fix; the message says where (``path:line:``) and what."""


@dataclass
class SkippedRecord:
    path: str
    line: int
    index: int
    reason: str


@dataclass
class ConversationFile:
    """The usable conversations of one file; ``lines[i]`` is where ``conversations[i]`` starts, for later errors."""

    path: str
    format: str
    conversations: list[Conversation] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)


class _RecordError(Exception):
    """A bad record; becomes a DataError or a SkippedRecord once the caller knows the path, line and index."""


def detect_format(record: dict) -> str | None:
    """Name the record format from its keys, or None; nested values are only looked at to split the two `messages`
    styles (dicts with roles vs. a bare list of alternating texts)."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        messages = record["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[0], str):
            return "alternating"
        return "messages"
    if "instruction" in record:
        return "alpaca"
    return None


def read_conversations(path: str | Path, on_bad_record: str = "error", prompts: bool = False) -> ConversationFile:
    """Read a .json (array of records) or .jsonl (one record per line) file into validated conversations.

    ``prompts=True`` reads prompt files (e.g. a test set): the final answer may be missing (an alpaca record
    without ``output``, a conversation ending on the user); everything else is checked as for training data.

    The format is detected from the first record and every record must match it. ``on_bad_record="skip"`` collects
    bad records in ``skipped`` instead of raising; damage to the file as a whole (a broken .json array, non-UTF-8
    bytes, no records) always raises.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    where = str(Path(path))
    result = ConversationFile(path=where, format="")
    records = iter_records(path)
    skip = on_bad_record == "skip"
    convert: Callable[[dict, bool], Conversation] | None = None
    count = 0
    for index, (line, record) in enumerate(records):
        count += 1
        if isinstance(record, _RecordError):  # malformed JSON on one .jsonl line
            if not skip:
                raise DataError(f"{where}:{line}: {record} (record {index})")
            result.skipped.append(SkippedRecord(where, line, index, str(record)))
            continue
        try:
            if convert is None:
                fmt = detect_format(record)
                if fmt is None:
                    raise _RecordError(_no_format_reason(record))
                result.format, convert = fmt, _CONVERTERS[fmt]
            conversation = convert(record, prompts)
            _validate(conversation, prompts)
        except _RecordError as err:
            fmt_note = f", format {result.format}" if result.format else ""
            if not skip:
                raise DataError(f"{where}:{line}: {err} (record {index}{fmt_note})") from None
            result.skipped.append(SkippedRecord(where, line, index, str(err)))
            continue
        result.conversations.append(conversation)
        result.lines.append(line)

    if count == 0:
        raise DataError(f"{where}:1: no records in file")
    if not result.conversations:
        first = result.skipped[0]
        raise DataError(
            f"{where}:{first.line}: no usable records: all {count} were skipped; first problem: {first.reason}"
        )
    return result


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line, record)`` for each record of a .json array or .jsonl file, in order; a .jsonl line that is not JSON
    comes as a ``_RecordError`` (so a reader may skip it). The extension, the encoding and an empty file are
    checked at once, not when iteration starts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}:1: unsupported extension {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}:1: empty file, no records")
    return _jsonl_records(text) if suffix == ".jsonl" else _json_array_records(text, str(path))


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """``conversation`` with ``system`` as its system message, unless it has its own."""
    if system and conversation[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conversation]
    return conversation


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}:1: file not found") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-encode the file as UTF-8"
        ) from None


def _jsonl_records(text: str) -> Iterator[tuple[int, object]]:
    """Yield (line, record) per non-blank line; a line that is not JSON yields a _RecordError so it can be skipped."""
    decode = json.JSONDecoder().decode
    # split on "\n" only: str.splitlines would also break on U+2028 etc., which JSON allows raw inside strings
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            yield number, decode(raw_line)
        except json.JSONDecodeError as err:
            yield number, _RecordError(f"malformed JSON at column {err.colno}: {err.msg}")


def _json_array_records(text: str, where: str) -> Iterator[tuple[int, object]]:
    """Yield (line, record) for each element of a top-level JSON array, decoding element by element so that each
    record's starting line is known without a second parse."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, problem: str) -> DataError:
        return DataError(f"{where}:{line_at(pos)}: malformed JSON: {problem}")

    pos = _WS.match(text, 0).end()
    if text[pos] != "[":
        raise fail(pos, "expected a top-level array of records '[...]' (use .jsonl for one record per line)")
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos = _WS.match(text, pos + 1).end()
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                # the decoder's own position points at the real defect, which may be lines after the record start
                raise fail(err.pos, f"{err.msg} (column {err.colno})") from None
            yield line_at(pos), record
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos = _WS.match(text, pos + 1).end()
                break
            raise fail(pos, "expected ',' or ']' after a record" if pos < len(text) else "unterminated array")
    if pos != len(text):
        raise fail(pos, "extra data after the top-level array")


def _no_format_reason(record: object) -> str:
    if not isinstance(record, dict):
        return f"record is a JSON {_json_type(record)}, expected an object"
    keys = ", ".join(sorted(record)) or "none"
    return (
        f"record matches no known format (keys: {keys}); expected alpaca (instruction, output), "
        "messages (messages: [{role, content}]), sharegpt (conversations: [{from, value}]) "
        "or alternating (messages: [text, ...])"
    )


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _require(record: object, key: str, fmt: str) -> object:
    if not isinstance(record, dict):
        raise _RecordError(f"record is a JSON {_json_type(record)}, expected an object")
    if key not in record:
        other = detect_format(record)
        hint = f"; this record looks like {other}" if other and other != fmt else ""
        raise _RecordError(f"missing field {key!r}{hint}")
    return record[key]


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _RecordError(f"{what} must be a string, got a JSON {_json_type(value)}")
    return value


def _optional_text(record: dict, key: str) -> str:
    value = record.get(key)
    return "" if value is None else _text(value, f"field {key!r}")


def _list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise _RecordError(f"{what} must be a list, got a JSON {_json_type(value)}")
    return value


def _system_first(system: str) -> Conversation:
    return [{"role": "system", "content": system}] if system else []


def _from_alpaca(record: dict, prompts: bool = False) -> Conversation:
    instruction = _text(_require(record, "instruction", "alpaca"), "field 'instruction'")
    output = None if prompts and "output" not in record else _text(_require(record, "output", "alpaca"),
                                                                     "field 'output'")
    extra = _optional_text(record, "input")
    conversation = _system_first(_optional_text(record, "system"))
    history = record.get("history")
    for turn, pair in enumerate(_list(history, "field 'history'") if history is not None else []):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _RecordError(f"history[{turn}] must be a [user, assistant] pair")
        conversation.append({"role": "user", "content": _text(pair[0], f"history[{turn}][0]")})
        conversation.append({"role": "assistant", "content": _text(pair[1], f"history[{turn}][1]")})
    conversation.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    if output is not None:
        conversation.append({"role": "assistant", "content": output})
    return conversation


def _from_messages(record: dict, prompts: bool = False) -> Conversation:
    conversation = []
    for i, message in enumerate(_list(_require(record, "messages", "messages"), "field 'messages'")):
        if not isinstance(message, dict):
            raise _RecordError(f"messages[{i}] must be an object with role and content, got a {_json_type(message)}")
        role = _require(message, "role", "messages")
        if role not in _ROLES:
            raise _RecordError(f"messages[{i}] has unsupported role {role!r}; expected one of {', '.join(_ROLES)}")
        conversation.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content")})
    return conversation


def _from_sharegpt(record: dict, prompts: bool = False) -> Conversation:
    conversation = _system_first(_optional_text(record, "system"))
    for i, message in enumerate(_list(_require(record, "conversations", "sharegpt"), "field 'conversations'")):
        if not isinstance(message, dict):
            raise _RecordError(f"conversations[{i}] must be an object with from and value, got a {_json_type(message)}")
        speaker = _require(message, "from", "sharegpt")
        if speaker not in _SHAREGPT_ROLES:
            raise _RecordError(
                f"conversations[{i}] has unsupported 'from' {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}"
            )
        value = _text(message.get("value"), f"conversations[{i}].value")
        conversation.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return conversation


def _from_alternating(record: dict, prompts: bool = False) -> Conversation:
    conversation = _system_first(_optional_text(record, "system"))
    for i, text in enumerate(_list(_require(record, "messages", "alternating"), "field 'messages'")):
        role = "user" if i % 2 == 0 else "assistant"
        conversation.append({"role": role, "content": _text(text, f"messages[{i}]")})
    return conversation


_CONVERTERS: dict[str, Callable[[dict, bool], Conversation]] = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alternating": _from_alternating,
}


def _validate(conversation: Conversation, prompts: bool = False) -> None:
    turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    offset = len(conversation) - len(turns)
    if not turns:
        raise _RecordError("conversation has no user/assistant turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _RecordError(
                f"message {i + offset} has role {message['role']!r} where {expected!r} was expected "
                "(an optional system message first, then user/assistant strictly alternating)"
            )
        if expected == "assistant" and not message["content"].strip():
            raise _RecordError(f"message {i + offset} is an empty assistant answer")
    if turns[-1]["role"] != "assistant" and not prompts:
        raise _RecordError("conversation ends on the user; the last message must be an assistant answer")
