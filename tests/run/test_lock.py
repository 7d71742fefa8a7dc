"""One run per output folder: the lock refuses a live holder at once and names it, takes over a dead one (a gone
local process, a silent other node, the previous start of the same Slurm job) with a warning, and keeps its
heartbeat."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from trainer.run.lock import Holder, RunLock, RunLockError, lock_path


def plant(path, **facts) -> None:
    holder = {"host": "elsewhere", "pid": 4242, "started": time.time() - 3600, "token": "t0ken", **facts}
    path.write_text(json.dumps(holder))


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_second_run_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "out")
    first.acquire()
    try:
        with pytest.raises(RunLockError) as refused:
            RunLock(tmp_path / "out").acquire()
        message = str(refused.value)
        assert f"--output_dir {tmp_path / 'out'} is in use by another run" in message
        assert f"host {first.me.host}, pid {os.getpid()}" in message and "started 20" in message
        assert lock_path(tmp_path / "out") == tmp_path / ".out.lock"
    finally:
        first.release()
    assert not (tmp_path / ".out.lock").exists()
    again = RunLock(tmp_path / "out")
    again.acquire()
    again.release()


def test_a_dead_local_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / ".out.lock"
    plant(path, host=Holder.this_process().host, pid=int(dead.stdout))
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path / "out")
        lock.acquire()
    assert f"process {int(dead.stdout)} no longer runs" in caplog.text
    assert json.loads(path.read_text())["token"] == lock.me.token
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path, caplog):
    path = tmp_path / ".out.lock"
    me = Holder.this_process()
    plant(path, host=me.host, pid=os.getpid(), pid_start=(me.pid_start or 0) + 1)  # same pid, another process
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path / "out")
        lock.acquire()
    assert "is another process now" in caplog.text
    lock.release()


def test_another_nodes_holder_counts_until_its_heartbeat_is_stale(tmp_path, caplog):
    path = tmp_path / ".out.lock"
    plant(path, host="node17", pid=4242)
    age(path, 100)
    with pytest.raises(RunLockError, match=r"host node17, pid 4242.*heartbeat 10\d s ago"):
        RunLock(tmp_path / "out", stale_s=300).acquire()
    age(path, 400)
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path / "out", stale_s=300)
        lock.acquire()
    assert "its heartbeat is 400 s old (stale after 300 s)" in caplog.text
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_previous_start(tmp_path, monkeypatch, caplog):
    path = tmp_path / ".out.lock"
    plant(path, host="node17", pid=4242, slurm_job_id="77", slurm_restart=0)  # fresh heartbeat, another node
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunLockError, match="Slurm job 77"):  # the same start of the job: a second srun, refused
        RunLock(tmp_path / "out").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path / "out")
        lock.acquire()
    assert "the previous start of this Slurm job" in caplog.text
    lock.release()


def test_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(tmp_path):
    lock = RunLock(tmp_path / "out", heartbeat_s=0.05)
    lock.acquire()
    age(lock.path, 1000)
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    plant(lock.path, host="node3", pid=1)  # someone else's lock now
    time.sleep(0.3)
    with pytest.raises(RunLockError, match="another run took this run's lock.*node3"):
        lock.check()
    lock.release()
    assert lock.path.exists()  # not ours to remove


def test_an_unreadable_lock_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / ".out.lock"
    path.write_text("")
    with pytest.raises(RunLockError):
        RunLock(tmp_path / "out").acquire()
    age(path, 1000)
    lock = RunLock(tmp_path / "out", stale_s=300)
    lock.acquire()
    lock.release()
