"""Checkpoint completeness: the marker lists every file with its size; a resume takes only checkpoints that have
everything it reads, skipping (with a warning naming the files) those that lost some; rotation deletes only after
the newest checkpoint is complete, never leaving a half-deleted folder under a checkpoint's name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from trainer.checkpoints import (
    MARKER,
    CheckpointError,
    complete_checkpoints,
    mark_complete,
    remove_folder,
    resolve_resume,
    resume_problems,
    rotate,
)

PLAIN = {"model.safetensors": 64, "optimizer.pt": 128, "scheduler.pt": 8, "rng_state.pth": 16,
         "trainer_state.json": 4, "training_args.bin": 4, "config.json": 2}


def checkpoint(root: Path, step: int, files: dict[str, int] = PLAIN, mark: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    if mark:
        mark_complete(folder)
    return folder


def test_marker_lists_every_file_with_its_size(tmp_path):
    folder = checkpoint(tmp_path, 3, {**PLAIN, "global_step3/mp_rank_00_model_states.pt": 32})
    listed = json.loads((folder / MARKER).read_text())["files"]
    assert listed["optimizer.pt"] == 128 and listed["global_step3/mp_rank_00_model_states.pt"] == 32
    assert MARKER not in listed and len(listed) == len(PLAIN) + 1


def test_a_checkpoint_that_lost_a_file_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    checkpoint(tmp_path, 3)
    newest = checkpoint(tmp_path, 6)
    (newest / "optimizer.pt").unlink()  # as a kill while rotation deleted it, or a clean-up, leaves it
    (newest / "scheduler.pt").write_bytes(b"x")  # truncated
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-3")
    assert "checkpoint-6 cannot be resumed (optimizer.pt missing; scheduler.pt has 1 bytes, written with 8)" \
        in caplog.text
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_an_explicit_incomplete_checkpoint_is_refused_naming_files_and_alternatives(tmp_path):
    checkpoint(tmp_path, 3)
    broken = checkpoint(tmp_path, 6)
    (broken / "rng_state.pth").unlink()
    with pytest.raises(CheckpointError) as refused:
        resolve_resume(str(broken), tmp_path)
    message = str(refused.value)
    assert f"--resume_from_checkpoint {broken}: this checkpoint is incomplete (rng_state.pth missing)" in message
    assert "that can resume: checkpoint-3" in message and "\n" not in message
    unmarked = checkpoint(tmp_path, 9, mark=False)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_resume(str(unmarked), tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


def test_a_checkpoint_without_optimizer_state_cannot_resume(tmp_path):
    """What the Trainer would resume with a fresh optimizer, silently: an old marker over a half-deleted folder, or
    a --save_only_model checkpoint."""
    old = checkpoint(tmp_path, 2, mark=False)
    (old / MARKER).write_text("ok\n")  # the marker of earlier versions, which listed nothing
    assert resume_problems(old) == []
    (old / "optimizer.pt").unlink()
    assert resume_problems(old) == ["optimizer.pt missing"]
    weights_only = checkpoint(tmp_path, 4, {"model.safetensors": 8, "trainer_state.json": 2, "rng_state.pth": 1})
    assert "saved with --save_only_model?" in "; ".join(resume_problems(weights_only))
    deepspeed = checkpoint(tmp_path, 6, {"global_step6/mp_rank_00_model_states.pt": 8,
                                         "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt": 8, "latest": 1,
                                         "scheduler.pt": 1, "rng_state_0.pth": 1, "trainer_state.json": 1})
    assert resume_problems(deepspeed) == []


def test_rotation_keeps_the_newest_complete_and_what_is_being_written(tmp_path):
    for step in (2, 4, 6):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 1, mark=False)  # an old leftover of a kill
    checkpoint(tmp_path, 8, mark=False)  # a save in progress
    removed = rotate(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    checkpoint(tmp_path, 10)
    assert [p.name for p in rotate(tmp_path, keep=2, protect=tmp_path / "checkpoint-6")] == ["checkpoint-8"]
    assert rotate(tmp_path, keep=None) == []


def test_a_deletion_renames_first_so_a_kill_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path, 3)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)  # killed right after the rename
    remove_folder(folder)
    assert not folder.exists() and complete_checkpoints(tmp_path) == []
