"""Prepared data on disk: one content-addressed folder per (data, tokenizer, template, options), read by every rank.

    <root>/<key>/train.arrow          training examples or packed rows (Arrow stream, memory-mapped when read)
    <root>/<key>/eval[-<source>].arrow evaluation sets (one per source when the eval data has several)
    <root>/<key>/report.json          the data report
    <root>/<key>/manifest.json        written last: the folder is complete (what was hashed, counts, and every file
                                      with its size and the sha256 computed while it was written)

The key hashes what decides the tokens: the sources' content (sha256 of each file, or a ``datasets``
fingerprint), the tokenizer (its full serialisation and special tokens), the template and its options, and the
data options (lengths, packing, split, seed, mixing...), plus :data:`FORMAT_VERSION`. So the same command finds the
same folder on every node and in every later run — ``python trainer/prepare.py`` ahead of a job, or the first
``sft.py`` process otherwise — and anything that would change a token makes a new folder. The default root is
``$SFT_CACHE_DIR/prepared`` (``--prepared_data_dir`` to choose another, e.g. a shared filesystem).

Before use, every process proves the folder is what was written (:func:`check_prepared`): the manifest parses and
matches its own digest, every file it lists has its size (always: one ``stat`` each), and its sha256. The digests
are remembered by file identity (device, inode, size, modification and change time; :mod:`trainer.data.digests`):
the builder records those it computed while writing, and any other cache hashes each file once (every process
that checks before one has remembered it: the ranks of a node starting together each read it), then again only
when something has touched it (any write moves its change time). So the check costs a few ``stat`` calls per start
(0.07 ms) and one full read per file and cache — 0.25 s for a 403 MB train.arrow on a 2-core machine, ~6 s for the
9.2 GB of a million conversations, next to 989 s to prepare them (``bench/data_guards.py``) — instead of trusting
the folder's name. A folder that fails (zeroed or random bytes, a truncated or emptied file, a broken manifest) is
rebuilt with a message naming the file and the fault; where this user cannot replace it (a teammate's read-only
folder), the run is refused with that message. It is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from trainer.data.build import EVAL_CONVERSATIONS, DataOptions, DataReport, build_prepared
from trainer.data.digests import WrittenFiles, file_digest
from trainer.data.sources import Source
from trainer.errors import UserError
from trainer.once import build_once

logger = logging.getLogger(__name__)

# 3: items of several kinds (chats with tools, documents, completions), replies end at the stop token;
# 4: the manifest lists every file with its size and sha256 (both changed what a key's folder holds)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"


class PreparedDataError(UserError, OSError):
    """Prepared data that is damaged or missing and cannot be (re)built by this user."""


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


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_prepared(folder: Path) -> str | None:
    """What is wrong with a prepared folder, or None when it holds exactly what was written.

    Sizes of every listed file first (a ``stat`` each), then their digests (remembered by file identity, so a
    check reads a file only when it is new to this cache or something touched it).
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an unfinished build)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # unreadable, not JSON, wrong shape
        return f"{MANIFEST} is damaged ({type(error).__name__}: {error})"
    if manifest.get("sha256") != _manifest_digest(manifest):
        return f"{MANIFEST} does not match its own digest (edited or damaged)"
    for name, (size, _) in listed.items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual:,} bytes where {size:,} were written"
    for name, (_, digest) in listed.items():
        actual = file_digest(folder / name)
        if actual != digest:
            return f"{name} does not hold the bytes written (sha256 {actual[:12]}..., written {digest[:12]}...)"
    return None


def is_complete(folder: Path) -> bool:
    return check_prepared(folder) is None


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
        written = WrittenFiles()
        report = build_prepared(folder, train_sources, eval_sources, tokenizer, template, options,
                                num_proc=num_proc, show_progress=show_progress, progress=progress, written=written)
        packing = report.packing or {}
        manifest = {"key": key, "train_examples": report.train_examples, "eval_examples": report.eval_examples,
                    "tokens": report.tokens, "label_tokens": report.label_tokens, "rows": packing.get("rows"),
                    "efficiency": packing.get("efficiency"), "files": dict(sorted(written.files.items())),
                    "inputs": inputs, "report": asdict(report)}
        manifest["sha256"] = _manifest_digest(manifest)
        written.remember(folder)  # this folder's files are checked from their digests as written, not re-read
        (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")

    target = root / key
    problem = None
    if target.exists():
        problem = check_prepared(target)
        if problem is None:
            return load_prepared(target)
        # A warning: every rank says it (each found the fault; one rebuilds, the others wait for it).
        logger.warning("prepared data %s: %s; rebuilding it", target, problem)
    _check_writable(root, target, problem)
    try:
        folder, built_here = build_once(target, build, is_complete, what="the prepared data")
    except OSError as error:
        if not problem:
            raise
        raise PreparedDataError(f"prepared data {target}: {problem}, and it could not be replaced ({error}); remove "
                                "it, or pass another --prepared_data_dir") from None
    return load_prepared(folder, built_here)


def _check_writable(root: Path, target: Path, problem: str | None) -> None:
    """Refuse at once, in one sentence, where this user would have to build but cannot write (a teammate's
    read-only ``--prepared_data_dir``), instead of a PermissionError from deep inside the build."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PreparedDataError(f"--prepared_data_dir {root}: cannot create it ({error.strerror}); pass a folder "
                                "you can write to") from None
    if not os.access(root, os.W_OK | os.X_OK):
        what = f"{target.name} is damaged ({problem})" if problem else f"{target.name} is not prepared yet"
        raise PreparedDataError(f"--prepared_data_dir {root}: {what} and this user cannot write there; ask its "
                                "owner to run trainer/prepare.py with the same options, or pass a folder you can "
                                "write to")


def load_prepared(folder: Path, built_here: bool = False) -> PreparedData:
    """Memory-map a complete prepared folder (checked by :func:`check_prepared`)."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    train = datasets.Dataset.from_file(str(folder / "train.arrow"))
    eval_files = sorted(name for name in manifest["files"] if name.startswith("eval") and name.endswith(".arrow"))
    evaluation: datasets.Dataset | dict[str, datasets.Dataset] | None = None
    if eval_files == ["eval.arrow"]:
        evaluation = datasets.Dataset.from_file(str(folder / "eval.arrow"))
    elif eval_files:
        evaluation = {name.removeprefix("eval-").removesuffix(".arrow"):
                      datasets.Dataset.from_file(str(folder / name)) for name in eval_files}
    return PreparedData(folder, train, evaluation, DataReport.from_dict(manifest["report"]), built_here)
