"""One run per output folder: a lock file created exclusively beside the folder, kept fresh by a heartbeat.

Why not ``flock``: on the NFS and Lustre filesystems clusters share, ``flock`` is often local to one client, a no-op
or unsupported, so two nodes could both "hold" it. What those filesystems do make atomic is creating a name that
does not exist yet: the lock is a small JSON file written under a private name and then ``link``-ed to
``.<folder>.lock`` (``link`` fails if the name exists, and readers never see a half-written lock).

The lock sits beside the folder, not in it, so that ``--overwrite_output_dir`` can move the whole folder aside in one
rename while the lock stays held (see :mod:`trainer.run.folder`). It names its holder: host, pid, the process's
start time (so a recycled pid is not mistaken for the holder), the machine's boot id, the start time of the run and,
under Slurm, the job id and restart count. The holder's heartbeat thread touches the file every
:data:`HEARTBEAT_S` seconds.

A lock is stale, and taken over with a warning naming the old holder, when
- its holder ran on this machine and that process no longer exists (or this machine rebooted since), or
- its holder ran on another machine and the heartbeat is older than ``SFT_RUN_LOCK_STALE_S`` (default 300 s: well
  above NFS attribute caching and clock skew; a dead node's lock is therefore taken over after 5 minutes), or
- it belongs to an earlier start of the same Slurm job (a requeue: Slurm starts the job again only once the
  previous run has ended).
Otherwise the new run is refused at once, naming the holder. Taking over renames the stale file to a private name
first (only one of two racing takers can rename it) and checks that what it moved is the lock it judged stale.

Only the job's global main process takes the lock; the other processes of the run learn the outcome from it
(:func:`trainer.run.decide.decided_on_main`), so every process of one run — several GPUs, several nodes — shares it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
DEFAULT_STALE_S = 300.0


class RunLockError(UserError, RuntimeError):
    """Another run holds the output folder."""


def stale_after_s() -> float:
    return float(os.environ.get("SFT_RUN_LOCK_STALE_S", DEFAULT_STALE_S))


def lock_path(output_dir: str | Path) -> Path:
    folder = Path(output_dir).resolve()
    return folder.with_name(f".{folder.name}.lock")


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    """Who holds a lock, as written in the lock file."""

    host: str
    pid: int
    started: float
    token: str
    pid_start: int | None = None
    boot_id: str | None = None
    slurm_job_id: str | None = None
    slurm_restart: int = 0

    @classmethod
    def this_process(cls) -> Holder:
        job = os.environ.get("SLURM_JOB_ID")
        return cls(host=socket.gethostname(), pid=os.getpid(), started=time.time(), token=uuid.uuid4().hex,
                   pid_start=_process_start(os.getpid()), boot_id=_boot_id(), slurm_job_id=job,
                   slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) if job else 0)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, started {when}"


def read_holder(path: Path) -> tuple[Holder | None, float]:
    """The holder named in the lock file and the age of its heartbeat in seconds; (None, 0) without a file.

    An unreadable lock (not JSON) names an unknown holder, judged by its heartbeat alone."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, 0.0
    try:
        facts = json.loads(text)
        return Holder(**{k: v for k, v in facts.items() if k in Holder.__dataclass_fields__}), age
    except (ValueError, TypeError, AttributeError):
        return Holder(host="?", pid=-1, started=0.0, token="?"), age


def why_stale(holder: Holder, heartbeat_age: float, me: Holder, stale_s: float) -> str | None:
    """Why ``holder`` no longer holds the lock, or None while it may still be running."""
    if me.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and holder.slurm_restart < me.slurm_restart:
        return (f"it is the previous start of this Slurm job (restart {holder.slurm_restart}; this is restart "
                f"{me.slurm_restart})")
    if holder.host == me.host and holder.pid > 0:
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return "this machine has rebooted since"
        if not _pid_alive(holder.pid):
            return f"process {holder.pid} no longer runs"
        if holder.pid_start is not None and _process_start(holder.pid) not in (None, holder.pid_start):
            return f"process {holder.pid} is another process now"
        return None
    if heartbeat_age > stale_s:
        return f"its heartbeat is {heartbeat_age:.0f} s old (stale after {stale_s:.0f} s)"
    return None


class RunLock:
    """The lock of one output folder, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, output_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float | None = None) -> None:
        self.output_dir = str(output_dir)
        self.path = lock_path(output_dir)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_after_s() if stale_s is None else stale_s
        self.me = Holder.this_process()
        self.held = False
        self.lost_to: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Hold the lock, taking over a stale one (with a warning); :class:`RunLockError` when a run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return
            holder, age = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            reason = why_stale(holder, age, self.me, self.stale_s)
            if reason is None:
                raise RunLockError(
                    f"--output_dir {self.output_dir} is in use by another run ({holder.describe()}, heartbeat "
                    f"{age:.0f} s ago); wait for it to end or choose another --output_dir (if that run is dead, its "
                    f"lock {self.path} is taken over once its heartbeat is {self.stale_s:.0f} s old, or remove it)"
                )
            if self._take_over(holder):
                logger.warning("--output_dir %s: taking over the lock of a run that is gone (%s): %s",
                               self.output_dir, holder.describe(), reason)
        raise RunLockError(f"--output_dir {self.output_dir}: could not take the lock {self.path}: other runs keep "
                           f"taking it; start one run at a time")

    def _create(self) -> bool:
        """Link a complete lock file to the lock name; False if the name exists."""
        tmp = self.path.with_name(f"{self.path.name}.{self.me.host}.{self.me.pid}.{self.me.token[:8]}")
        tmp.write_text(json.dumps(self.me.__dict__), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive creation is atomic there too
            try:
                with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as handle:
                    handle.write(json.dumps(self.me.__dict__))
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: Holder) -> bool:
        """Move the stale lock out of the way; True if what was moved is that lock (then it is deleted)."""
        moved = self.path.with_name(f"{self.path.name}.stale.{self.me.token[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False  # another run took it over first
        holder, _ = read_holder(moved)
        if holder is not None and holder.token != stale.token:  # a fresh lock was moved: put it back
            with contextlib.suppress(OSError):
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = read_holder(self.path)
            if holder is None or holder.token != self.me.token:
                self.lost_to = holder.describe() if holder else "nobody (the lock file was removed)"
                logger.error("--output_dir %s: this run no longer holds its lock (now held by %s)",
                             self.output_dir, self.lost_to)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def check(self) -> None:
        """Refuse to go on writing into the folder once the lock was taken from this run."""
        if self.lost_to is not None:
            raise RunLockError(f"--output_dir {self.output_dir}: another run took this run's lock ({self.lost_to}); "
                               f"stopping before writing more into the folder")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        holder, _ = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
