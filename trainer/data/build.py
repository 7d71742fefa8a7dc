"""The data half of the flow, done once: sources → items (chats, documents, completions) → examples (ids + labels)
→ mixture → rows.

:func:`prepare_data` writes the result as memory-mapped Arrow files into a content-addressed folder (see
:mod:`trainer.data.prepared`); everything else reads it from there. The work streams: records are read one at a
time, tokenised a batch at a time (in ``num_proc`` worker processes), written to Arrow as they come, split, mixed
and packed from the example *lengths* alone, and rows are gathered from the examples file by positional reads
(:class:`trainer.data.gather.FileRows`). Memory stays flat whatever the size of the data: 0.79 GB peak RSS for 50k
conversations, 0.97 GB for a million (``bench/prepare.py``).

Nothing is dropped silently: bad records (with ``--on_bad_record skip``), examples left without a trained token,
truncated and dropped examples, what mixing leaves out — all are counted in the report, which is logged and written
to ``data_report.json`` in the output folder. Per source it also counts what kind of data it holds: chats (and their
tool-call turns, and the tokens of tool results, context that is never trained), documents and the chunks long
ones were split into, plain completions.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.data.digests import WrittenFiles
from trainer.data.encode import ConversationEncoder, encode_batches
from trainer.data.formats import DEFAULT_MAX_RECORD_BYTES, DataError, RecordReader, item_with_system
from trainer.data.gather import FileRows, MappedStream
from trainer.data.items import Chat, Kinds
from trainer.data.mixing import mixture
from trainer.data.packing import ROW_SCHEMA, PackingStats, packed_row_batches, row_order
from trainer.data.sources import Source
from trainer.once import Progress

logger = logging.getLogger(__name__)

BATCH_CONVERSATIONS = 512
MAX_LISTED_SKIPS = 1000  # skipped records listed one by one in the report; all are counted

EXAMPLE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("conversation", pa.int64()),  # index over all conversations read, train sources first
    ("source", pa.int32()),  # index into train sources + eval sources
    ("truncated", pa.bool_()),
    ("label_tokens", pa.int32()),
])
UNPACKED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
EVAL_CONVERSATIONS = "eval_conversations.jsonl"  # the held-out conversations, for generating from their prompts


@dataclass(frozen=True)
class DataOptions:
    """Everything besides sources, tokenizer and template that changes the prepared data (part of its key)."""

    max_length: int
    on_overlong: str = "truncate"
    on_bad_record: str = "error"
    val_size: float = 0.0
    max_samples: int | None = None
    system: str | None = None
    packing: bool = False
    seed: int = 42
    mix_by: str = "examples"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    missing_reasoning: str = "error"
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


@dataclass
class DataReport:
    files: list[dict]
    skipped_records: list[dict]
    skipped_count: int = 0
    conversations: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    expanded_conversations: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_without_answer: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0
    sources: list[dict] = field(default_factory=list)
    documents: int = 0
    chunks: int = 0
    completions: int = 0
    tool_call_turns: int = 0
    tool_result_tokens: int = 0
    mixing: dict | None = None
    packing: dict | None = None
    eval_sets: dict | None = None

    def summary(self) -> str:
        lines = [f"data: {len(self.files)} file(s): " + ", ".join(f"{f['path']} ({f['format']}, {f['records']})"
                                                             for f in self.files)]
        expansion = (f" ({self.expanded_conversations} conversation(s) split into one example per assistant turn: "
                     "the template renders their history differently at each turn)"
                     if self.expanded_conversations else "")
        lines.append(
            f"data: {self.conversations} records → {self.train_examples} train / {self.eval_examples} eval "
            f"examples{expansion}, {self.tokens:,} train tokens of which {self.label_tokens:,} labelled; over "
            f"--max_length {self.max_length}: {self.truncated} truncated, {self.dropped_overlong} dropped; "
            f"{self.dropped_without_answer} dropped with no answer token left; {self.skipped_count} bad record(s) "
            "skipped"
        )
        kinds = []
        if self.documents:
            kinds.append(f"{self.documents} document(s) → {self.chunks} example(s) (documents over --max_length "
                         "split into consecutive chunks)")
        if self.completions:
            kinds.append(f"{self.completions} plain prompt/completion(s)")
        if self.tool_call_turns or self.tool_result_tokens:
            kinds.append(f"{self.tool_call_turns} tool-call turn(s) trained, {self.tool_result_tokens:,} tool-result "
                         "tokens (context, never trained)")
        if kinds:
            lines.append("data: " + "; ".join(kinds))
        if self.mixing:
            lines.append("mixing: " + self.mixing["summary"])
        if self.packing:
            lines.append("packing: " + self.packing["summary"])
        return "\n".join(lines)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, values: dict) -> DataReport:
        return cls(**values)


# ------------------------------------------------------------------------------------------------ reading + encoding


@dataclass
class _Stats:
    """Running counts while examples stream in."""

    conversations: int = 0
    train_conversations: int = 0
    examples: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_without_answer: int = 0
    expanded: int = 0
    skipped: list = field(default_factory=list)
    skipped_count: int = 0
    files: list = field(default_factory=list)
    kinds: dict = field(default_factory=lambda: collections.defaultdict(Kinds))  # source index → what it holds
    chunks: collections.Counter = field(default_factory=collections.Counter)  # source index → document examples
    tool_tokens: collections.Counter = field(default_factory=collections.Counter)  # source index → tool-result tokens


def _conversation_batches(sources: list[Source], options: DataOptions, stats: _Stats, meta: collections.deque,
                          train_sources: int) -> Iterator[list]:
    """Batches of validated conversations; ``meta`` gets, per batch, where each conversation came from."""
    for source_index, source in enumerate(sources):
        is_train = source_index < train_sources
        for stream in source.streams:
            reader = RecordReader(stream.where, stream.records(options.max_record_bytes), options.on_bad_record,
                                  max_record_bytes=options.max_record_bytes)
            batch, where = [], []
            records_before = stats.conversations
            for line, item in reader:
                if is_train and options.max_samples is not None and stats.train_conversations >= options.max_samples:
                    break
                stats.kinds[source_index].add(item)
                batch.append(item_with_system(item, options.system))
                where.append((line, reader.count - 1, stats.conversations))
                stats.conversations += 1
                stats.train_conversations += is_train
                if len(batch) == BATCH_CONVERSATIONS:
                    meta.append((reader, source_index, where))
                    yield batch
                    batch, where = [], []
            if batch:
                meta.append((reader, source_index, where))
                yield batch
            stats.files.append({"path": stream.where, "format": reader.format,
                                "records": stats.conversations - records_before})
            _add_skipped(stats, reader.skipped)


def _add_skipped(stats: _Stats, skipped: list) -> None:
    stats.skipped_count += len(skipped)
    room = MAX_LISTED_SKIPS - len(stats.skipped)
    stats.skipped.extend(asdict(s) for s in skipped[: max(room, 0)])
    skipped.clear()


def _examples_batch(encoded, where: list, source_index: int, reader: RecordReader, options: DataOptions,
                    stats: _Stats) -> pa.RecordBatch | None:
    for index, message in encoded.errors:  # a conversation the template cannot render: file:line, or skipped
        line, record, _ = where[index]
        reader.reject(line, record, message)
    _add_skipped(stats, reader.skipped)
    per_conversation = np.bincount(encoded.conversation[~encoded.document], minlength=len(where))
    stats.expanded += int(np.sum(per_conversation > 1))
    keep = encoded.label_counts > 0
    stats.dropped_without_answer += int(np.sum(~keep))
    if options.on_overlong == "drop":
        stats.dropped_overlong += int(np.sum(keep & encoded.truncated))
        keep &= ~encoded.truncated
    else:
        stats.truncated += int(np.sum(keep & encoded.truncated))
    stats.chunks[source_index] += int(np.sum(keep & encoded.document))
    stats.tool_tokens[source_index] += int(encoded.tool_tokens[keep].sum())
    if not keep.any():
        return None
    offsets = np.concatenate([[0], np.cumsum(encoded.lengths, dtype=np.int64)])
    token_keep = np.repeat(keep, encoded.lengths)
    new_offsets = np.concatenate([[0], np.cumsum(encoded.lengths[keep], dtype=np.int64)]).astype(np.int32)
    assert offsets[-1] == len(encoded.input_ids)
    conversation = np.array([where[i][2] for i in encoded.conversation[keep]], dtype=np.int64)
    stats.examples += int(keep.sum())
    stats.tokens += int(new_offsets[-1])
    list_offsets = pa.array(new_offsets, type=pa.int32())
    return pa.RecordBatch.from_arrays([
        pa.ListArray.from_arrays(list_offsets, pa.array(encoded.input_ids[token_keep])),
        pa.ListArray.from_arrays(list_offsets, pa.array(encoded.labels[token_keep])),
        pa.array(conversation),
        pa.array(np.full(int(keep.sum()), source_index, dtype=np.int32)),
        pa.array(encoded.truncated[keep]),
        pa.array(encoded.label_counts[keep]),
    ], schema=EXAMPLE_SCHEMA)


def _encode_all(sources: list[Source], train_sources: int, encoder: ConversationEncoder, options: DataOptions,
                path: Path, num_proc: int, show_progress: bool, progress: Progress | None) -> _Stats:
    stats = _Stats()
    meta: collections.deque = collections.deque()
    batches = _conversation_batches(sources, options, stats, meta, train_sources)
    started = time.perf_counter()
    bar = tqdm(unit=" conversations", desc="preparing data", disable=not show_progress, mininterval=1.0)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, EXAMPLE_SCHEMA) as writer, bar:
        for encoded in encode_batches(encoder, batches, num_proc):
            reader, source_index, where = meta.popleft()
            batch = _examples_batch(encoded, where, source_index, reader, options, stats)
            if batch is not None:
                writer.write_batch(batch)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(len(where))
            bar.set_postfix_str(f"{stats.examples:,} examples, {stats.tokens / elapsed:,.0f} tokens/s", refresh=False)
            if progress is not None:
                progress.update(stage="tokenising", conversations=stats.conversations, tokens=stats.tokens)
    return stats


# ------------------------------------------------------------------------------------------------ split, mix, pack


def _held_out(n_conversations: int, val_size: float, seed: int) -> np.ndarray:
    """A boolean mask of the conversations held out for evaluation (``val_size``: a share below 1, else a count)."""
    held = np.zeros(n_conversations, dtype=bool)
    if val_size <= 0:
        return held
    n_eval = int(round(val_size * n_conversations)) if val_size < 1 else int(val_size)
    if not 0 < n_eval < n_conversations:
        raise DataError(f"--val_size {val_size}: leaves no train or no eval example of {n_conversations}")
    held[np.random.default_rng([seed, 1]).permutation(n_conversations)[:n_eval]] = True
    return held


def _write_examples(path: Path, examples: FileRows, lengths: np.ndarray, index: np.ndarray, packing: bool,
                    max_length: int, seed: int, written: WrittenFiles) -> PackingStats | None:
    """Write the examples at ``index`` of the examples file (``lengths``: of all its examples) to an Arrow file:
    packed into rows, or as they are; its size and digest go into ``written``."""
    lengths = lengths[index]
    if packing:
        rows = [[int(index[i]) for i in row] for row in row_order(lengths.tolist(), max_length, seed)]
        batches, schema = packed_row_batches(examples, rows), ROW_SCHEMA
    else:
        batches = (b for i in range(0, len(index), 4096) for b in examples.take(index[i : i + 4096]).to_batches())
        schema = UNPACKED_SCHEMA
    with written.binary(path) as raw, pa.PythonFile(raw, mode="w") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    if not packing:
        return None
    return PackingStats(examples=len(index), rows=len(rows), tokens=int(lengths.sum()),
                        capacity_tokens=len(rows) * max_length)


def build_prepared(
    folder: Path,
    train_sources: list[Source],
    eval_sources: list[Source],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    options: DataOptions,
    *,
    num_proc: int = 1,
    show_progress: bool = True,
    progress: Progress | None = None,
    written: WrittenFiles | None = None,
) -> DataReport:
    """Fill ``folder`` with ``train.arrow``, ``eval*.arrow`` and ``report.json``; returns the report. Each file's
    size and sha256, computed as it is written, go into ``written``."""
    written = written if written is not None else WrittenFiles()
    sources = train_sources + eval_sources
    encoder = ConversationEncoder(tokenizer, template, options.template_kwargs, options.max_length,
                                  options.missing_reasoning, split_documents=options.on_overlong != "drop")
    examples_path = folder / "examples.arrow"
    stats = _encode_all(sources, len(train_sources), encoder, options, examples_path, num_proc, show_progress,
                        progress)
    if progress is not None:
        progress.update(force=True, stage="packing" if options.packing else "writing", examples=stats.examples)
    stream = MappedStream(examples_path)
    table = stream.table
    conversation = table.column("conversation").to_numpy()
    source = table.column("source").to_numpy()
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    label_tokens = table.column("label_tokens").to_numpy()
    examples = stream.rows(["input_ids", "labels"])  # reads the values by position: none of them mapped in
    del table
    held = _held_out(stats.train_conversations, options.val_size, options.seed)
    is_train_source = source < len(train_sources)
    in_held = np.zeros(len(source), dtype=bool)
    in_held[is_train_source] = held[conversation[is_train_source]]
    train_index = np.flatnonzero(is_train_source & ~in_held)
    eval_index = np.flatnonzero(~is_train_source | in_held)
    if len(train_index) == 0:
        raise DataError("no training example left after tokenisation: "
                        f"{stats.examples} examples in all, {stats.dropped_without_answer} without an answer token, "
                        f"{stats.dropped_overlong} dropped as too long, {stats.skipped_count} bad records skipped")

    per_source = []
    for i, src in enumerate(sources):
        mine = train_index[source[train_index] == i]
        per_source.append({"name": src.name, "key": src.key, "role": "train" if i < len(train_sources) else "eval",
                           "weight": src.weight, "examples": int(np.sum(source == i)),
                           "train_examples": len(mine), "tokens": int(lengths[mine].sum()),
                           "label_tokens": int(label_tokens[mine].sum()), **_kinds_entry(stats, i)})
    mixing = None
    if any(s.weight is not None for s in train_sources):
        by_source = [train_index[source[train_index] == i] for i in range(len(train_sources))]
        chosen = mixture([lengths[b] for b in by_source], [s.weight for s in train_sources], options.mix_by,
                         options.seed)
        parts = []
        for entry, index, picked in zip(per_source, by_source, chosen):
            entry.update(mixed_examples=len(picked), mixed_tokens=int(lengths[index[picked]].sum()),
                         left_out=len(index) - len(picked))
            parts.append(f"{entry['name']} {len(picked):,} of {len(index):,} examples "
                         f"({entry['mixed_tokens']:,} tokens)")
        train_index = np.sort(np.concatenate([index[picked] for index, picked in zip(by_source, chosen)]))
        mixing = {"by": options.mix_by, "summary": f"by {options.mix_by}: " + ", ".join(parts)}

    stats_packing = _write_examples(folder / "train.arrow", examples, lengths, train_index, options.packing,
                                    options.max_length, options.seed, written)
    eval_sets = {}
    present = [int(i) for i in np.unique(source[eval_index])]
    keys = _unique_keys([sources[i] for i in present])
    for i, key in zip(present, keys):
        name = "eval" if len(present) == 1 else f"eval-{key}"
        eval_sets[name] = eval_index[source[eval_index] == i]
    for name, index in eval_sets.items():
        _write_examples(folder / f"{name}.arrow", examples, lengths, index, options.packing, options.max_length,
                        options.seed, written)
    if len(eval_index):
        _write_eval_conversations(folder / EVAL_CONVERSATIONS, sources, len(train_sources), held, options, written)
    report = DataReport(
        files=stats.files, skipped_records=stats.skipped, skipped_count=stats.skipped_count,
        conversations=stats.conversations, train_examples=len(train_index), eval_examples=len(eval_index),
        expanded_conversations=stats.expanded, truncated=stats.truncated, dropped_overlong=stats.dropped_overlong,
        dropped_without_answer=stats.dropped_without_answer, tokens=int(lengths[train_index].sum()),
        max_length=options.max_length, sources=per_source, mixing=mixing,
        label_tokens=int(label_tokens[train_index].sum()),
        eval_sets={name: len(index) for name, index in eval_sets.items()} or None,
        documents=sum(k.documents for k in stats.kinds.values()), chunks=sum(stats.chunks.values()),
        completions=sum(k.completions for k in stats.kinds.values()),
        tool_call_turns=sum(k.tool_call_turns for k in stats.kinds.values()),
        tool_result_tokens=sum(stats.tool_tokens.values()),
    )
    del examples, stream
    examples_path.unlink()
    if stats_packing is not None:
        report.packing = {"summary": str(stats_packing), "efficiency": stats_packing.efficiency,
                          "rows": stats_packing.rows, "examples_per_row": stats_packing.examples_per_row}
    with written.text(folder / "report.json") as out:
        out.write(json.dumps(asdict(report), ensure_ascii=False, indent=2))
    return report


def _kinds_entry(stats: _Stats, source_index: int) -> dict:
    """What a source holds, for its entry in the report: only the kinds it has."""
    kinds = stats.kinds[source_index]
    entry = {"chats": kinds.chats}
    if kinds.documents:
        entry.update(documents=kinds.documents, chunks=stats.chunks[source_index])
    if kinds.completions:
        entry["completions"] = kinds.completions
    if kinds.tool_call_turns or stats.tool_tokens[source_index]:
        entry.update(tool_call_turns=kinds.tool_call_turns, tool_result_tokens=stats.tool_tokens[source_index])
    return entry


def _write_eval_conversations(path: Path, sources: list[Source], train_sources: int, held: np.ndarray,
                              options: DataOptions, written: WrittenFiles) -> None:
    """The evaluation conversations as messages (for generation-based evaluation), from a second pass over the
    sources: cheap next to tokenising, and it keeps the first pass free of anything but what training needs.
    Only plain chats are prompts: documents and plain completions have no chat prompt, and a tool-calling chat needs
    its tools, which generation does not pass."""
    index = 0
    with written.text(path) as out:
        for source_index, source in enumerate(sources):
            is_train = source_index < train_sources
            for stream in source.streams:
                reader = RecordReader(stream.where, stream.records(options.max_record_bytes), options.on_bad_record,
                                      max_record_bytes=options.max_record_bytes)
                for line, item in reader:
                    if is_train and options.max_samples is not None and index >= options.max_samples:
                        break
                    if (not is_train or held[index]) and isinstance(item, Chat) and not item.tools \
                            and not any(m["role"] == "tool" for m in item.messages):
                        row = {"source": source.key, "where": f"{stream.where}:{line}",
                               "messages": item_with_system(item, options.system).messages}
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    index += is_train


def _unique_keys(sources: list[Source]) -> list[str]:
    """Each source's metric key, numbered where two sources would share one."""
    keys = [s.key for s in sources]
    return [k if keys.count(k) == 1 else f"{k}_{i}" for i, k in enumerate(keys)]
