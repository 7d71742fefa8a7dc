"""A full disk while saving is one sentence naming the folder and the free space, not a C++ traceback.

What a full disk looks like depends on the writer: ``OSError(ENOSPC)`` from Python's own files, safetensors'
``IoError(... StorageFull ...)``, and ``torch.save``'s ``inline_container.cc: unexpected pos`` or "file write
failed" (the zip writer checks its position after a short write). A checkpoint that failed this way is never marked
complete (the marker is written only after every rank saved its part), so a resume takes the previous one.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from trainer.errors import UserError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "unexpected pos",
              "file write failed")


class DiskFullError(UserError, OSError):
    """The disk (or quota) of the output folder is full."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an exception it was raised from, is a write that ran out of space."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        if any(text in str(error) for text in FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_space(folder: str | Path) -> str:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


@contextlib.contextmanager
def disk_full_as_error(folder: str | Path, what: str) -> Iterator[None]:
    """Turn a write that ran out of space inside the block into :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"the disk is full: writing {what} to {folder} failed with {free_space(folder)} free; free space (or "
            f"choose an --output_dir on a larger disk) and resume with --resume_from_checkpoint latest, which takes "
            f"the last complete checkpoint"
        ) from error
