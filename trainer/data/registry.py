"""Named datasets -> verified local files.

A name in a recipe must mean the same bytes on every machine, so each registered split carries a sha256 that is
checked wherever the file comes from: a local copy (``--data_dir`` / ``SFT_DATA_DIR``, for clusters without
internet), the cache, or a fresh download. When nothing works, the error says how to supply the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.request
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from trainer.data.formats import EXTENSIONS, DataError
from trainer.file_modes import new_file_mode

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "data" / "datasets.yaml"
DATA_DIR_ENV = "SFT_DATA_DIR"
CACHE_DIR_ENV = "SFT_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 60

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def load_registry(registry_file: str | Path | None = None) -> dict:
    """Return ``{name: entry}`` from the registry YAML, checked enough that a typo fails here and not mid-download."""
    path = Path(registry_file) if registry_file is not None else DEFAULT_REGISTRY
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"dataset registry {path} not found") from None
    except yaml.YAMLError as err:
        raise DataError(f"dataset registry {path} is not valid YAML: {err}") from None
    datasets = content.get("datasets") if isinstance(content, dict) else None
    if not isinstance(datasets, dict):
        raise DataError(f"dataset registry {path}: expected a top-level mapping 'datasets: {{name: entry}}'")
    for name, entry in datasets.items():
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict) or not splits:
            raise DataError(f"dataset registry {path}: dataset {name!r} needs a non-empty 'splits' mapping")
        for split, source in splits.items():
            if not isinstance(source, dict) or not any(isinstance(source.get(k), str) for k in ("url", "path")):
                raise DataError(f"dataset registry {path}: {name}.{split} needs a 'url' (or a 'path' in the repo)")
            _check_digest(path, f"{name}.{split}", source)
            references = source.get("references")
            if references is not None:
                if not isinstance(references, dict) or not any(
                        isinstance(references.get(k), str) for k in ("url", "path", "filename")):
                    raise DataError(f"dataset registry {path}: {name}.{split}.references needs a 'url', 'path' or "
                                    "'filename'")
                _check_digest(path, f"{name}.{split}.references", references)
    return datasets


def _check_digest(path: Path, where: str, source: dict) -> None:
    if not _SHA256.fullmatch(str(source.get("sha256", ""))):
        raise DataError(f"dataset registry {path}: {where} needs a 'sha256' of 64 lowercase hex digits")


def registered_names(registry_file: str | Path | None = None) -> list[str]:
    return sorted(load_registry(registry_file))


def has_split(name: str, split: str, registry_file: str | Path | None = None) -> bool:
    """Whether a registered dataset offers ``split`` (e.g. to decide if there is an eval set at all)."""
    return split in _entry(name, load_registry(registry_file))["splits"]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sft-trainer")


def resolve_dataset(
    spec: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    registry_file: str | Path | None = None,
) -> list[Path]:
    """Turn ``--dataset`` (comma-separated registered names, files or folders) into the list of files to read.

    Registered names win over same-named paths; files and folders are taken as they are, whatever the split.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise DataError("no dataset given: pass a registered name, a .json/.jsonl/.parquet/.txt file or a folder "
                        "of them")
    registry = load_registry(registry_file)
    local_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    files: list[Path] = []
    for item in items:
        if item in registry:
            files.append(_fetch(item, split, registry, Path(local_dir) if local_dir else None))
        else:
            files.extend(_local_files(item, registry))
    return files


def _entry(name: str, registry: dict) -> dict:
    if name not in registry:
        raise DataError(f"unknown dataset {name!r}; registered names: {', '.join(sorted(registry))}")
    return registry[name]


def _local_files(item: str, registry: dict) -> list[Path]:
    path = Path(item).expanduser()
    if path.is_dir():
        # Record files if there are any; else the folder is a corpus of .txt documents. Beside record files, .txt
        # files are notes (a README), not data: name one in --dataset to train it.
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        found = [p for p in files if p.suffix.lower() != ".txt"] or files
        if not found:
            raise DataError(f"dataset folder {path} holds no .json, .jsonl, .parquet or .txt files")
        return found
    if path.is_file():
        if path.suffix.lower() not in EXTENSIONS:
            raise DataError(f"dataset file {path} must end in .json, .jsonl, .parquet or .txt")
        return [path]
    if path.suffix or os.sep in item or "/" in item:
        raise DataError(f"dataset file {path} not found")
    raise DataError(
        f"unknown dataset {item!r}: neither a registered name nor an existing path; "
        f"registered names: {', '.join(sorted(registry))}"
    )


def _filename(source: dict) -> str:
    return source.get("filename") or (source.get("url") or source["path"]).rstrip("/").rsplit("/", 1)[-1]


def resolve_references(name: str, split: str, data_dir: str | Path | None = None,
                       registry_file: str | Path | None = None) -> Path | None:
    """The references file of a registered split (e.g. the Tang test set's ground truth), or None without one.

    Found and verified like a split; one registered without a ``url`` is used only where a local copy is found.
    """
    source = _entry(name, load_registry(registry_file))["splits"].get(split, {}).get("references")
    if source is None:
        return None
    local_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return _locate(name, f"{split} references", source, Path(local_dir) if local_dir else None)


def _fetch(name: str, split: str, registry: dict, local_dir: Path | None) -> Path:
    splits = _entry(name, registry)["splits"]
    if split not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(splits)}")
    return _locate(name, split, splits[split], local_dir)


def _locate(name: str, split: str, source: dict, local_dir: Path | None) -> Path | None:
    """A registered file: shipped in the repo (``path``), a local copy, the cache, or a download; None when it has
    no ``url`` and is nowhere local."""
    filename, expected = _filename(source), source["sha256"]
    if "path" in source:  # shipped with the project (the offline demo set)
        shipped = DEFAULT_REGISTRY.parent / source["path"]
        if not shipped.is_file() or sha256_of(shipped) != expected:
            raise DataError(f"dataset {name!r} ({split}): the shipped file {shipped} is missing or changed "
                            f"(sha256 expected {expected})")
        return shipped
    looked_in: list[Path] = []

    if local_dir is not None:
        for candidate in (local_dir / filename, local_dir / name / filename):
            looked_in.append(candidate)
            if candidate.is_file():
                actual = sha256_of(candidate)
                if actual != expected:
                    raise DataError(
                        f"local copy {candidate} of dataset {name!r} ({split}) has the wrong content: "
                        f"sha256 expected {expected}, actual {actual}"
                    )
                return candidate

    cached = cache_root() / "datasets" / name / filename
    looked_in.append(cached)
    if cached.is_file():
        if sha256_of(cached) == expected:
            return cached
        cached.unlink()  # stale or damaged: fetch it again rather than fail on a cache the user never touched

    if "url" not in source:
        return None
    _download(source["url"], cached, expected, name, split, filename, looked_in)
    return cached


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(
    url: str, target: Path, expected: str, name: str, split: str, filename: str, looked_in: list[Path]
) -> None:
    """Stream to a temporary file beside ``target`` and rename only once the digest matches, so that a concurrent
    reader (another rank) or an interrupted run never sees a partial or wrong file under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    size = response.headers.get("Content-Length")
                    total = int(size) if size else None
                    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}/{filename}", disable=not total)
                    with bar:
                        for chunk in iter(lambda: response.read(_CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, bad URLs
                raise DataError(_offline_message(name, split, url, filename, expected, looked_in, err)) from None
        actual = digest.hexdigest()
        if actual != expected:
            raise DataError(
                f"download of dataset {name!r} ({split}) from {url} has the wrong content: "
                f"sha256 expected {expected}, actual {actual}; the file was not kept"
            )
        os.chmod(tmp, new_file_mode())  # mkstemp's file is 0600: a shared cache must be readable by the team
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _offline_message(
    name: str, split: str, url: str, filename: str, expected: str, looked_in: list[Path], err: Exception
) -> str:
    places = "\n".join(f"  {p}" for p in looked_in)
    return (
        f"could not download dataset {name!r} ({split}) from {url}: {err}\n"
        f"Not found locally either; looked in:\n{places}\n"
        "To use a local copy (e.g. on a machine without internet), either\n"
        f"  - put {filename} in a folder DIR (or in DIR/{name}/) and pass --data_dir DIR or set {DATA_DIR_ENV}=DIR;\n"
        f"    its sha256 must be {expected}\n"
        f"  - or pass the file itself: --dataset /path/to/{filename}"
    )
