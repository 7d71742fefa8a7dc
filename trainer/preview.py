"""``--preview N``: the first N training examples exactly as training sees them, before any model is loaded.

Each example is shown after templating and truncation, before packing, with the trained text highlighted — green
on a terminal, between ``«`` and ``»`` otherwise — and written to ``OUTPUT_DIR/preview.jsonl`` as one JSON object per
example: ``input_ids`` and ``labels`` (``-100`` = not trained) as training receives them, and the decoded ``text``.
The examples come from the same encoder as training, so what is shown is what is trained.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.encode import ConversationEncoder
from trainer.data.formats import RecordReader, item_with_system
from trainer.data.templates import IGNORE_INDEX
from trainer.preparation import DataSetup

GREEN, RESET = "\033[32m", "\033[0m"


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Maximal runs of trained / untrained tokens."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


def highlight(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], colour: bool) -> str:
    opening, closing = (GREEN, RESET) if colour else ("«", "»")
    return "".join(f"{opening}{tokenizer.decode(run)}{closing}" if trained else tokenizer.decode(run)
                   for trained, run in _runs(ids, labels))


def _examples(setup: DataSetup) -> Iterator[tuple[str, int, list[int], list[int], bool, str]]:
    """``(where, line, input_ids, labels, truncated, note)`` of each training example, in data order; the note says
    which chunk of a long document an example is."""
    options = setup.options
    encoder = ConversationEncoder(setup.tokenizer, setup.template, options.template_kwargs, options.max_length,
                                  options.missing_reasoning, split_documents=options.on_overlong != "drop")
    for source in setup.train_sources:
        for part in source.streams:
            reader = RecordReader(part.where, part.records(options.max_record_bytes), options.on_bad_record,
                                  max_record_bytes=options.max_record_bytes)
            for line, item in reader:
                encoded = encoder.encode([item_with_system(item, options.system)])
                for _, message in encoded.errors:
                    reader.reject(line, reader.count - 1, message)
                ends = np.cumsum(encoded.lengths)
                for k, end in enumerate(ends):
                    start = end - encoded.lengths[k]
                    chunked = bool(encoded.document[k]) and len(ends) > 1
                    yield (part.where, line, encoded.input_ids[start:end].tolist(),
                           encoded.labels[start:end].tolist(), bool(encoded.truncated[k]),
                           f" · document chunk {k + 1}/{len(ends)}" if chunked else "")


def preview(setup: DataSetup, n: int, output_dir: str | Path, stream: TextIO | None = None) -> Path:
    """Print and write the first ``n`` training examples; returns the path of ``preview.jsonl``."""
    stream = stream or sys.stdout
    colour = stream.isatty()
    path = Path(output_dir) / "preview.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = 0
    with path.open("w", encoding="utf-8") as out:
        for where, line, ids, labels, truncated, note in itertools.islice(_examples(setup), n):
            shown += 1
            trained = sum(label != IGNORE_INDEX for label in labels)
            print(f"── example {shown}: {where}:{line} · {len(ids)} tokens, {trained} trained{note}"
                  f"{' · truncated to --max_length' if truncated else ''}"
                  f"{' · NOT TRAINED (no answer token left)' if not trained else ''}", file=stream)
            print(highlight(setup.tokenizer, ids, labels, colour), file=stream)
            row = {"example": shown, "source": where, "line": line, "input_ids": ids, "labels": labels,
                   "text": setup.tokenizer.decode(ids), "truncated": truncated}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    legend = "in green" if colour else "between « and »"
    print(f"── {shown} example(s); trained text {legend}; written to {path}", file=stream)
    return path
