"""The output folder over a run's life: refused when it holds a run nobody said what to do with; replaced last
(nothing moved until :meth:`begin`, the old run deleted at the first checkpoint, restored if the run fails before);
an interrupted replacement completed or undone at the next start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_checkpoints import checkpoint
from trainer.args import parse_config
from trainer.run.folder import OutputDirError, RunFolder
from trainer.run.lock import RunLockError


def config(out: Path, *extra: str):
    return parse_config(["--output_dir", str(out), "--dataset", "tang-demo", "--report_to", "none", *extra])


def finished_run(out: Path) -> dict[str, bytes]:
    checkpoint(out, 6)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "run_config.json").write_text('{"start": {"slurm_job_id": "41"}}')
    (out / "train_results.json").write_text('{"train_loss": 1.0}')
    return snapshot(out)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_refused_unless_told_what_to_do(tmp_path):
    out = tmp_path / "out"
    finished_run(out)
    with pytest.raises(OutputDirError, match="already holds a finished run"):
        RunFolder(config(out), is_main=True).__enter__()
    (out / "train_results.json").unlink()
    with pytest.raises(OutputDirError, match=r"holds checkpoints of an unfinished run \(checkpoint-6\); pass "
                                             r"--resume_from_checkpoint latest"):
        RunFolder(config(out), is_main=True).__enter__()
    with RunFolder(config(out, "--resume_from_checkpoint", "latest"), is_main=True) as folder:
        assert folder.resume == str(out.resolve() / "checkpoint-6")
        with pytest.raises(RunLockError, match="is in use by another run"):  # while this one runs
            RunFolder(config(out, "--resume_from_checkpoint", "latest"), is_main=True).__enter__()
    (out / "train_results.json").write_text("{}")  # finished: a resume continues it (e.g. to more steps)
    with RunFolder(config(out, "--resume_from_checkpoint", "latest"), is_main=True) as folder:
        assert folder.resume == str(out.resolve() / "checkpoint-6")
        assert (out / "train_results.json").exists()
        folder.begin()
        assert not (out / "train_results.json").exists()  # a kill from here on leaves an unfinished run


def test_overwrite_moves_nothing_until_begin_and_deletes_at_the_first_checkpoint(tmp_path):
    out = tmp_path / "out"
    before = finished_run(out)
    with RunFolder(config(out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"), True) as folder:
        assert folder.resume is None
        assert snapshot(out) == before  # configuration, data, model not yet checked: nothing moved
        folder.begin()
        assert list(out.iterdir()) == [] and snapshot(tmp_path / ".out.replaced") == before
        checkpoint(out, 2)
        folder.checkpoint_complete(out / "checkpoint-2")
        folder._deleting.join()
        assert not (tmp_path / ".out.replaced").exists()
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]


def test_a_run_failing_before_its_first_checkpoint_leaves_the_old_run_intact(tmp_path):
    out = tmp_path / "out"
    before = finished_run(out)
    with pytest.raises(FloatingPointError), RunFolder(config(out, "--overwrite_output_dir"), True) as folder:
        folder.begin()
        (out / "run_config.json").write_text("{}")  # the new run's first files
        (out / "checkpoint-2").mkdir()  # an unfinished save
        raise FloatingPointError("diverged")
    assert snapshot(out) == before
    assert not (tmp_path / ".out.replaced").exists() and not (tmp_path / ".out.lock").exists()


def test_a_killed_replacement_is_undone_or_completed_at_the_next_start(tmp_path):
    out = tmp_path / "out"
    before = finished_run(out)
    aside = tmp_path / ".out.replaced"
    out.rename(aside)  # killed after the move, before the first checkpoint
    (out / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="already holds a finished run"):  # restored, then judged as before
        RunFolder(config(out), True).__enter__()
    assert snapshot(out) == before and not aside.exists()

    out.rename(aside)  # killed after the first checkpoint, before the old run was deleted
    checkpoint(out, 2)
    with RunFolder(config(out, "--resume_from_checkpoint", "latest"), True) as folder:
        assert folder.resume.endswith("checkpoint-2")
    assert not aside.exists()


def test_a_requeued_slurm_job_resumes_the_run_it_started_instead_of_replacing_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    finished_run(out)
    (out / "train_results.json").unlink()
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with RunFolder(config(out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"), True) as folder:
        assert folder.resume.endswith("checkpoint-6") and not folder.replacing
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # another job: replaces it
    with RunFolder(config(out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"), True) as folder:
        assert folder.resume is None and folder.replacing


def test_overwrite_never_replaces_a_folder_holding_this_runs_inputs(tmp_path):
    out = tmp_path / "out"
    finished_run(out)
    data = out / "mine.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    cfg = parse_config(["--output_dir", str(out), "--dataset", f"{data}:0.5,tang-demo", "--report_to", "none",
                        "--overwrite_output_dir"])
    with pytest.raises(OutputDirError, match=f"which holds --dataset {data} of this run"):
        RunFolder(cfg, True).__enter__()


def test_resuming_an_older_checkpoint_refuses_to_save_over_newer_ones(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        checkpoint(out, step)
    with pytest.raises(OutputDirError, match="checkpoint-4, checkpoint-6 of the same run are newer"):
        RunFolder(config(out, "--resume_from_checkpoint", str(out / "checkpoint-2")), True).__enter__()


def test_overwrite_and_a_checkpoint_inside_the_folder_contradict(tmp_path):
    out = tmp_path / "out"
    finished_run(out)
    with pytest.raises(OutputDirError, match="drop one of the two"):
        RunFolder(config(out, "--overwrite_output_dir", "--resume_from_checkpoint", str(out / "checkpoint-6")),
                  True).__enter__()
    assert json.loads((out / "train_results.json").read_text()) == {"train_loss": 1.0}
