"""A run's life in its output folder, through the real entry point: a diverging run stops and saves nothing
non-finite; ``--overwrite_output_dir`` replaces last and restores on failure; one run per folder; a resume is the same
run (and takes only checkpoints that have every file); checkpoints load no code; a full disk is one sentence.

Most runs go through ``sft.main`` in-process (the same code as the command line, without the interpreter start);
the lock and the multi-process cases run real processes.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEMO_RECIPE, REPO, run_sft, start_sft
from tests.e2e.test_resume import kill_job, wait_for
from tests.run.test_folder import snapshot
from tests.run.test_safe_load import Payload, poisoned
from trainer import sft
from trainer.checkpoints import complete_checkpoints, mark_complete
from trainer.run.safe_load import UnsafeCheckpointError, pickle_files, verify_checkpoint

pytestmark = pytest.mark.slow

DIVERGING = ("--learning_rate", "1e4", "--warmup_steps", "1000")  # finite losses for 3 steps, then NaN weights at 4


@pytest.fixture(scope="module")
def demo64(tmp_path_factory) -> Path:
    records = json.loads((REPO / "data" / "demo" / "tang_train.json").read_text(encoding="utf-8"))[:64]
    path = tmp_path_factory.mktemp("data") / "demo64.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def common(data: Path, out: Path, *extra: str) -> list[str]:
    return [DEMO_RECIPE, "--dataset", str(data), "--output_dir", str(out), "--report_to", "none",
            "--sample_prompts", "none", "--max_length", "128", "--per_device_train_batch_size", "2",
            "--global_batch_size", "4", "--logging_steps", "1", "--save_total_limit", "5", "--seed", "7", *extra]


@pytest.fixture(scope="module")
def finished(demo64, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_sft(*common(demo64, out, "--max_steps", "4", "--save_steps", "2"))
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_overwrite_checks_first_and_a_failed_start_leaves_the_old_run_intact(finished, demo64, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert sft.main(common(demo64, out, "--overwrite_output_dir", "--dataset", str(tmp_path / "typo.json"))) == 2
    assert "typo.json" in capsys.readouterr().err
    assert snapshot(out) == before  # a mistyped --dataset: nothing deleted

    code = sft.main(common(demo64, out, "--overwrite_output_dir", "--max_steps", "8", "--save_steps", "20",
                           *DIVERGING))
    err = capsys.readouterr().err
    assert code == 2
    assert "error: training diverged: the weights became NaN or infinite at step 4" in err, err[-2000:]
    assert "nothing non-finite was saved (no checkpoint yet)" in err
    assert snapshot(out) == before  # the new run failed before its first checkpoint: the old run is back, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no moved-aside copy left


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_mixes_no_runs(finished, demo64, tmp_path,
                                                                                  capsys):
    """--learning_rate 1e4: the loss stays finite to step 4, whose NaN gradient norm makes every weight NaN. The
    Trainer would log that loss as 0, save NaN checkpoints and a NaN model, and exit 0."""
    out = copy_of(finished, tmp_path)
    code = sft.main(common(demo64, out, "--overwrite_output_dir", "--max_steps", "8", "--save_steps", "2",
                           *DIVERGING))
    err = capsys.readouterr().err
    assert code == 2
    assert "error: training diverged: the weights became NaN or infinite at step 4; the last finite loss logged " \
           "was" in err and "at step 3; nothing non-finite was saved: checkpoint-2 is the last good checkpoint; " \
           "try a lower --learning_rate (now 10000)" in err, err[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / "model.safetensors").values())
    # The old run went at the new run's first checkpoint; nothing of it, nor a NaN model, is in the folder.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "data_report.json", "run_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_resume_is_the_same_run(finished, demo64, tmp_path, capsys, caplog):
    out = copy_of(finished, tmp_path)
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # a kill while rotation deleted it: the marker still lists it

    assert sft.main(common(demo64, out, "--resume_from_checkpoint", str(out / "checkpoint-4"))) == 2
    assert (f"error: --resume_from_checkpoint {out}/checkpoint-4: this checkpoint is incomplete (optimizer.pt "
            f"missing); checkpoints in {out.resolve()} that can resume: checkpoint-2") in capsys.readouterr().err

    assert sft.main(common(demo64, out, "--resume_from_checkpoint", "latest", "--max_length", "64",
                           "--learning_rate", "1e-5")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot resume from {out.resolve()}/checkpoint-2: it would change what the run trains on or how " \
           f"it is batched: --max_length 128 → 64" in err, err[-2000:]
    assert "--allow_resume_changes max_length" in err
    assert "restore --learning_rate 0.003, so 1e-05 would be ignored" in err

    rng = out / "checkpoint-2" / "rng_state.pth"
    original = rng.read_bytes()
    poisoned(rng, tmp_path / "ran")
    mark_complete(rng.parent)  # whoever can write the checkpoint can rewrite its marker too
    assert sft.main(common(demo64, out, "--resume_from_checkpoint", "latest")) == 2
    assert f"error: {out.resolve()}/checkpoint-2/rng_state.pth: this checkpoint file holds a pickled io.open, and " \
           f"loading it could run code" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()
    rng.write_bytes(original)
    mark_complete(rng.parent)

    caplog.clear()
    assert sft.main(common(demo64, out, "--resume_from_checkpoint", "latest", "--max_steps", "6")) == 0
    assert "checkpoint-4 cannot be resumed (optimizer.pt missing): skipped" in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"] if "loss" in h][-4:] == [3, 4, 5, 6]
    record = json.loads((out / "run_config.json").read_text())
    assert record["start"]["resumed_from"].endswith("checkpoint-2") and len(record["history"]) == 1
    assert record["history"][0]["start"]["resumed_from"] is None  # the first start, kept
    assert json.loads((out / "checkpoint-6" / "run_settings.json").read_text())["max_length"] == 128


def test_one_run_per_folder_and_a_dead_holder_is_taken_over(demo64, tmp_path):
    out = tmp_path / "out"
    first = start_sft(*common(demo64, out, "--max_steps", "400", "--save_steps", "2"), log=tmp_path / "first.log")
    try:
        wait_for(out / "checkpoint-2" / "COMPLETE", first)
        second = run_sft(*common(demo64, out, "--resume_from_checkpoint", "latest"), nproc=2, expect_ok=False)
        assert second.returncode != 0
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}, started " \
            in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # the holder runs on, untouched
    finally:
        kill_job(first)
        first.wait()
    steps = int(complete_checkpoints(out)[-1].name.split("-")[1]) + 2
    third = run_sft(*common(demo64, out, "--resume_from_checkpoint", "latest", "--max_steps", str(steps)))
    assert "taking over the lock of a run that is gone (host" in third.stderr
    assert f"process {first.pid} no longer runs" in third.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps


def test_deepspeed_checkpoints_load_no_code(finished, demo64, tmp_path):
    """Each pickle file of a real plain and a real ZeRO-2 LoRA checkpoint, given a payload, is refused; a resume
    of a poisoned ZeRO-2 checkpoint stops before DeepSpeed loads it; the clean one resumes under the guard."""
    zero2 = str(REPO / "launch" / "cpu_zero2.yaml")
    out = tmp_path / "out"
    lora = ("--finetuning_type", "lora", "--lora_dropout", "0")
    run_sft(*common(demo64, out, "--max_steps", "2", "--save_steps", "2", *lora), nproc=2, launch_config=zero2)
    for source in (finished / "checkpoint-2", out / "checkpoint-2"):
        for path in pickle_files(source):
            copy = tmp_path / "poisoned"
            shutil.copytree(source, copy)
            poisoned(copy / path.relative_to(source), tmp_path / "ran")
            with pytest.raises(UnsafeCheckpointError, match=f"{copy / path.relative_to(source)}: this checkpoint"):
                verify_checkpoint(copy)
            shutil.rmtree(copy)
    assert not (tmp_path / "ran").exists()

    states = out / "checkpoint-2" / "global_step2" / "mp_rank_00_model_states.pt"
    original = states.read_bytes()
    states.write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    mark_complete(states.parent.parent)
    refused = run_sft(*common(demo64, out, "--resume_from_checkpoint", "latest", "--max_steps", "3", *lora),
                      nproc=2, launch_config=zero2, expect_ok=False)
    assert refused.returncode != 0 and "mp_rank_00_model_states.pt: this checkpoint file holds pickled" \
        in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "ran").exists()
    states.write_bytes(original)
    mark_complete(states.parent.parent)
    run_sft(*common(demo64, out, "--resume_from_checkpoint", "latest", "--max_steps", "3", *lora), nproc=2,
            launch_config=zero2)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: room for the tiny model's first checkpoint (14 MB), not for the second."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_sentence_and_never_a_complete_checkpoint(demo64, small_disk, capsys):
    out = small_disk / "out"
    assert sft.main(common(demo64, out, "--max_steps", "6", "--save_steps", "2")) == 2
    err = capsys.readouterr().err
    assert f"error: the disk is full: writing checkpoint-4 to {out}/checkpoint-4 failed with " in err, err[-3000:]
    assert "free; free space (or choose an --output_dir on a larger disk) and resume with " \
           "--resume_from_checkpoint latest" in err
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4" / "COMPLETE").exists()
