"""Files and folders the team can read: created with the permissions the umask gives, and still atomically.

Two things made a run's results private to its owner whatever the umask, so that on a cluster's shared filesystem
the team saw the folder but could not load the weights (the loader then says "No such file"):

- ``tempfile.mkdtemp`` creates its folder 0700, and the staging folders renamed into place (prepared data, the
  built-in model, merged models) kept that mode. :func:`staging_dir` makes them with ``os.mkdir`` instead: 0777
  less the umask, like any folder (0755 under umask 022).
- safetensors >= 0.8 writes every file through a temporary file, which the Rust ``tempfile`` crate creates 0600,
  and renames it into place (safetensors issue #782), so every ``*.safetensors`` — final model, checkpoints,
  adapters, merged models, the built-in model — came out 0600. :func:`readable_weights` gives them, right after
  they are written, the mode any new file gets: 0666 less the umask (0644 under umask 022).
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (``os.umask`` sets it while reading it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set a strict mask for the instant it takes to read the old one
        old = os.umask(0o077)
        os.umask(old)
    return old


def new_file_mode() -> int:
    """The mode a newly created file gets under the current umask (0644 under 022, 0664 under 002)."""
    return 0o666 & ~current_umask()


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` with a unique name starting with ``prefix``, created with the mode the
    umask gives any folder (``tempfile.mkdtemp``'s would be 0700); to be filled and renamed into place."""
    for _ in range(100):
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name for a staging folder {parent}/{prefix}*")


def readable_weights(folder: str | Path) -> None:
    """Give every ``*.safetensors`` file in ``folder`` the mode a new file gets (safetensors writes them 0600)."""
    mode = new_file_mode()
    for path in Path(folder).glob("*.safetensors"):
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
