"""Records on disk -> validated training items: chats, documents, plain completions.

Everything downstream (templates, labels, packing) assumes a clean item. A chat is an optional system message, then
user/assistant turns, where an assistant turn may call tools and each call group is followed by its results
(``tool`` messages), ending on an assistant turn; a document is a non-empty text; a completion a prompt and a
non-empty completion. Checking that here, once, with the file and line of the offending record, turns a confusing
failure deep inside tokenisation into a message the user can act on.

Formats, detected per file from its first usable record (see ``data/README.md``): alpaca, messages (OpenAI, with
``tools`` / ``tool_calls`` / ``tool``), sharegpt (with LLaMA-Factory's ``function_call`` / ``observation``),
alternating, prompt_completion and conversational_prompt_completion (TRL's), text (``{"text"}`` records and
``.txt`` files).
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.items import Chat, Completion, Conversation, Document, Item, Message, RecordError
from trainer.data.tools import check_calls, parse_function_call_text, parse_tool_calls, parse_tools
from trainer.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt", "alternating", "prompt_completion", "conversational_prompt_completion",
           "text")
ON_BAD_RECORD = ("error", "skip")
EXTENSIONS = (".json", ".jsonl", ".parquet", ".txt")
# Largest record read, in bytes (``--max_record_mb``): tokenising one record takes ~75x its size in memory with a
# small byte-level BPE, more with larger ones (8 MiB of text: 0.6 GB; one 68 MB record once took 13.5 GB), so a
# stray multi-megabyte blob must be refused, not encoded (``bench/data_guards.py``). 8 MiB holds a million-token
# conversation; anything larger is truncated to --max_length anyway. A ``.txt`` file is one record: the same limit.
DEFAULT_MAX_RECORD_MB = 8.0
DEFAULT_MAX_RECORD_BYTES = int(DEFAULT_MAX_RECORD_MB * 2**20)

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "observation": "tool", "tool": "tool", "function_call": "assistant"}
_ROLES = ("system", "user", "assistant", "tool")
# Llama 3.x names the tool-result role ``ipython``; its template treats it as ``tool``, the only name others know.
_ROLE_ALIASES = {"ipython": "tool"}
# Names under which chat data carries an assistant turn's reasoning (kept as ``reasoning_content``).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(UserError, ValueError):
    """A problem with training data the user must fix; the message says where (``path:line:``) and what."""


@dataclass
class SkippedRecord:
    path: str
    line: int
    index: int
    reason: str


@dataclass
class RecordFile:
    """The usable items of one file; ``lines[i]`` is where ``items[i]`` starts, for later errors."""

    path: str
    format: str
    items: list[Item] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def conversations(self) -> list[Conversation]:
        """The messages of each chat (files of a chat format)."""
        return [item.messages for item in self.items if isinstance(item, Chat)]


def detect_format(record: dict) -> str | None:
    """Name the record format from its keys, or None; nested values are only looked at to split the two `messages`
    styles (dicts with roles vs. a bare list of alternating texts) and plain from conversational prompt/completion."""
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
    if "prompt" in record and "completion" in record:
        return "conversational_prompt_completion" if isinstance(record["prompt"], list) else "prompt_completion"
    if "text" in record:
        return "text"
    return None


class RecordReader:
    """Stream the validated items of one record source, keeping count of what was skipped.

    Iterating yields ``(line, item)`` (:class:`Chat`, :class:`Document` or :class:`Completion`); ``format``,
    ``count`` (records seen) and ``skipped`` fill in as it goes. The format is detected from the first usable record
    and every record must match it. ``on_bad_record="skip"`` collects bad records in ``skipped`` instead of raising;
    damage to the source as a whole (a broken .json array, non-UTF-8 bytes, no records, no usable record) always
    raises. ``prompts=True`` reads prompt files (e.g. a test set): the final answer may be missing (an alpaca record
    without ``output``, a conversation ending on the user); everything else is checked as for training data.
    An item holding more than ``max_record_bytes`` of text (a chat, a document, a completion) is a bad record too
    (the file readers already refuse such records before decoding them; this bounds parquet and ``datasets`` rows).
    """

    def __init__(self, where: str, records: Iterable[tuple[int, object]], on_bad_record: str = "error",
                 prompts: bool = False, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
        self.where = where
        self.format = ""
        self.count = 0
        self.skipped: list[SkippedRecord] = []
        self._records = records
        self._skip = on_bad_record == "skip"
        self._prompts = prompts
        self._max_bytes = max_record_bytes

    def __iter__(self) -> Iterator[tuple[int, Item]]:
        convert: Callable[[dict, bool], Item] | None = None
        used = 0
        for index, (line, record) in enumerate(self._records):
            self.count += 1
            try:
                if isinstance(record, RecordError):  # malformed JSON on one .jsonl line
                    raise record
                if convert is None:
                    fmt = detect_format(record)
                    if fmt is None:
                        raise RecordError(_no_format_reason(record))
                    self.format, convert = fmt, _CONVERTERS[fmt]
                item = convert(record, self._prompts)
                if isinstance(item, Chat):
                    _validate(item, self._prompts)
                _check_size(item, self._max_bytes)
            except RecordError as err:
                fmt_note = f", format {self.format}" if self.format and not isinstance(record, RecordError) else ""
                self.reject(line, index, str(err), fmt_note)
                continue
            used += 1
            yield line, item
        if self.count == 0:
            raise DataError(f"{self.where}:1: no records in file")
        if not used:
            first = self.skipped[0]
            raise DataError(f"{self.where}:{first.line}: no usable records: all {self.count} were skipped; "
                            f"first problem: {first.reason}")

    def reject(self, line: int, index: int, reason: str, note: str = "") -> None:
        """A bad record: an error naming file and line, or (``--on_bad_record skip``) an entry in ``skipped``."""
        if not self._skip:
            raise DataError(f"{self.where}:{line}: {reason} (record {index}{note})")
        self.skipped.append(SkippedRecord(self.where, line, index, reason))


def read_records(path: str | Path, on_bad_record: str = "error", prompts: bool = False,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> RecordFile:
    """Read a whole file into validated items (see :class:`RecordReader`).

    For small files (prompts, tests); training data is streamed through :class:`RecordReader` instead.
    """
    reader = RecordReader(str(Path(path)), iter_records(path, max_record_bytes), on_bad_record, prompts,
                          max_record_bytes)
    result = RecordFile(path=reader.where, format="")
    for line, item in reader:
        result.items.append(item)
        result.lines.append(line)
    result.format, result.skipped = reader.format, reader.skipped
    return result


def read_conversations(path: str | Path, on_bad_record: str = "error", prompts: bool = False,
                       max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> RecordFile:
    """:func:`read_records` for a file that must hold chats (prompt files, tests): ``.conversations`` has them."""
    result = read_records(path, on_bad_record, prompts, max_record_bytes)
    if result.items and not isinstance(result.items[0], Chat):
        raise DataError(f"{result.path}:{result.lines[0]}: records in the {result.format} format hold no "
                        "conversation; this file must be in a chat format (messages, sharegpt, alpaca, alternating "
                        "or conversational prompt/completion)")
    return result


def iter_records(path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, object]]:
    """``(line, record)`` for each record of a .json array, .jsonl or .parquet file, in order, read as a stream;
    a .txt file is one record, ``{"text": <the whole file>}`` (one document).

    Memory stays bounded by ``max_record_bytes`` (plus a read chunk), whatever the file or record size: a .jsonl
    line over it is passed over without being kept and comes as a ``RecordError`` naming its size (so a reader may
    skip it), as does a line that is not JSON or nests too deeply to decode; a record of a .json array over it ends
    the reading (its end cannot be found without reading it); a .txt file over it is read no further than the limit
    and comes as a ``RecordError`` naming the file's size. For parquet, "line" is the row number and rows are read a
    few at a time when they are large. The extension and an empty file are checked at once, not when iteration
    starts; bad UTF-8 is named by line when it is reached.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}:1: unsupported extension {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}")
    if suffix == ".parquet":
        return _parquet_records(path, max_record_bytes)
    stream = _TextStream(path)
    if suffix == ".txt":
        return _text_file_record(stream, max_record_bytes)
    if not stream.skip_whitespace():
        raise DataError(f"{path}:1: empty file, no records")
    if suffix == ".jsonl":
        return _jsonl_records(stream, max_record_bytes)
    return _json_array_records(stream, max_record_bytes)


def _too_large(size: str, limit: int, what: str = "record", remedy: str = "remove the record") -> str:
    """The reason given for a record over the size limit; ``size`` says how large it is."""
    return (f"{what} of {size} bytes is over the limit of {limit:,} bytes set by --max_record_mb; raise it if such "
            f"records are meant to be trained (tokenising one takes ~75-200x its size in memory), else {remedy}")


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """``conversation`` with ``system`` as its system message, unless it has its own."""
    if system and conversation[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conversation]
    return conversation


def item_with_system(item: Item, system: str | None) -> Item:
    """A chat with ``system`` as its system message unless it has its own; documents and completions as they are
    (they have no roles: ``--system`` does not apply to them)."""
    if not isinstance(item, Chat) or not system or item.messages[0]["role"] == "system":
        return item
    return Chat(with_system(item.messages, system), item.tools, item.first_trained + 1)


class _TextStream:
    """A UTF-8 text file read in chunks, with a window that keeps only the text not yet consumed.

    ``text[pos:]`` is what is left of the window; :meth:`more` appends the next chunk (and drops the consumed
    part), :meth:`line_at` names the line of a position. Bad bytes are reported with their line.
    """

    CHUNK = 1 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed at EOF by more()
        except FileNotFoundError:
            raise DataError(f"{path}:1: file not found") from None
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes_read = 0
        self._newlines_read = 0  # in the bytes decoded so far
        self.text = ""
        self.pos = 0
        self.eof = False
        self._line_base = 1  # line of text[0]
        self._counted = (0, 1)  # (position, its line): where line_at last counted to
        self._first = True

    def more(self) -> bool:
        """Read the next chunk into the window; False at the end of the file."""
        if self.eof:
            return False
        chunk = self._file.read(self.CHUNK)
        final = not chunk
        if self._first:
            while len(chunk) < len(codecs.BOM_UTF8) and not final and (more := self._file.read(self.CHUNK)):
                chunk += more
            if chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8):]
            self._first = False
        try:
            decoded = self._decoder.decode(chunk, final=final)
        except UnicodeDecodeError as err:
            offset = self._bytes_read + err.start
            line = self._newlines_read + chunk.count(b"\n", 0, err.start) + 1
            byte = chunk[err.start] if err.start < len(chunk) else 0
            raise DataError(f"{self.path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at offset {offset}); "
                            "re-encode the file as UTF-8") from None
        self._bytes_read += len(chunk)
        self._newlines_read += chunk.count(b"\n")
        self._line_base = self.line_at(self.pos)
        self._counted = (0, self._line_base)
        self.text = self.text[self.pos:] + decoded
        self.pos = 0
        if final:
            self.eof = True
            self._file.close()
        return True

    def line_at(self, pos: int) -> int:
        """The line of ``text[pos]``; positions are asked in increasing order, so counting is incremental."""
        counted, line = self._counted
        if pos < counted:
            counted, line = 0, self._line_base
        line += self.text.count("\n", counted, pos)
        self._counted = (pos, line)
        return line

    def skip_whitespace(self) -> bool:
        """Move past whitespace; False when only whitespace is left in the file."""
        while True:
            self.pos = _WS.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return True
            if not self.more():
                return False

    def readline(self, limit: int) -> str | int | None:
        """The rest of the current line (without its newline); None at the end of the file; or, for a line of more
        than ``limit`` bytes, its size in bytes: such a line is passed over without being kept."""
        while True:
            end = self.text.find("\n", self.pos)
            if end >= 0 or self.eof:
                if self.pos >= len(self.text) and self.eof:
                    return None
                end = len(self.text) if end < 0 else end
                line, self.pos = self.text[self.pos:end], end + 1
                size = len(line) if len(line) * 4 <= limit else len(line.encode("utf-8"))
                return size if size > limit else line
            if self.unread_over(limit):
                return self._skip_line()
            self.more()

    def unread_over(self, limit: int) -> bool:
        """Whether the unread window holds more than ``limit`` bytes of UTF-8 (a character takes 1 to 4)."""
        chars = len(self.text) - self.pos
        if chars > limit or chars * 4 <= limit:
            return chars > limit
        return len(self.text[self.pos:].encode("utf-8")) > limit

    def _skip_line(self) -> int:
        """Move past the rest of the current line, keeping none of it; its size in bytes (without the newline)."""
        size = 0
        while True:
            end = self.text.find("\n", self.pos)
            stop = len(self.text) if end < 0 else end
            size += len(self.text[self.pos:stop].encode("utf-8"))
            if end >= 0:
                self.pos = end + 1
                return size
            self.pos = stop
            if not self.more():
                return size

    def close(self) -> None:
        """Stop reading (the file is closed; the window is dropped)."""
        if not self.eof:
            self._file.close()
            self.eof = True
        self.text, self.pos = "", 0


def _jsonl_records(stream: _TextStream, max_record_bytes: int) -> Iterator[tuple[int, object]]:
    """Yield (line, record) per non-blank line; a line that is not JSON, nests too deeply or is over the size limit
    yields a RecordError so it can be skipped."""
    decode = json.JSONDecoder().decode
    # split on "\n" only: str.splitlines would also break on U+2028 etc., which JSON allows raw inside strings
    stream.pos = 0
    number = stream.line_at(0)
    while (raw_line := stream.readline(max_record_bytes)) is not None:
        if isinstance(raw_line, int):
            yield number, RecordError(_too_large(f"{raw_line:,}", max_record_bytes))
        elif raw_line.strip():
            try:
                yield number, decode(raw_line)
            except json.JSONDecodeError as err:
                yield number, RecordError(f"malformed JSON at column {err.colno}: {err.msg}")
            except RecursionError:
                yield number, RecordError(_TOO_DEEP)
        number += 1


_TOO_DEEP = (f"JSON nested too deeply to decode (Python's decoder stops near {sys.getrecursionlimit()} levels of "
             "arrays and objects); flatten the record or remove it")


def _json_array_records(stream: _TextStream, max_record_bytes: int) -> Iterator[tuple[int, object]]:
    """Yield (line, record) for each element of a top-level JSON array, decoding element by element from a window
    over the file, so each record's starting line is known and memory is bounded by the largest record (at most
    ``max_record_bytes``: a larger record ends the reading, named by its line)."""
    decoder = json.JSONDecoder()
    where = str(stream.path)

    def fail(pos: int, problem: str) -> DataError:
        return DataError(f"{where}:{stream.line_at(pos)}: malformed JSON: {problem}")

    if stream.text[stream.pos] != "[":
        raise fail(stream.pos, "expected a top-level array of records '[...]' (use .jsonl for one record per line)")
    stream.pos += 1
    if not stream.skip_whitespace():
        raise fail(len(stream.text), "unterminated array")
    if stream.text.startswith("]", stream.pos):
        stream.pos += 1
    else:
        while True:
            while True:
                try:
                    record, end = decoder.raw_decode(stream.text, stream.pos)
                except RecursionError:
                    raise DataError(f"{where}:{stream.line_at(stream.pos)}: {_TOO_DEEP}") from None
                except json.JSONDecodeError as err:
                    # Cut short by the window's end (or inside a long string), the record may run on into the next
                    # chunk; a defect before that is one whatever follows: named now, without reading on.
                    cut_short = err.pos >= len(stream.text) - 16 or err.msg.startswith("Unterminated string")
                    if cut_short and stream.unread_over(max_record_bytes):
                        size = f"more than {max_record_bytes:,}"
                        raise DataError(f"{where}:{stream.line_at(stream.pos)}: {_too_large(size, max_record_bytes)}; "
                                        "inside a .json array it cannot be skipped") from None
                    if cut_short and stream.more():
                        continue
                    # the decoder's own position points at the real defect, which may be lines after the record start
                    raise fail(err.pos, f"{err.msg} (column {err.colno})") from None
                if end == len(stream.text) and stream.more():
                    continue  # a number or literal cut by the chunk boundary: decode it again, whole
                break
            yield stream.line_at(stream.pos), record
            stream.pos = end
            if not stream.skip_whitespace():
                raise fail(len(stream.text), "unterminated array")
            if stream.text.startswith(",", stream.pos):
                stream.pos += 1
                if not stream.skip_whitespace():
                    raise fail(len(stream.text), "unterminated array")
                continue
            if stream.text.startswith("]", stream.pos):
                stream.pos += 1
                break
            raise fail(stream.pos, "expected ',' or ']' after a record")
    if stream.skip_whitespace():
        raise fail(stream.pos, "extra data after the top-level array")


def _text_file_record(stream: _TextStream, max_record_bytes: int) -> Iterator[tuple[int, object]]:
    """The whole of a .txt file, as it is, as one ``{"text": ...}`` record on line 1 (bad UTF-8 named by its line).

    The file is one record, so ``max_record_bytes`` bounds it: one over it is read no further than the limit (plus a
    chunk) and comes as a ``RecordError`` naming the file's size, so no document of it is ever held or tokenised.
    """
    while not stream.unread_over(max_record_bytes) and stream.more():
        pass
    if stream.unread_over(max_record_bytes):
        stream.close()
        try:
            size = f"{stream.path.stat().st_size:,}"
        except OSError:
            size = f"more than {max_record_bytes:,}"
        reason = _too_large(size, max_record_bytes, "text file (one document)", "split the file or remove it")
        return iter([(1, RecordError(reason))])
    if not stream.text.strip():
        raise DataError(f"{stream.path}:1: empty file, no text")
    return iter([(1, {"text": stream.text})])


def _parquet_records(path: Path, max_record_bytes: int) -> Iterator[tuple[int, object]]:
    """Rows of a parquet file as records, in batches (bounded memory); the row number stands for the line.

    Batches hold 1024 rows, fewer where the rows are large (from the row groups' sizes), so that a batch takes
    about one record's worth of the size limit; the reader checks each record's size (:func:`_check_size`).
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}:1: file not found") from None
    except Exception as err:  # pyarrow raises ArrowInvalid & co. for a damaged file
        raise DataError(f"{path}:1: not a readable parquet file: {err}") from None
    meta = parquet.metadata
    row_bytes = max((meta.row_group(i).total_byte_size / max(meta.row_group(i).num_rows, 1)
                     for i in range(meta.num_row_groups)), default=1)
    batch_size = int(min(1024, max(1, max_record_bytes // max(row_bytes, 1))))
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _no_format_reason(record: object) -> str:
    if not isinstance(record, dict):
        return f"record is a JSON {_json_type(record)}, expected an object"
    keys = ", ".join(sorted(record)) or "none"
    return (
        f"record matches no known format (keys: {keys}); expected alpaca (instruction, output), "
        "messages (messages: [{role, content}]), sharegpt (conversations: [{from, value}]), "
        "alternating (messages: [text, ...]), prompt/completion (prompt, completion) or text (text)"
    )


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _require(record: object, key: str, fmt: str) -> object:
    if not isinstance(record, dict):
        raise RecordError(f"record is a JSON {_json_type(record)}, expected an object")
    if key not in record:
        other = detect_format(record)
        hint = f"; this record looks like {other}" if other and other != fmt else ""
        raise RecordError(f"missing field {key!r}{hint}")
    return record[key]


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got a JSON {_json_type(value)}")
    if not value.isascii() and (bad := _SURROGATE.search(value)):
        # A broken \uXXXX escape: valid JSON, but no Unicode text (no tokenizer can encode it).
        raise RecordError(f"{what} holds a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}, "
                          "which is not Unicode text (half of a broken \\u escape pair); fix or remove it")
    return value


def _check_size(item: Item, limit: int) -> None:
    """Refuse an item whose texts exceed ``limit`` bytes before anything tokenises it: a chat's contents, reasoning,
    tool calls and tools; a document's text; a completion's prompt and completion.

    A chat's tool calls and tools are JSON objects whose strings no :func:`_text` saw; they are measured as the
    template writes them (JSON) and checked for lone surrogates here.
    """
    if isinstance(item, Document):
        texts = [item.text]
    elif isinstance(item, Completion):
        texts = [item.prompt, item.completion]
    else:
        texts = [t for m in item.messages for t in (m.get("content") or "", m.get("reasoning_content") or "")]
        structured = [("field 'tools'", item.tools)] if item.tools else []
        structured += [(f"message {i}'s tool calls", m["tool_calls"])
                       for i, m in enumerate(item.messages) if m.get("tool_calls")]
        texts += [_text(json.dumps(value, ensure_ascii=False), f"{what} (as JSON)") for what, value in structured]
    size = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    if size > limit:
        raise RecordError(f"record holds {size:,} bytes of text, over the limit of {limit:,} bytes set by "
                          "--max_record_mb; raise it if such records are meant to be trained, else remove the record")


def _optional_text(record: dict, key: str) -> str:
    value = record.get(key)
    return "" if value is None else _text(value, f"field {key!r}")


def _list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise RecordError(f"{what} must be a list, got a JSON {_json_type(value)}")
    return value


def _system_first(system: str) -> Conversation:
    return [{"role": "system", "content": system}] if system else []


def _from_alpaca(record: dict, prompts: bool = False) -> Chat:
    instruction = _text(_require(record, "instruction", "alpaca"), "field 'instruction'")
    output = None if prompts and "output" not in record else _text(_require(record, "output", "alpaca"),
                                                                     "field 'output'")
    extra = _optional_text(record, "input")
    conversation = _system_first(_optional_text(record, "system"))
    history = record.get("history")
    for turn, pair in enumerate(_list(history, "field 'history'") if history is not None else []):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordError(f"history[{turn}] must be a [user, assistant] pair")
        conversation.append({"role": "user", "content": _text(pair[0], f"history[{turn}][0]")})
        conversation.append({"role": "assistant", "content": _text(pair[1], f"history[{turn}][1]")})
    conversation.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    if output is not None:
        conversation.append({"role": "assistant", "content": output})
    return Chat(conversation)


def _message(message: object, what: str) -> Message:
    """One OpenAI-style message in normal form: role, content (None only beside tool calls), ``tool_calls``
    (normalised, see :mod:`trainer.data.tools`; absent when there are none), a tool result's ``tool_call_id`` and
    ``name``, an assistant's ``reasoning_content``."""
    if not isinstance(message, dict):
        raise RecordError(f"{what} must be an object with role and content, got a {_json_type(message)}")
    role = _require(message, "role", "messages")
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in _ROLES:
        raise RecordError(f"{what} has unsupported role {role!r}; expected one of {', '.join(_ROLES)} (or ipython)")
    calls = message.get("tool_calls")
    if calls is None and message.get("function_call") is not None:  # OpenAI's older single-call field
        calls = message["function_call"]
    converted: Message = {"role": role}
    if calls is not None and calls != []:
        if role != "assistant":
            raise RecordError(f"{what} is a {role} message with tool calls; only assistant turns call tools")
        # A call without text has content null (OpenAI) or none at all (transformers' examples); templates render
        # an empty string the same way and many cannot take null ("'</think>' in content"), so it becomes "".
        content = message.get("content")
        converted["content"] = "" if content is None else _text(content, f"{what}.content")
        converted["tool_calls"] = parse_tool_calls(calls, f"{what}.tool_calls")
    else:
        converted["content"] = _text(message.get("content"), f"{what}.content")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                converted[key] = _text(message[key], f"{what}.{key}")
    # Reasoning travels beside the answer under one of its usual names; templates that keep it (Qwen3,
    # gpt-oss) read it, the others ignore it. Only assistant turns reason.
    reasoning = [key for key in REASONING_KEYS if message.get(key) is not None]
    if reasoning:
        if role != "assistant":
            raise RecordError(f"{what} is a {role} message with {reasoning[0]!r}; only assistant turns carry "
                              "reasoning")
        converted["reasoning_content"] = _text(message[reasoning[0]], f"{what}.{reasoning[0]}")
    return converted


def _messages(value: object, what: str) -> Conversation:
    return [_message(m, f"{what}[{i}]") for i, m in enumerate(_list(value, f"field {what!r}"))]


def _from_messages(record: dict, prompts: bool = False) -> Chat:
    messages = _messages(_require(record, "messages", "messages"), "messages")
    return Chat(messages, parse_tools(record.get("tools")))


def _from_sharegpt(record: dict, prompts: bool = False) -> Chat:
    conversation = _system_first(_optional_text(record, "system"))
    for i, message in enumerate(_list(_require(record, "conversations", "sharegpt"), "field 'conversations'")):
        if not isinstance(message, dict):
            raise RecordError(f"conversations[{i}] must be an object with from and value, got a {_json_type(message)}")
        speaker = _require(message, "from", "sharegpt")
        if speaker not in _SHAREGPT_ROLES:
            raise RecordError(
                f"conversations[{i}] has unsupported 'from' {speaker!r}; expected one of {', '.join(_SHAREGPT_ROLES)}"
            )
        if speaker == "function_call":  # LLaMA-Factory: the call(s) as JSON, {"name", "arguments"} or a list
            calls = parse_function_call_text(message.get("value"), f"conversations[{i}].value")
            conversation.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        value = _text(message.get("value"), f"conversations[{i}].value")
        conversation.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return Chat(conversation, parse_tools(record.get("tools")))


def _from_alternating(record: dict, prompts: bool = False) -> Chat:
    conversation = _system_first(_optional_text(record, "system"))
    for i, text in enumerate(_list(_require(record, "messages", "alternating"), "field 'messages'")):
        role = "user" if i % 2 == 0 else "assistant"
        conversation.append({"role": role, "content": _text(text, f"messages[{i}]")})
    return Chat(conversation)


def _from_prompt_completion(record: dict, prompts: bool = False) -> Completion:
    prompt = _text(_require(record, "prompt", "prompt_completion"), "field 'prompt'")
    completion = _text(_require(record, "completion", "prompt_completion"), "field 'completion'")
    if not completion.strip():
        raise RecordError("field 'completion' is empty: nothing to train")
    return Completion(prompt, completion)


def _from_conversational_prompt_completion(record: dict, prompts: bool = False) -> Chat:
    """TRL's conversational prompt/completion: the prompt's messages are context (their assistant turns too), the
    completion's assistant turns are trained."""
    prompt = _messages(_require(record, "prompt", "conversational_prompt_completion"), "prompt")
    if not prompt:
        raise RecordError("field 'prompt' is an empty list of messages")
    completion = record.get("completion")
    completion = [] if prompts and completion is None else _messages(completion, "completion")
    if not completion and not prompts:
        raise RecordError("field 'completion' is an empty list of messages: nothing to train")
    for k, message in enumerate(completion):
        if message["role"] not in ("assistant", "tool"):
            raise RecordError(f"completion[{k}] has role {message['role']!r}; a completion holds the assistant's "
                              "turns (and the results of its tool calls)")
    return Chat(prompt + completion, parse_tools(record.get("tools")), first_trained=len(prompt))


def _from_text(record: dict, prompts: bool = False) -> Document:
    text = _text(_require(record, "text", "text"), "field 'text'")
    if not text.strip():
        raise RecordError("field 'text' is empty: an empty document")
    return Document(text)


_CONVERTERS: dict[str, Callable[[dict, bool], Item]] = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alternating": _from_alternating,
    "prompt_completion": _from_prompt_completion,
    "conversational_prompt_completion": _from_conversational_prompt_completion,
    "text": _from_text,
}


def _validate(chat: Chat, prompts: bool = False) -> None:
    """An optional system message, then user/assistant turns; an assistant turn that calls tools is followed by
    their results (one ``tool`` message per call at most) and then by the assistant again; the last message is an
    assistant turn (prompt files: any turn)."""
    conversation = chat.messages
    turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    offset = len(conversation) - len(turns)
    if not turns:
        raise RecordError("conversation has no user/assistant turns")
    calls: list[dict] = []  # the calls of the latest assistant turn that made some
    caller = results = 0
    previous = None
    for k, message in enumerate(turns):
        i, role = k + offset, message["role"]
        if previous is None or previous["role"] == "assistant" and not previous.get("tool_calls"):
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            expected = ("tool",)
        else:  # after a tool result: the next result of the same calls, or the assistant
            expected = ("tool", "assistant") if results < len(calls) else ("assistant",)
        if role not in expected:
            if role == "tool" and not calls:
                raise RecordError(f"message {i} is a tool result with no tool call before it")
            if role == "tool":
                raise RecordError(f"message {i} is tool result {results + 1} of message {caller}, which made "
                                  f"{len(calls)} call(s)")
            what = " or ".join(repr(e) for e in expected)
            raise RecordError(
                f"message {i} has role {role!r} where {what} was expected (an optional system message first, then "
                "user/assistant strictly alternating; tool results right after the assistant turn that calls them)"
            )
        if role == "assistant" and message.get("tool_calls"):
            calls, caller, results = message["tool_calls"], i, 0
        elif role == "assistant" and not (message["content"] or "").strip():
            raise RecordError(f"message {i} is an empty assistant answer")
        elif role == "tool":
            results += 1
            ids = [c["id"] for c in calls if "id" in c]
            if message.get("tool_call_id") is not None and ids and message["tool_call_id"] not in ids:
                raise RecordError(f"message {i} answers tool call id {message['tool_call_id']!r}, which message "
                                  f"{caller} did not make (its ids: {', '.join(ids)})")
        previous = message
    if not prompts and turns[-1]["role"] == "user":
        raise RecordError("conversation ends on the user; the last message must be an assistant answer")
    if not prompts and turns[-1]["role"] == "tool":
        raise RecordError("conversation ends on a tool result; the last message must be an assistant turn")
    if chat.first_trained and not any(m["role"] == "assistant" for m in conversation[chat.first_trained:]) \
            and not prompts:
        raise RecordError("the completion has no assistant turn: nothing to train")
    check_calls(conversation, chat.tools)
