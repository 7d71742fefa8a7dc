"""Prepared data on disk: one content-addressed folder per (data, tokenizer, template, options), read by every rank.

    <root>/<key>/train.arrow          training examples or packed rows (Arrow stream, memory-mapped when read)
    <root>/<key>/eval[-<source>].arrow evaluation sets (one per source when the eval data has several)
    <root>/<key>/report.json          the data report
    <root>/<key>/manifest.json        written last: the folder is complete (what was hashed, counts, files)

The key hashes what decides the tokens: the sources' content (sha256 of each file, or a ``datasets``
fingerprint), the tokenizer (its full serialisation and special tokens), the template and its options, and the
data options (lengths, packing, split, seed, mixing...), plus :data:`FORMAT_VERSION`. So the same command finds the
same folder on every node and in every later run — ``python trainer/prepare.py`` ahead of a job, or the first
``sft.py`` process otherwise — and anything that would change a token makes a new folder. The default root is
``$SFT_CACHE_DIR/prepared`` (``--prepared_data_dir`` to choose another, e.g. a shared filesystem).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from trainer.data.build import EVAL_CONVERSATIONS, DataOptions, DataReport, build_prepared
from trainer.data.sources import Source
from trainer.once import build_once

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: items of several kinds (chats with tools, documents, completions); replies end at the stop
MANIFEST = "manifest.json"


@dataclass
class PreparedData:
    folder: Path
    train: datasets.Dataset
    eval: datasets.Dataset | dict[str, datasets.Dataset] | None
    report: DataReport
    built_here: bool

    def eval_conversations(self, limit: int | None = None) -> list[list[dict]]:
        """The first ``limit`` evaluation conversations (messages), in data order; empty without eval data."""
        path = self.folder / EVAL_CONVERSATIONS
        if not path.is_file():
            return []
        out = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                out.append(json.loads(line)["messages"])
        return out


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def data_key(train_sources: list[Source], eval_sources: list[Source], tokenizer: PreTrainedTokenizerBase,
             template: str, options: DataOptions) -> tuple[str, dict]:
    """The folder name for this preparation, and what went into it (kept in the manifest)."""
    inputs = {
        "format_version": FORMAT_VERSION,
        "train": [{"name": s.name, "weight": s.weight, "content": [(r.where, r.fingerprint()) for r in s.streams]}
                  for s in train_sources],
        "eval": [{"name": s.name, "content": [(r.where, r.fingerprint()) for r in s.streams]} for s in eval_sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256(template.encode()).hexdigest(),
        "options": asdict(options),
    }
    text = json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], inputs


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def prepare_data(
    train_sources: list[Source],
    eval_sources: list[Source],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    options: DataOptions,
    root: Path,
    *,
    num_proc: int = 1,
    show_progress: bool = True,
) -> PreparedData:
    """The prepared data for these inputs: found in ``root``, or made now (by this process, or another one)."""
    key, inputs = data_key(train_sources, eval_sources, tokenizer, template, options)

    def build(folder: Path, progress) -> None:
        report = build_prepared(folder, train_sources, eval_sources, tokenizer, template, options,
                                num_proc=num_proc, show_progress=show_progress, progress=progress)
        files = sorted(p.name for p in folder.glob("*.arrow"))
        packing = report.packing or {}
        manifest = {"key": key, "train_examples": report.train_examples, "eval_examples": report.eval_examples,
                    "tokens": report.tokens, "label_tokens": report.label_tokens, "rows": packing.get("rows"),
                    "efficiency": packing.get("efficiency"), "files": files, "inputs": inputs,
                    "report": asdict(report)}
        (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")

    folder, built_here = build_once(root / key, build, is_complete, what="the prepared data")
    return load_prepared(folder, built_here)


def load_prepared(folder: Path, built_here: bool = False) -> PreparedData:
    """Memory-map a complete prepared folder."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    train = datasets.Dataset.from_file(str(folder / "train.arrow"))
    eval_files = sorted(name for name in manifest["files"] if name.startswith("eval"))
    evaluation: datasets.Dataset | dict[str, datasets.Dataset] | None = None
    if eval_files == ["eval.arrow"]:
        evaluation = datasets.Dataset.from_file(str(folder / "eval.arrow"))
    elif eval_files:
        evaluation = {name.removeprefix("eval-").removesuffix(".arrow"):
                      datasets.Dataset.from_file(str(folder / name)) for name in eval_files}
    return PreparedData(folder, train, evaluation, DataReport.from_dict(manifest["report"]), built_here)
