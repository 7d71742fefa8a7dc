"""The shell scripts parse (`bash -n`) and are shellcheck-clean: they run on clusters we never see."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = sorted([*(REPO / "slurm").glob("*.sh"), REPO / "tests" / "slurm" / "cluster.sh",
                  *(REPO / "scripts").glob("*.sh"), REPO / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bash_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_job_log_shows_no_secret_option_value():
    """launch.sh logs the trainer's command line into logs/<job>.err: a token given as a flag must not be in it."""
    script = (REPO / "slurm" / "launch.sh").read_text()
    function = script[script.index("shown_args() {"):script.index("\n}\n", script.index("shown_args() {")) + 3]
    args = ["trainer/sft.py", "--hub_token", "hf_SECRET1", "--swanlab_api_key=sk-SECRET2", "--max_new_tokens", "64",
            "--add_special_tokens", "<|im_end|>", "--system", "it's a poem"]
    shown = subprocess.run(["bash", "-c", function + 'shown_args "$@"', "bash", *args], capture_output=True,
                           text=True, check=True).stdout
    assert "SECRET" not in shown
    assert shown.split() == ["trainer/sft.py", "--hub_token", "<redacted>", "--swanlab_api_key=<redacted>",
                             "--max_new_tokens", "64", "--add_special_tokens", "\\<\\|im_end\\|\\>", "--system",
                             "it\\'s\\", "a\\", "poem"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert result.returncode == 0, result.stdout
