"""The output folder over a run's life: one run at a time, checked against the request, replaced last.

:class:`RunFolder` is entered right after the processes of the job have met, and left when the run ends:

1. The main process takes the folder's lock (:mod:`trainer.run.lock`); a second run is refused at once.
2. It finishes what an interrupted earlier start left half done (a replacement, a deletion), then decides:
   a folder holding a finished run, or checkpoints, is refused unless the user says ``--resume_from_checkpoint``
   (continue) or ``--overwrite_output_dir`` (start over); ``latest`` takes the newest checkpoint that can resume,
   whose pickles are then checked to load no code (:mod:`trainer.run.safe_load`).
3. ``--overwrite_output_dir`` moves nothing yet. Only :meth:`RunFolder.begin` — called once configuration, data and
   model have been checked — renames the old run aside, in one atomic rename, to ``.<name>.replaced`` beside the
   folder. It is deleted once the new run's first checkpoint is complete (or the run ends), and renamed back if the
   run fails before that. A kill in between is resolved at the next start: a folder with a complete checkpoint or a
   finished run keeps it and the old run is deleted; otherwise the old run is restored. A finished folder therefore
   never mixes two runs, and a failed start leaves the old run as it was.

Every process receives the same decision from the main process (:func:`trainer.run.decide.decided_on_main`). A
Slurm requeue of a job that already replaced the folder (``--overwrite_output_dir`` with the launcher's
``--resume_from_checkpoint latest``) resumes its own run instead of replacing it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoints import (
    checkpoint_folders,
    checkpoint_step,
    complete_checkpoints,
    marked_files,
    remove_leftovers,
    resolve_resume,
    resumable_checkpoints,
)
from trainer.errors import UserError
from trainer.outputs import FINISHED_MARKER
from trainer.run.decide import barrier, decided_on_main
from trainer.run.lock import RunLock
from trainer.run.safe_load import guard_loading, verify_checkpoint
from trainer.run_config import RUN_CONFIG

if TYPE_CHECKING:
    from trainer.args import Config

logger = logging.getLogger(__name__)

NO_RESUME = (None, "", "none", "false", "False")


class OutputDirError(UserError, ValueError):
    pass


def replaced_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.replaced")


def is_finished(folder: Path) -> bool:
    """A finished run: its results file (written last) is there and whole."""
    try:
        json.loads((folder / FINISHED_MARKER).read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / FINISHED_MARKER).exists() or (folder / RUN_CONFIG).exists()
                                or bool(checkpoint_folders(folder)))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class RunFolder:
    """Use as ``with RunFolder(cfg, is_main) as folder:``; ``folder.resume`` is the checkpoint to resume or None."""

    def __init__(self, cfg: Config, is_main: bool) -> None:
        self.cfg = cfg
        self.given = cfg.training.output_dir
        self.path = Path(self.given).resolve()
        self.aside = replaced_path(self.path)
        self.is_main = is_main
        self.lock = RunLock(self.path) if is_main else None
        self.resume: str | None = None
        self.replacing = False  # an old run is to be moved aside at begin()
        self.replaced = False  # ... and has been
        self.confirmed = False  # ... and is deleted: this run has a checkpoint or has ended
        self.continuing = False  # a finished run resumed (e.g. to a larger --max_steps): unfinished again at begin()
        self._guard: contextlib.AbstractContextManager | None = None
        self._deleting: threading.Thread | None = None

    # ------------------------------------------------------------------ start

    def __enter__(self) -> RunFolder:
        try:
            self.resume = decided_on_main(self._decide, self.is_main)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        if self.resume:
            self._guard = guard_loading(self.resume)
            self._guard.__enter__()
        return self

    def _decide(self) -> str | None:
        self.lock.acquire()
        self._recover()
        remove_leftovers(self.path)
        request = self.cfg.training.resume_from_checkpoint
        if self.cfg.finetune.overwrite_output_dir:
            resume = self._plan_replacement(request)
        else:
            resume = self._check_existing(request)
        if resume:
            verify_checkpoint(resume)
        return resume

    def _recover(self) -> None:
        """Complete or undo a replacement an earlier start was interrupted in."""
        if not self.aside.exists():
            return
        if self.path.is_dir() and (is_finished(self.path) or complete_checkpoints(self.path)):
            shutil.rmtree(self.aside, ignore_errors=True)
            logger.warning("%s: deleted the run it replaced (%s), which an interrupted start had left", self.given,
                           self.aside)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.rename(self.aside, self.path)
        logger.warning("%s: restored the previous run: the run that replaced it (--overwrite_output_dir) ended "
                       "before its first checkpoint", self.given)

    def _plan_replacement(self, request: str | None) -> str | None:
        explicit = request not in NO_RESUME and request != "latest"
        if explicit and _inside(Path(request).resolve(), self.path):
            raise OutputDirError(
                f"--overwrite_output_dir replaces {self.given}, but --resume_from_checkpoint {request} lies inside "
                f"it; drop one of the two"
            )
        if not holds_run(self.path):
            return resolve_resume(request, self.path)
        if request == "latest" and self._started_by_this_slurm_job():
            logger.info("%s holds the run this Slurm job started (a requeue): resuming it, not replacing it",
                        self.given)
            return resolve_resume(request, self.path)
        self._refuse_inputs_inside()
        self.replacing = True
        logger.warning(
            "--overwrite_output_dir: the run in %s is replaced once this run's configuration, data and model are "
            "checked%s", self.given,
            "; --resume_from_checkpoint latest does not resume it" if request == "latest" else "")
        return resolve_resume(request, self.path) if explicit else None

    def _started_by_this_slurm_job(self) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        try:
            start = json.loads((self.path / RUN_CONFIG).read_text(encoding="utf-8")).get("start") or {}
        except (OSError, ValueError):
            return False
        return bool(job) and str(start.get("slurm_job_id")) == job

    def _refuse_inputs_inside(self) -> None:
        """Never replace a folder that holds something this run reads."""
        cfg = self.cfg
        items: list[tuple[str, Any]] = [
            ("the recipe", cfg.recipe), ("--model_name_or_path", cfg.model.model_name_or_path),
            ("--data_dir", cfg.data.data_dir), ("--prepared_data_dir", cfg.data.prepared_data_dir),
            ("--sample_prompts", cfg.data.sample_prompts), ("--sample_references", cfg.data.sample_references),
            ("--deepspeed", cfg.training.deepspeed if isinstance(cfg.training.deepspeed, str) else None),
            ("SFT_CACHE_DIR", os.environ.get("SFT_CACHE_DIR")),
        ]
        for flag, value in (("--dataset", cfg.data.dataset), ("--eval_dataset", cfg.data.eval_dataset)):
            for item in (value or "").split(","):
                name, _, weight = item.strip().rpartition(":")
                items.append((flag, name if name and weight.replace(".", "", 1).isdigit() else item.strip()))
        for flag, value in items:
            if value and Path(str(value)).exists() and _inside(Path(str(value)).resolve(), self.path):
                raise OutputDirError(
                    f"--overwrite_output_dir would replace {self.given}, which holds {flag} {value} of this run; "
                    f"choose another --output_dir or move {value} out of it"
                )

    def _check_existing(self, request: str | None) -> str | None:
        if (self.path / FINISHED_MARKER).exists():
            if request in NO_RESUME or not resumable_checkpoints(self.path, warn=False):
                raise OutputDirError(
                    f"{self.given} already holds a finished run ({FINISHED_MARKER}); choose another --output_dir, "
                    f"pass --overwrite_output_dir to replace it, or --resume_from_checkpoint latest to continue it "
                    f"(e.g. with a larger --max_steps)"
                )
            self.continuing = True
        if checkpoint_folders(self.path) and request in NO_RESUME:
            found = [p.name for p in resumable_checkpoints(self.path, warn=False)]
            raise OutputDirError(
                f"{self.given} holds checkpoints of an unfinished run ({', '.join(found) or 'none that can resume'}); "
                f"pass --resume_from_checkpoint latest to continue it or --overwrite_output_dir to start over"
            )
        resume = resolve_resume(request, self.path)
        if resume and _inside(Path(resume).resolve(), self.path):
            newer = [p.name for p in complete_checkpoints(self.path) if checkpoint_step(p) > checkpoint_step(resume)]
            if newer:
                raise OutputDirError(
                    f"--resume_from_checkpoint {request}: {', '.join(newer)} of the same run are newer, and this run "
                    f"would save over them; move them out of {self.given} to continue from {Path(resume).name}, or "
                    f"resume from latest"
                )
        if resume is None and request == "latest" and any(marked_files(p) is not None
                                                          for p in checkpoint_folders(self.path)):
            raise OutputDirError(
                f"--resume_from_checkpoint latest: {self.given} holds checkpoints, but none can resume (see the "
                f"warnings above); restore their files, or start over with --overwrite_output_dir"
            )
        if resume is None and request == "latest" and checkpoint_folders(self.path):
            logger.warning("%s: no checkpoint was finished before the run stopped: starting fresh", self.given)
        elif resume is None and (self.path / RUN_CONFIG).exists():
            logger.info("%s: an earlier start left no checkpoint: its files are replaced", self.given)
        return resume

    # ------------------------------------------------------------------ the run

    def begin(self) -> None:
        """Configuration, data and model are checked: move a run being replaced aside (every process calls this)."""
        if self.is_main and self.continuing:
            (self.path / FINISHED_MARKER).unlink(missing_ok=True)
            logger.info("%s: continuing the finished run from %s", self.given, Path(self.resume).name)
        if self.is_main and self.replacing and self.path.exists():
            if self.aside.exists():
                shutil.rmtree(self.aside)
            os.rename(self.path, self.aside)
            self.path.mkdir(parents=True)
            self.replaced = True
            logger.warning("--overwrite_output_dir: moved the previous run in %s aside to %s; it is deleted once "
                           "this run writes its first checkpoint (restored if this run fails before)", self.given,
                           self.aside)
        barrier()

    def start_record(self, accepted_changes: list[str]) -> dict[str, Any]:
        """This start of the run, for ``run_config.json``."""
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "resumed_from": self.resume, "accepted_changes": accepted_changes}

    def check(self) -> None:
        """Before marking a checkpoint complete: this run still holds the folder."""
        if self.lock is not None:
            self.lock.check()

    def checkpoint_complete(self, checkpoint: Path) -> None:
        self.confirm()

    def confirm(self) -> None:
        """The new run has a complete checkpoint or has ended: the run it replaced goes.

        Deleted in a background thread (a large run on a shared filesystem can take minutes, during which the other
        ranks would wait in a collective), joined before the process ends; a deletion cut short by a kill is
        finished at the next start."""
        if self.replaced and not self.confirmed:
            self._deleting = threading.Thread(target=shutil.rmtree, args=(self.aside,), kwargs={"ignore_errors": True},
                                              name="delete-replaced-run", daemon=True)
            self._deleting.start()
            logger.info("deleting the replaced run %s", self.aside)
        self.confirmed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
        if not self.is_main:
            return
        try:
            if exc_type is None:
                self.confirm()
            elif self.replaced and not self.confirmed:
                shutil.rmtree(self.path, ignore_errors=True)
                os.rename(self.aside, self.path)
                logger.warning("this run failed before its first checkpoint: restored the previous run in %s",
                               self.given)
        finally:
            if self._deleting is not None:
                self._deleting.join()
            self.lock.release()
