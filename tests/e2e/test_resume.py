"""Crash safety with real processes: a kill costs only the steps since the last checkpoint, and the resumed run
ends exactly where an uninterrupted one does; preemption saves and exits 75; a dead rank ends the job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DEMO_RECIPE, run_sft, start_sft
from trainer.callbacks.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def common(data: Path, out: Path) -> list[str]:
    return [DEMO_RECIPE, "--dataset", str(data), "--output_dir", str(out), "--report_to", "none",
            "--sample_prompts", "none", "--max_length", "128", "--per_device_train_batch_size", "2",
            "--global_batch_size", "4",
            "--max_steps", "12", "--save_steps", "3", "--save_total_limit", "5", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--seed", "7"]


def wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def max_relative_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max() / (wa[k].abs().max() + 1e-12)) for k in wa)


def losses(out: Path) -> list[float]:
    import json

    return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def train_loss(out: Path) -> float:
    import json

    return json.loads((out / "train_results.json").read_text())["train_loss"]


@pytest.mark.parametrize("nproc", [1, 2], ids=["1proc", "ddp2"])
def test_sigkill_then_resume_equals_uninterrupted(nproc, tang_slice, tmp_path):
    reference = tmp_path / "reference"
    run_sft(*common(tang_slice, reference), nproc=nproc)

    killed = tmp_path / "killed"
    proc = start_sft(*common(tang_slice, killed), log=tmp_path / "killed.log", nproc=nproc)
    wait_for(killed / "checkpoint-6" / "COMPLETE", proc)
    kill_job(proc)
    proc.wait()
    assert not (killed / "train_results.json").exists(), "the run finished before it could be killed"

    run_sft(*common(tang_slice, killed), "--resume_from_checkpoint", "latest", nproc=nproc)
    assert max_relative_difference(reference, killed) < 1e-6
    assert losses(killed)[-3:] == pytest.approx(losses(reference)[-3:], rel=1e-6)
    # The summary covers the whole run, not only the steps after the checkpoint.
    assert train_loss(killed) == pytest.approx(train_loss(reference), rel=1e-6)


def test_sigterm_saves_a_loadable_checkpoint_and_exits_75(tang_slice, tmp_path):
    out = tmp_path / "out"
    proc = start_sft(*common(tang_slice, out), "--max_steps", "400", log=tmp_path / "run.log")
    wait_for(out / "checkpoint-3" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, (tmp_path / "run.log").read_text()[-3000:]
    from trainer.checkpoints import complete_checkpoints

    last = complete_checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) > 3  # saved where it stopped, not only at the last save_steps
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(last)
    assert not (out / "train_results.json").exists()
    assert "resume with --resume_from_checkpoint latest" in (tmp_path / "run.log").read_text()


def test_half_written_checkpoint_is_never_resumed(tang_slice, tmp_path):
    from tests.test_checkpoints import checkpoint
    from trainer.checkpoints import resolve_resume

    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)  # as a kill during saving leaves it: no COMPLETE marker
    (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    checkpoint(out, 3)
    assert resolve_resume("latest", out) == str(out / "checkpoint-3")
    assert resolve_resume("latest", tmp_path / "empty") is None


def kill_job(proc, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and every process below it (torchrun's workers run in sessions of their own)."""
    pids, frontier = [proc.pid], [proc.pid]
    while frontier:
        frontier = [child for pid in frontier for child in _children(pid)]
        pids += frontier
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_dead_rank_ends_the_job_within_60_seconds(tang_slice, tmp_path):
    out = tmp_path / "out"
    proc = start_sft(*common(tang_slice, out), "--max_steps", "400", log=tmp_path / "run.log", nproc=2)
    wait_for(out / "checkpoint-3" / "COMPLETE", proc)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code = proc.wait(timeout=90)
    assert code != 0
    assert time.monotonic() - killed_at < 60
