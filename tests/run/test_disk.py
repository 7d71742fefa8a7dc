"""A full disk while saving becomes one sentence naming the folder and the free space, whichever writer hit it."""

from __future__ import annotations

import errno

import pytest

from trainer.run.disk import DiskFullError, disk_full_as_error, is_disk_full

WRITERS = {
    "python": OSError(errno.ENOSPC, "No space left on device"),
    "quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8576 vs 8464"),
    "safetensors": Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No sp'),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_each_writers_full_disk_is_one_sentence(writer, tmp_path):
    with pytest.raises(DiskFullError) as full, disk_full_as_error(tmp_path / "checkpoint-4", "checkpoint-4"):
        raise WRITERS[writer]
    message = str(full.value)
    assert message.startswith(f"the disk is full: writing checkpoint-4 to {tmp_path / 'checkpoint-4'} failed with ")
    assert " free; " in message and "--resume_from_checkpoint latest" in message and "\n" not in message


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError), disk_full_as_error(tmp_path, "x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    chained = RuntimeError("save failed")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(chained) and not is_disk_full(ValueError("unexpected value"))
