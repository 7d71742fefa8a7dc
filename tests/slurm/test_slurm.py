"""`sbatch slurm/tang.sh` against a real Slurm: two emulated nodes, one node x two processes, and a requeue.

The cluster (``tests/slurm/cluster.sh``) runs on this machine as two slurmd on one host; jobs are submitted from
a scratch copy of the repo so that their ``logs/`` and ``outputs/`` stay out of the tree. Jobs are polled with
``scontrol`` (``sbatch --wait`` polls ever more slowly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root (it installs and starts Slurm daemons)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_TEST_DIR": str(state)}
    up = subprocess.run(["bash", str(CLUSTER), "up", "--nodes", "2"], env=env, capture_output=True, text=True,
                        timeout=600)
    assert up.returncode == 0, up.stderr[-4000:]
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def repo_copy(tmp_path):
    """What a user submits from: the repo's code and configuration, the same virtual environment."""
    copy = tmp_path / "repo"
    for part in ("trainer", "slurm", "launch", "ds_configs", "recipes", "data"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / ".venv").symlink_to(REPO / ".venv")
    (copy / "logs").mkdir()
    return copy


def submit(cluster_env: dict, repo: Path, *sbatch_and_script: str, env: dict | None = None) -> str:
    result = subprocess.run(["sbatch", "--parsable", *sbatch_and_script], cwd=repo, env={**cluster_env, **(env or {})},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(cluster_env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=cluster_env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(cluster_env: dict, job: str, repo: Path, timeout: float = 400) -> str:
    state = wait_until(lambda: job_info(cluster_env, job).get("JobState") in DONE and job_info(cluster_env, job),
                       timeout, f"job {job} to end")["JobState"]
    return state


def job_log(repo: Path, name: str, job: str) -> str:
    return "".join((repo / "logs" / f"{name}-{job}.{ext}").read_text(errors="replace")
                   for ext in ("out", "err") if (repo / "logs" / f"{name}-{job}.{ext}").exists())


def trainer_flags(data: Path, max_steps: int, save_steps: int) -> list[str]:
    return ["recipes/tiny_tang.yaml", "--dataset", str(data), "--max_steps", str(max_steps),
            "--save_steps", str(save_steps), "--report_to", "none", "--sample_prompts", "none",
            "--max_length", "128", "--per_device_train_batch_size", "2", "--global_batch_size", "4",
            "--logging_steps", "1"]


CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.mark.parametrize(("nodes", "procs"), [(2, 1), (1, 2)], ids=["2nodes-x1", "1node-x2"])
def test_tang_script_trains_on_the_cluster(nodes, procs, cluster, repo_copy, tang_slice, tmp_path):
    # A cache nobody has filled: the built-in model and the data are made once, by the preparation step in the
    # batch shell, and every rank of every node finds them complete (a rank-1 builder used to leave a model-less
    # folder behind that broke every later run).
    cache = tmp_path / "cache"
    job = submit(cluster, repo_copy, f"--nodes={nodes}", *CPU_JOB, "slurm/tang.sh",
                 *trainer_flags(tang_slice, 4, 2), env={"PROCS_PER_NODE": str(procs), "SFT_CACHE_DIR": str(cache)})
    state = wait_done(cluster, job, repo_copy)
    log = job_log(repo_copy, "tang", job)
    assert state == "COMPLETED", log[-5000:]
    assert "world size 2" in log
    if nodes == 2:
        assert "node rank 0" in log and "node rank 1" in log, log[-3000:]
    assert "preparing data: python3 trainer/prepare.py" in log
    prepared = [line for line in log.splitlines() if "prepared data:" in line]
    assert sum("prepared here" in line for line in prepared) == 1, prepared  # by the preparation step
    assert sum("found, memory-mapped" in line for line in prepared) == 2, prepared  # by both ranks
    (model,) = (p for p in (cache / "models").iterdir() if p.is_dir())
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    out = repo_copy / "outputs" / f"tang-{job}"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_requeued_job_resumes_from_its_last_checkpoint(cluster, repo_copy, tang_slice):
    steps = 40
    job = submit(cluster, repo_copy, "--nodes=1", *CPU_JOB, "slurm/train.sh", *trainer_flags(tang_slice, steps, 4),
                 env={"PROCS_PER_NODE": "1"})
    out = repo_copy / "outputs" / f"sft-{job}"
    wait_until(lambda: (out / "checkpoint-4" / "COMPLETE").exists(), 300, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True, timeout=60)
    wait_until(lambda: int(job_info(cluster, job).get("Restarts", "0")) >= 1, 120, "the requeue")
    state = wait_done(cluster, job, repo_copy, timeout=600)
    log = job_log(repo_copy, "sft", job)
    assert state == "COMPLETED", log[-5000:]
    assert "resuming from" in log and "checkpoint-" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps
