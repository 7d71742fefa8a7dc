"""Content digests (sha256) of files: computed while a file is written, and remembered by the file's identity.

Every rank of every run keys its data by content and checks its prepared data before use, and re-reading gigabytes
for that at each start would cost tens of seconds; so a digest is remembered in the cache (``$SFT_CACHE_DIR/digests``)
under the file's identity: device, inode, size, modification time and change time (ctime). An edit in place that
keeps the size and restores the modification time (``cp -p``, ``rsync -t``, ``touch -r``) still moves the ctime,
which no user tool can set back, and a replaced file has another inode: whatever changes a byte changes the identity,
and the file is hashed again.

A digest is remembered only when the file did not change while it was read (the same identity before and after)
and its ctime is at least :data:`SETTLED_S` old: filesystems stamp times at a coarse granularity (milliseconds on
ext4, a second on some), so an edit in the same tick as the hashing could keep every field — git's "racily clean"
file. Such a file is simply hashed again next time. The digest a writer computed as it wrote a file
(:class:`WrittenFiles`) is remembered at once: that file is the writer's own, fresh, and nobody else's yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

from trainer.data.registry import cache_root, sha256_of

SETTLED_S = 2.0  # a file's ctime must be this old before its digest is remembered


def identity(path: Path) -> str:
    """What tells this file's content apart without reading it: a changed byte changes one of these fields."""
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def _memo(key: str) -> Path:
    return cache_root() / "digests" / hashlib.sha256(key.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of ``path``'s bytes: remembered by the file's identity, else computed (and remembered)."""
    before = identity(path)
    try:
        return _memo(before).read_text().strip()
    except OSError:
        pass
    value = sha256_of(path)
    settled = time.time() - path.stat().st_ctime >= SETTLED_S
    if settled and identity(path) == before:
        _remember(before, value)
    return value


def remember(path: Path, digest: str) -> None:
    """Remember the digest computed while writing ``path`` (see :class:`WrittenFiles`)."""
    _remember(identity(path), digest)


def _remember(key: str, digest: str) -> None:
    memo = _memo(key)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache: the digest is still right, only not remembered
        pass


class _HashingFile(io.RawIOBase):
    """A file opened for writing that hashes and counts the bytes as they go through."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self._file.write(data)
        self.sha256.update(memoryview(data)[:written])
        self.size += written
        return written

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class WrittenFiles:
    """The files written into a folder, each with its size and the sha256 computed while it was written (no second
    read): ``files`` maps a file name to ``{"size": bytes, "sha256": hex}``."""

    def __init__(self) -> None:
        self.files: dict[str, dict] = {}

    @contextlib.contextmanager
    def binary(self, path: Path) -> Iterator[io.RawIOBase]:
        """A binary file to write (e.g. for ``pyarrow.PythonFile``), recorded once closed."""
        handle = _HashingFile(path)
        try:
            yield handle
        finally:
            handle.close()
        self.files[path.name] = {"size": handle.size, "sha256": handle.sha256.hexdigest()}

    @contextlib.contextmanager
    def text(self, path: Path) -> Iterator[io.TextIOBase]:
        """A UTF-8 text file to write, recorded once closed."""
        with self.binary(path) as raw, io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8") as out:
            yield out

    def remember(self, folder: Path) -> None:
        """Remember each file's digest by its identity, so that checking the folder next reads none of them."""
        for name, entry in self.files.items():
            remember(folder / name, entry["sha256"])
