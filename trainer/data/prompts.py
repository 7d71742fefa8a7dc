"""Prompts for generation (sample outputs, test-set predictions), from the same record formats as training.

Unlike training records, a prompt record may lack its answer (the Tang test set has only instruction and
input); when an answer is there it is kept as the reference shown beside the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.data.formats import Conversation, read_conversations, with_system


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
