"""Checkpoints that can be trusted: a checkpoint is complete only when every file it was written with is still there.

The Trainer writes a checkpoint folder piece by piece (weights, optimizer, RNG, state), on every rank; a job killed
halfway leaves a folder that looks like a checkpoint but cannot resume. After every rank has finished writing, the
main process writes a ``COMPLETE`` marker that lists each file of the folder with its size (to a temporary name,
then renamed: the marker itself is atomic). A checkpoint counts as complete only while every listed file is present
with its listed size, so a folder that lost files afterwards (a rotation interrupted half-way through deleting it, a
user's clean-up) is seen for what it is.

A resume also needs the optimizer, scheduler and trainer state: the HF Trainer silently starts a fresh optimizer when
``optimizer.pt``/``scheduler.pt`` are missing. :func:`resume_problems` names what a checkpoint lacks for a resume;
``latest`` skips such a checkpoint with a warning naming the files and falls back to the previous complete one; an
explicit ``--resume_from_checkpoint PATH`` to one is refused in one sentence.

Old checkpoints are deleted by :func:`rotate` only after the new one is marked complete, and each is first renamed
out of the ``checkpoint-N`` namespace, so an interrupted deletion never leaves a half-deleted folder that looks like a
checkpoint, and the newest complete checkpoint is never the one being deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from trainer.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
MARKER_FORMAT = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_DELETING = ".deleting-"
# Written per checkpoint but never read by a resume (the HF Trainer does not load it back).
NOT_NEEDED_FOR_RESUME = {"training_args.bin"}


class CheckpointError(UserError, ValueError):
    pass


def checkpoint_step(path: str | Path) -> int | None:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder of a run, complete or not, by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, child) for child in folder.iterdir()
             if (step := checkpoint_step(child)) is not None and child.is_dir()]
    return [path for _, path in sorted(found)]


def list_files(checkpoint: str | Path) -> dict[str, int]:
    """Every file below ``checkpoint`` (relative POSIX path -> size in bytes), the marker itself excepted."""
    root = Path(checkpoint)
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if relative in (MARKER, f".{MARKER}.tmp"):
                continue
            files[relative] = path.stat().st_size
    return dict(sorted(files.items()))


def mark_complete(checkpoint: str | Path, files: dict[str, int] | None = None) -> None:
    """Write the marker listing ``files`` (default: what the folder holds now), atomically."""
    checkpoint = Path(checkpoint)
    files = list_files(checkpoint) if files is None else files
    tmp = checkpoint / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, checkpoint / MARKER)


def marked_files(checkpoint: str | Path) -> dict[str, int] | None:
    """The files the marker lists; ``{}`` for an old marker without a list; None without a (readable) marker."""
    try:
        text = (Path(checkpoint) / MARKER).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        marker = json.loads(text)
    except ValueError:
        return {} if text.strip() == "ok" else None  # "ok": the marker of earlier versions, which listed nothing
    files = marker.get("files") if isinstance(marker, dict) else None
    return {str(k): int(v) for k, v in files.items()} if isinstance(files, dict) else None


def integrity_problems(checkpoint: str | Path) -> list[str] | None:
    """What is wrong with a marked checkpoint's files (``[]``: nothing), or None when it carries no marker."""
    listed = marked_files(checkpoint)
    if listed is None:
        return None
    root = Path(checkpoint)
    problems = []
    for name, size in listed.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, written with {size}")
    return problems


def resume_problems(checkpoint: str | Path) -> list[str]:
    """What a resume from ``checkpoint`` would lack: integrity problems, or state the Trainer would silently
    replace (optimizer, scheduler, trainer state) or never find (weights). ``[]`` when it can resume."""
    problems = integrity_problems(checkpoint)
    if problems is None:
        return [f"no {MARKER} marker (the checkpoint was never finished)"]
    if problems:
        return problems
    root = Path(checkpoint)
    present = set(list_files(root))
    deepspeed = any(name.startswith("global_step") and "/" in name for name in present)
    needed = ["trainer_state.json", "scheduler.pt"]
    if not deepspeed:
        needed.append("optimizer.pt")
        if not any(re.fullmatch(r"(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|"
                                r"(model|pytorch_model)\.(safetensors|bin)\.index\.json", name) for name in present):
            problems.append("no model or adapter weights")
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", name) for name in present):
        needed.append("rng_state.pth")
    problems += [f"{name} missing" for name in needed if name not in present]
    if problems and "optimizer.pt" in needed and "optimizer.pt" not in present and "scheduler.pt" not in present:
        problems.append("saved with --save_only_model? such a checkpoint holds weights only and cannot resume a run")
    return problems


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run (marked, every listed file intact), oldest first."""
    return [path for path in checkpoint_folders(output_dir) if integrity_problems(path) == []]


def resumable_checkpoints(output_dir: str | Path, warn: bool = True) -> list[Path]:
    """Checkpoints a resume can use, oldest first; with ``warn``, every marked one skipped is named with why."""
    found = []
    for path in checkpoint_folders(output_dir):
        if marked_files(path) is None:
            continue  # never finished: an interrupted save, expected after a kill
        problems = resume_problems(path)
        if problems:
            if warn:
                logger.warning("%s cannot be resumed (%s): skipped", path, "; ".join(problems))
        else:
            found.append(path)
    return found


def describe_resumable(output_dir: str | Path) -> str:
    found = [p.name for p in resumable_checkpoints(output_dir, warn=False)]
    return f"checkpoints in {output_dir} that can resume: {', '.join(found) or 'none'}"


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """``latest`` -> the newest checkpoint of ``output_dir`` that can resume, or None (fresh start); a path must be
    a checkpoint that can resume, else :class:`CheckpointError` names what it lacks and what there is instead."""
    if value in (None, "", "none", "false", "False"):
        return None
    if value == "latest":
        found = resumable_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such folder; {describe_resumable(output_dir)}")
    if marked_files(path) is None and not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no checkpoint there (no {MARKER} marker, no "
                              f"trainer_state.json); {describe_resumable(output_dir)}")
    problems = resume_problems(path)
    if problems:
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: this checkpoint is incomplete ({'; '.join(problems)}); "
            f"{describe_resumable(output_dir)} (--resume_from_checkpoint latest takes the newest)"
        )
    return str(path)


def remove_folder(path: Path) -> None:
    """Delete a folder so that an interruption never leaves a partial one under its name: renamed first (atomic),
    then removed."""
    doomed = path.with_name(f"{_DELETING}{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(output_dir: str | Path) -> None:
    """Finish deletions an earlier run was interrupted in."""
    folder = Path(output_dir)
    for path in folder.glob(f"{_DELETING}checkpoint-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def rotate(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> list[Path]:
    """Delete checkpoints beyond the newest ``keep`` complete ones (and ``protect``, the best model's), oldest first.

    Called once the newest checkpoint is marked complete. Folders newer than the newest complete checkpoint (a save
    in progress) are never touched; incomplete ones older than it are leftovers of a kill and go too.
    """
    if not keep or keep <= 0:
        return []
    folders = checkpoint_folders(output_dir)
    complete = [p for p in folders if integrity_problems(p) == []]
    if not complete:
        return []
    kept = {p.name for p in complete[-keep:]} | ({Path(protect).name} if protect else set())
    newest_step = checkpoint_step(complete[-1])
    removed = []
    for path in folders:
        if path.name in kept or checkpoint_step(path) > newest_step:
            continue
        remove_folder(path)
        removed.append(path)
    return removed
