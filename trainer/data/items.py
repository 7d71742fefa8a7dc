"""What a record becomes: a chat, a document, or a plain completion — each trained by its own rule.

- :class:`Chat` — messages (with tool calls and results, and the tools offered, where the record has them). Every
  assistant turn from ``first_trained`` on is trained exactly as the model's chat template renders it at inference
  (:mod:`trainer.data.templates`); everything else is context.
- :class:`Document` — raw text for continued pretraining: every token is trained, EOS appended; a document longer
  than ``--max_length`` becomes consecutive chunks (:mod:`trainer.data.documents`).
- :class:`Completion` — a plain prompt/completion pair: the prompt is context, the completion (+ EOS) is trained.

Keeping the kinds apart, instead of dressing a document up as a conversation, lets each keep its own loss rule when
sources of several kinds are mixed in one run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]


class RecordError(Exception):
    """A bad record; becomes a ``DataError`` or a skipped record once the reader knows its path, line and index."""


@dataclass
class Chat:
    """A conversation; ``tools`` are the function specs offered to the model (OpenAI form), passed to the template.

    Assistant turns before message ``first_trained`` are context only: a conversational prompt/completion record
    trains its completion, not the answers quoted in its prompt.
    """

    messages: Conversation
    tools: list[dict] | None = None
    first_trained: int = 0

    def tool_call_turns(self) -> int:
        """Trained assistant turns that call tools."""
        return sum(1 for m in self.messages[self.first_trained:] if m["role"] == "assistant" and m.get("tool_calls"))


@dataclass
class Document:
    """A text trained whole (continued pretraining)."""

    text: str


@dataclass
class Completion:
    """A plain-text prompt (context) and its completion (trained), no chat template."""

    prompt: str
    completion: str


Item = Chat | Document | Completion


@dataclass
class Kinds:
    """Counts per kind of item, for the data report."""

    chats: int = 0
    documents: int = 0
    completions: int = 0
    tool_call_turns: int = 0

    def add(self, item: Item) -> None:
        if isinstance(item, Document):
            self.documents += 1
        elif isinstance(item, Completion):
            self.completions += 1
        else:
            self.chats += 1
            self.tool_call_turns += item.tool_call_turns()


def texts_of(item: Item) -> list[str]:
    """Every text an item holds (what the built-in model's tokenizer learns from): contents, tool calls and
    results, tool specs."""
    if isinstance(item, Document):
        return [item.text]
    if isinstance(item, Completion):
        return [item.prompt, item.completion]
    out = [json.dumps(item.tools, ensure_ascii=False)] if item.tools else []
    for message in item.messages:
        if message.get("content"):
            out.append(message["content"])
        for call in message.get("tool_calls") or []:
            out.append(json.dumps(call["function"], ensure_ascii=False))
    return out
