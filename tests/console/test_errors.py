"""A user fault reads as one ``error: …`` sentence, once, and last — in process and under the launchers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, sft_command
from trainer.console.errors import report_user_error
from trainer.errors import UserError

MISTYPED = "data/demo/tang_trian.json"
SENTENCE = f"error: dataset file {MISTYPED} not found"


def test_without_a_launcher_the_sentence_is_printed(monkeypatch, capsys):
    for name in ("TORCHELASTIC_ERROR_FILE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert report_user_error(UserError("x.json: broken")) == 2
    assert capsys.readouterr().err == "error: x.json: broken\n"


def test_under_torchrun_the_main_rank_hands_it_to_the_failure_summary(monkeypatch, capsys, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report_user_error(UserError("x.json: broken")) == 2
    assert capsys.readouterr().err == ""  # the launcher's summary shows it: printing it too would show it twice
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == message["extraInfo"]["py_callstack"] == "error: x.json: broken"


def test_another_rank_waits_for_the_main_one_then_reports_a_fault_of_its_own(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report_user_error(UserError("only mine"), grace_s=0.3) == 2
    assert capsys.readouterr().err == "error: only mine\n"


def last_line(output: str) -> str:
    """The last line the user reads; torch's failure summary closes with a rule of '=' after its last field."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and set(line.strip()) != {"="}]
    return lines[-1]


def _launch(nproc: int) -> subprocess.CompletedProcess:
    command, env = sft_command("--dataset", MISTYPED, "--output_dir", "outputs/never", "--report_to", "none",
                               nproc=nproc)
    if nproc == 1:  # accelerate's one-process launcher: -q keeps its CalledProcessError traceback out
        command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", *command[1:]]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_mistyped_dataset_under_accelerate_launch_is_one_sentence_at_the_end(nproc):
    result = _launch(nproc)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count(SENTENCE) == 1, output
    if nproc == 1:
        assert last_line(output) == SENTENCE, output
    else:  # the root cause of torch's failure summary, its last field
        assert last_line(output) == f"traceback : {SENTENCE}", output
    assert "Traceback (most recent call last)" not in output.split("Root Cause")[-1]
