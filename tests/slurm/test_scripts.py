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


def test_the_long_context_recipe_fits_its_sbatch_command():
    """The SP 8 recipe's own submit line (2 nodes x train.sh's 8 GPUs per node) gives a layout the trainer accepts:
    SP divides the processes and the model's heads, the global batch splits into whole accumulation steps, and its
    DeepSpeed config is ZeRO-3 (SP is refused without DeepSpeed)."""
    import json
    import re

    import yaml

    recipe_path = REPO / "recipes" / "long_context_qwen3_8b_sp8.yaml"
    text = recipe_path.read_text()
    submit = re.search(r"sbatch --nodes=(\d+) slurm/train\.sh (\S+)", text)
    assert submit and submit[2] == "recipes/long_context_qwen3_8b_sp8.yaml"
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", (REPO / "slurm" / "train.sh").read_text(), re.M)[1])
    recipe = yaml.safe_load(text)
    processes, sp = int(submit[1]) * gpus, recipe["sequence_parallel_size"]
    assert (processes, sp) == (16, 8) and processes % sp == 0
    data_parallel = processes // sp
    assert recipe["global_batch_size"] % (recipe["per_device_train_batch_size"] * data_parallel) == 0
    heads, kv_heads = 32, 8  # Qwen/Qwen3-8B config.json (no download here)
    assert recipe["model_name_or_path"] == "Qwen/Qwen3-8B" and heads % sp == 0 and kv_heads % sp == 0
    assert json.loads((REPO / recipe["deepspeed"]).read_text())["zero_optimization"]["stage"] == 3
    assert recipe["attn_implementation"] == "flash_attention_2" and recipe["gradient_checkpointing"]
    assert recipe["max_length"] == 32768
