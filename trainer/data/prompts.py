"""Prompts for generation (sample outputs, test-set predictions), from the same record formats as training.

Unlike training records, a prompt record may lack its answer (the Tang test set has only instruction and
input); when an answer is there it is kept as the reference shown beside the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.data.formats import DEFAULT_MAX_RECORD_BYTES, Conversation, DataError, read_conversations, with_system


@dataclass
class Prompt:
    messages: Conversation
    reference: str | None = None

    @property
    def text(self) -> str:
        """The last user message, as a short label for tables."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def to_prompt(messages: Conversation, system: str | None = None) -> Prompt:
    """Split off a final assistant turn as the reference; add ``system`` where the prompt has none."""
    messages = list(messages)
    reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    return Prompt(with_system(messages, system), reference)


def read_prompts(path: str | Path, system: str | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts from a file in any training format; bad records are named by file and line as for training."""
    conversations = read_conversations(path, prompts=True).conversations
    return [to_prompt(c, system) for c in (conversations[:limit] if limit else conversations)]


def read_references(path: str | Path, count: int, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[str]:
    """References aligned with ``count`` prompts: one per line, or (a file with blank lines) one per block.

    The file is read whole, so it is refused first if it is larger than ``count`` references of a record's size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max(count, 1) * max_record_bytes:
            raise DataError(f"{path}:1: {size:,} bytes for {count} reference(s), more than {max_record_bytes:,} "
                            "bytes each (the record size limit); is this the references file?")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}:1: references file not found") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    lines = text.strip("\n").split("\n")
    blocks = [b.strip() for b in text.strip().split("\n\n")] if "\n\n" in text.strip() else None
    for found in (lines, blocks):
        if found is not None and len(found) == count:
            return found
    blocks_note = f" / {len(blocks)} blocks" if blocks else ""
    raise DataError(f"{path}: {len(lines)} lines{blocks_note} for {count} prompts; give one reference per prompt")


def with_references(prompts: list[Prompt], path: str | Path) -> list[Prompt]:
    """``prompts`` with the references of ``path`` (in order), replacing any they had."""
    references = read_references(path, len(prompts))
    return [Prompt(p.messages, reference) for p, reference in zip(prompts, references)]
