"""Prompts for generation (sample outputs, test-set predictions), from the same record formats as training.

Unlike training records, a prompt record may lack its answer (the Tang test set has only instruction and
input); when an answer is there it is kept as the reference shown beside the model's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.data.formats import Conversation, DataError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Prompt:
    messages: Conversation
    reference: str | None = None

    @property
    def text(self) -> str:
        """The last user message, as a short label for tables."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _messages(record: dict) -> Conversation:
    if "instruction" in record:
        user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}]
        if record.get("output"):
            messages.append({"role": "assistant", "content": record["output"]})
    elif "conversations" in record:
        messages = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    elif "messages" in record and record["messages"] and isinstance(record["messages"][0], str):
        messages = [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(record["messages"])]
    else:
        messages = [dict(m) for m in record["messages"]]
    if record.get("system") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def to_prompt(messages: Conversation, system: str | None = None) -> Prompt:
    """Split off a final assistant turn as the reference; add ``system`` where the prompt has none."""
    messages = list(messages)
    reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Prompt(messages, reference)


def read_prompts(path: str | Path, system: str | None = None, limit: int | None = None) -> list[Prompt]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") from error
    prompts = []
    for index, record in enumerate(records[:limit] if limit else records):
        try:
            prompts.append(to_prompt(_messages(record), system))
        except (KeyError, TypeError, IndexError, AttributeError) as error:
            raise DataError(f"{path}: record {index}: not a prompt record ({error!r})") from error
    return prompts
