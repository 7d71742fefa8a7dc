"""The data half of the flow: files → conversations → ids + labels → (packed) training rows, with a report.

Nothing is dropped silently: bad records (with ``--on_bad_record skip``), truncated and dropped examples are
counted, and the report is logged and written to ``data_report.json`` in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, disable_progress_bars, enable_progress_bars
from transformers import PreTrainedTokenizerBase

from trainer.data.formats import Conversation, DataError, SkippedRecord, read_conversations, with_system
from trainer.data.packing import PackingStats, pack_dataset, packing_stats
from trainer.data.registry import resolve_dataset
from trainer.data.templates import IGNORE_INDEX, tokenize_conversation

logger = logging.getLogger(__name__)


@dataclass
class Records:
    """Validated conversations from one ``--dataset`` spec, and where they came from."""

    conversations: list[Conversation]
    files: list[dict] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)


@dataclass
class DataReport:
    files: list[dict]
    skipped_records: list[dict]
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_without_answer: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0
    packing: dict | None = None

    def summary(self) -> str:
        lines = [f"data: {len(self.files)} file(s): " + ", ".join(f"{f['path']} ({f['format']}, {f['records']})"
                                                             for f in self.files)]
        lines.append(
            f"data: {self.train_examples} train / {self.eval_examples} eval examples, {self.tokens:,} tokens of "
            f"which {self.label_tokens:,} labelled; over --max_length {self.max_length}: {self.truncated} truncated, "
            f"{self.dropped_overlong} dropped; {self.dropped_without_answer} dropped with no answer token left; "
            f"{len(self.skipped_records)} bad record(s) skipped"
        )
        if self.packing:
            lines.append("packing: " + self.packing["summary"])
        return "\n".join(lines)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")
        return path


def read_records(spec: str, *, data_dir: str | None, on_bad_record: str, system: str | None) -> Records:
    records = Records([])
    for path in resolve_dataset(spec, split="train", data_dir=data_dir):
        loaded = read_conversations(path, on_bad_record=on_bad_record)
        records.conversations.extend(with_system(c, system) for c in loaded.conversations)
        records.files.append({"path": str(path), "format": loaded.format, "records": len(loaded.conversations)})
        records.skipped.extend(loaded.skipped)
    return records


def split_eval(conversations: list[Conversation], val_size: float, seed: int) -> tuple[list, list]:
    """Hold out ``val_size`` (a share below 1, else a count) of the conversations, chosen with ``seed``."""
    if val_size <= 0:
        return conversations, []
    n_eval = int(round(val_size * len(conversations))) if val_size < 1 else int(val_size)
    if not 0 < n_eval < len(conversations):
        raise DataError(f"--val_size {val_size}: leaves no train or no eval example of {len(conversations)}")
    import random

    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)])


def _tokenize_batch(batch: dict, tokenizer, template: str, max_length: int) -> dict:
    out = {"input_ids": [], "labels": [], "truncated": []}
    for messages in batch["messages"]:
        tokenized = tokenize_conversation(tokenizer, template, messages, max_length)
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["truncated"].append(tokenized.truncated)
    return out


def _fingerprint(conversations: list[Conversation], tokenizer, template: str, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(conversations, ensure_ascii=False).encode())
    digest.update(template.encode())
    digest.update(str(max_length).encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def tokenize(
    conversations: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    *,
    max_length: int,
    on_overlong: str,
    num_proc: int | None,
    report: DataReport,
    cache_dir: Path | None,
) -> Dataset:
    """Ids + labels for every conversation; counts truncations and drops into ``report``."""
    if not conversations:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(conversations) >= 20_000 else None
    cache_file = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = str(cache_dir / f"{_fingerprint(conversations, tokenizer, template, max_length)}.arrow")
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length},
        remove_columns=["messages"],
        num_proc=num_proc,
        cache_file_name=cache_file,
        desc="tokenising",
    )
    truncated = tokenized["truncated"]
    keep = [i for i, labels in enumerate(tokenized["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    report.dropped_without_answer += len(tokenized) - len(keep)
    if on_overlong == "drop":
        report.dropped_overlong += sum(1 for i in keep if truncated[i])
        keep = [i for i in keep if not truncated[i]]
    else:
        report.truncated += sum(1 for i in keep if truncated[i])
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns(["truncated"])


def count_tokens(dataset: Dataset) -> tuple[int, int]:
    """Tokens and labelled tokens, counted in Arrow (a Python pass over every token costs seconds on large sets)."""
    table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    label_tokens = pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE_INDEX).cast("int64")).as_py()
    return tokens, label_tokens or 0


@dataclass
class SFTData:
    train: Dataset
    eval: Dataset | None
    report: DataReport
    packing: PackingStats | None


def build_datasets(
    train_records: Records,
    eval_records: Records | None,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    *,
    max_length: int,
    on_overlong: str,
    val_size: float,
    packing: bool,
    seed: int,
    num_proc: int | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> SFTData:
    skipped = train_records.skipped + (eval_records.skipped if eval_records else [])
    report = DataReport(
        files=train_records.files + (eval_records.files if eval_records else []),
        skipped_records=[asdict(s) for s in skipped],
        max_length=max_length,
    )
    train_conversations, eval_conversations = split_eval(train_records.conversations, val_size, seed)
    if eval_records is not None:
        eval_conversations = eval_conversations + eval_records.conversations
    (enable_progress_bars if show_progress else disable_progress_bars)()
    options = dict(max_length=max_length, on_overlong=on_overlong, num_proc=num_proc, report=report,
                   cache_dir=cache_dir)
    train = tokenize(train_conversations, tokenizer, template, **options)
    evaluation = tokenize(eval_conversations, tokenizer, template, **options) if eval_conversations else None
    if len(train) == 0:
        raise DataError(f"no training example left after tokenisation: {report.summary()}")
    report.train_examples, report.eval_examples = len(train), len(evaluation) if evaluation is not None else 0
    report.tokens, report.label_tokens = count_tokens(train)
    stats = None
    if packing:
        train = pack_dataset(train, max_length, seed)
        stats = packing_stats(train, max_length)
        if evaluation is not None:
            evaluation = pack_dataset(evaluation, max_length, seed)
        report.packing = {"summary": str(stats), "efficiency": stats.efficiency, "rows": stats.rows,
                          "examples_per_row": stats.examples_per_row}
    return SFTData(train, evaluation, report, stats)
