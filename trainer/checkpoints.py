"""Checkpoints that can be trusted: complete ones are marked, and ``latest`` only ever picks a complete one.

The Trainer writes a checkpoint folder piece by piece (weights, optimizer, RNG, state); a job killed halfway
leaves a folder that looks like a checkpoint but cannot resume. After every rank has finished writing, the main
process drops a ``COMPLETE`` marker in the folder (written to a temporary name and renamed, so the marker itself
is atomic). Resolution of ``latest`` ignores unmarked folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from trainer.errors import UserError

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError, ValueError):
    pass


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """``latest`` → newest complete checkpoint of ``output_dir`` or None (fresh start); a path must be one."""
    if value in (None, "", "none", "false", "False"):
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: no checkpoint there (no trainer_state.json); "
            f"complete checkpoints in {output_dir}: {[p.name for p in complete_checkpoints(output_dir)] or 'none'}"
        )
    return str(path)


def mark_complete(checkpoint: str | Path) -> None:
    tmp = Path(checkpoint) / f".{MARKER}.tmp"
    tmp.write_text("ok\n")
    os.replace(tmp, Path(checkpoint) / MARKER)


class MarkCompleteCallback(TrainerCallback):
    """Marks each checkpoint complete once all ranks have written their part of it."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control
