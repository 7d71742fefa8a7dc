"""``--dataset`` → the record sources it names, each with a content fingerprint and an optional mixing weight.

An item is a registered name (``tang``), a .json/.jsonl/.parquet/.txt file, a folder of such files, a folder written by
``datasets.Dataset.save_to_disk``, or a Hugging Face hub dataset (``owner/name``, loaded with ``datasets`` and
its cache). ``name:weight`` mixes sources by weight (see :mod:`trainer.data.mixing`). Every source can say what
its content is (a sha256 of the bytes, or the ``datasets`` fingerprint), which keys the prepared data, and stream its
records without loading them all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.digests import file_digest
from trainer.data.formats import DEFAULT_MAX_RECORD_BYTES, DataError, iter_records
from trainer.data.registry import load_registry, resolve_dataset

_WEIGHT = re.compile(r"^(?P<item>.+?):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class RecordStream:
    """One readable unit of records: a file, or a ``datasets`` table (a saved folder or a hub dataset)."""

    where: str  # how messages name it: a path, or "owner/name[train]"
    path: Path | None = None  # a file
    dataset: object = field(default=None, compare=False, hash=False)  # a datasets.Dataset

    def records(self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, object]]:
        """``(line, record)`` of each record; a file's reader bounds a record's size (see ``iter_records``)."""
        if self.path is not None:
            return iter_records(self.path, max_record_bytes)
        return _dataset_records(self.dataset)

    def fingerprint(self) -> str:
        if self.path is not None:
            return file_digest(self.path)
        return f"datasets:{self.dataset._fingerprint}"


@dataclass
class Source:
    """One ``--dataset`` item: a display name, its record streams, and its mixing weight (None: not mixed)."""

    name: str
    streams: list[RecordStream]
    weight: float | None = None

    @property
    def key(self) -> str:
        """A name usable in metric keys (``eval_<key>_loss``)."""
        stem = Path(self.name).stem if Path(self.name).suffix else self.name
        return re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_").lower() or "data"


def split_weights(spec: str) -> list[tuple[str, float | None]]:
    """``"a.jsonl:0.7,tang:0.3"`` → ``[("a.jsonl", 0.7), ("tang", 0.3)]``; weights are all given or none."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise DataError("no dataset given: pass a registered name, a .json/.jsonl/.parquet/.txt file or a folder "
                        "of them")
    parsed = []
    for item in items:
        match = _WEIGHT.match(item)
        if match and not Path(item).exists():
            weight = float(match["weight"])
            if weight <= 0:
                raise DataError(f"--dataset {item}: a mixing weight must be > 0")
            parsed.append((match["item"], weight))
        else:
            parsed.append((item, None))
    weighted = [w is not None for _, w in parsed]
    if any(weighted) and not all(weighted):
        missing = ", ".join(name for name, w in parsed if w is None)
        raise DataError(f"--dataset {spec}: give every source a weight (name:weight) or none; no weight for {missing}")
    return parsed


def resolve_sources(spec: str, split: str = "train", data_dir: str | None = None) -> list[Source]:
    """The sources of a ``--dataset`` spec, with their files found (and registered ones verified)."""
    registry = load_registry()
    sources = []
    for item, weight in split_weights(spec):
        sources.append(Source(item, _streams(item, split, data_dir, registry), weight))
    return sources


def _streams(item: str, split: str, data_dir: str | None, registry: dict) -> list[RecordStream]:
    path = Path(item).expanduser()
    if item not in registry and path.is_dir() and _is_saved_dataset(path):
        return [RecordStream(f"{path}[{split}]", dataset=_load_saved(path, split))]
    if item not in registry and not path.exists() and _HUB_NAME.match(item) and not path.suffix:
        return [RecordStream(f"{item}[{split}]", dataset=_load_hub(item, split))]
    return [RecordStream(str(p), path=p) for p in resolve_dataset(item, split=split, data_dir=data_dir)]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_saved(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: saved dataset has no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown repo, no such split: datasets raises many kinds
        raise DataError(
            f"--dataset {name}: not a registered name or a local path, and loading it as a Hugging Face hub dataset "
            f"failed: {error}"
        ) from None


def _dataset_records(dataset) -> Iterator[tuple[int, object]]:
    """Rows of a ``datasets.Dataset`` as records, a thousand at a time; the row number stands for the line."""
    row = 0
    for batch in dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield row, dict(zip(columns, values))
