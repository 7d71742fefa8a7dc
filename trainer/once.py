"""Build a folder once, whoever gets there first: the other processes wait for it on the filesystem.

Used for what every rank of a job needs but only one should make — the prepared data, the built-in tiny model —
on one machine or across nodes sharing a filesystem. Nothing here is a collective: a long preparation cannot hit an
NCCL/gloo timeout, and a process that dies while building lets the next one take over.

- The builder holds an exclusive ``flock`` on ``<target>.lock`` and builds into a temporary folder beside the
  target (created with the umask's mode, like the files in it, so that other users of a shared filesystem can read
  it), which it renames into place only once :func:`build_once`'s ``is_complete`` accepts it. Readers therefore
  see a complete folder or none; a half-written build is never used, and two builders (a filesystem without locks,
  or two launches at once) cannot corrupt each other: the first rename wins, the other copy is discarded.
- Waiters poll for the completed folder and print a progress line (what the builder last wrote to
  ``<target>.progress``) every ``report_every_s`` seconds. If the lock becomes free and the folder is still missing,
  the builder died: the next waiter builds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from trainer.file_modes import staging_dir

logger = logging.getLogger(__name__)


class Progress:
    """What a builder tells waiters: a small JSON file rewritten at most every ``every_s`` seconds."""

    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path = path
        self.every_s = every_s
        self._last = 0.0

    def update(self, force: bool = False, **facts) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        facts.update(host=socket.gethostname(), pid=os.getpid(), time=time.time())
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(facts), encoding="utf-8")
            os.replace(tmp, self.path)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Yield True holding an exclusive lock on ``path``, False when another process holds it."""
    handle = open(path, "a+")  # noqa: SIM115 - closed below
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as error:  # a filesystem without flock (some NFS mounts): build anyway, renames stay safe
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: file locks unsupported here (%s); building without one", path, error)
        yield True
    finally:
        handle.close()


def build_once(
    target: Path,
    build: Callable[[Path, Progress], None],
    is_complete: Callable[[Path], bool],
    *,
    what: str,
    poll_s: float = 1.0,
    report_every_s: float = 30.0,
) -> tuple[Path, bool]:
    """Return ``(target, built_here)`` once ``is_complete(target)``; build it here when nobody else is.

    ``build(folder, progress)`` fills an empty temporary folder; ``what`` names the thing in progress lines.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    progress_file = target.with_name(target.name + ".progress")
    started = time.monotonic()
    last_report = started
    while not is_complete(target):
        with _try_lock(lock) as locked:
            if locked and not is_complete(target):
                _build_into(target, build, is_complete, Progress(progress_file), what)
                return target, True
        now = time.monotonic()
        if now - last_report >= report_every_s:
            last_report = now
            print(f"[{socket.gethostname()}:{os.getpid()}] waiting {now - started:.0f} s for {what} in {target} "
                  f"({_progress_line(progress_file)})", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    return target, False


def _build_into(target: Path, build: Callable[[Path, Progress], None], is_complete: Callable[[Path], bool],
                progress: Progress, what: str) -> None:
    tmp = staging_dir(target.parent, f".{target.name}.tmp-")  # the umask's mode: the team reads what is built
    try:
        build(tmp, progress)
        if not is_complete(tmp):
            raise RuntimeError(f"building {what} left an incomplete folder {tmp}")
        if target.exists():  # an incomplete leftover (e.g. of an interrupted older version): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            # another builder (no lock on this filesystem) finished first: its copy is the same, ours goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        progress.path.unlink(missing_ok=True)


def _progress_line(path: Path) -> str:
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no progress reported yet"
    age = time.time() - facts.pop("time", time.time())
    who = f"{facts.pop('host', '?')}:{facts.pop('pid', '?')}"
    return f"builder {who}: " + ", ".join(f"{k} {v}" for k, v in facts.items()) + f" ({age:.0f} s ago)"
