"""What a run leaves on disk: no secret in any byte of it, and every file readable by the team.

One LoRA run through the real entry point — a subprocess, so that the token is on its real command line, where
SwanLab reads it — with a token given by flag, tokens in the environment, two checkpoints, SwanLab offline and a cache
of its own (the built-in model and the prepared data are built by this run), under umask 022; then its adapter is
merged. Every byte of what they wrote (binary files included) is searched for the secrets, and every file and folder
must be readable by group and others, as the umask allows: 0644 / 0755.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, sft_command
from trainer import merge
from trainer.run_config import REDACTED

pytestmark = pytest.mark.slow

SECRETS = {
    "--hub_token": "hf_flagSECRETvalue0123456789",
    "HF_TOKEN": "hf_envSECRETvalue0123456789",
    "SWANLAB_API_KEY": "sk-swanlabSECRETvalue0123456789",
    "GITHUB_TOKEN": "ghp_anyTokenNamedLikeOne0123456789",
}


@pytest.fixture(scope="module")
def run(tang_slice, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run")
    out, cache, prepared = root / "out", root / "cache", root / "prepared"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    env.update({name: value for name, value in SECRETS.items() if not name.startswith("--")}, SFT_CACHE_DIR=str(cache))
    command, env = sft_command(
        "--dataset", str(tang_slice), "--finetuning_type", "lora", "--max_steps", "2", "--save_steps", "1",
        "--logging_steps", "1", "--per_device_train_batch_size", "4", "--global_batch_size", "4", "--max_length",
        "128", "--sample_prompts", "none", "--report_to", "swanlab", "--swanlab_mode", "offline",
        "--hub_token", SECRETS["--hub_token"], "--output_dir", str(out), "--prepared_data_dir", str(prepared),
        env=env)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr[-6000:]
    merged = root / "merged"
    old = os.umask(0o022)
    try:
        assert merge.main(["--adapter", str(out), "--output", str(merged)]) == 0
    finally:
        os.umask(old)
    return {"out": out, "cache": cache, "prepared": prepared, "merged": merged,
            "log": result.stdout + result.stderr}


def _files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def test_no_secret_in_any_byte_the_run_wrote(run):
    written = _files(run["out"], run["prepared"], run["cache"], run["merged"])
    checkpoints = sorted(run["out"].glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((c / "training_args.bin").is_file() for c in [run["out"], *checkpoints])
    assert any(p.suffix == ".swanlab" for p in written)  # SwanLab's own record, metadata included
    for name, secret in SECRETS.items():
        leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaked, f"{name}'s value written to {leaked}"
        assert secret not in run["log"], f"{name}'s value in the run's output"
    args = torch.load(run["out"] / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 2  # the rest of the arguments kept
    (config_file,) = run["out"].glob("swanlog/run-*/files/config.yaml")
    command = yaml.safe_load(config_file.read_text(encoding="utf-8"))["command"]["value"]
    assert f"--hub_token {REDACTED}" in command and "--max_steps 2" in command  # recorded, scrubbed


def test_every_file_and_folder_is_readable_by_the_team(run):
    """safetensors wrote weights 0600 and mkdtemp made folders 0700 whatever the umask; under umask 022 the team
    must read the final adapter, the checkpoints, the merged model, the prepared data and the built-in model."""
    roots = [run["out"], run["prepared"], run["cache"] / "models", run["merged"]]
    weights = [p for p in _files(*roots) if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"out", "checkpoint-1", "checkpoint-2", "merged"}
    assert any(p.parent.parent.name == "models" for p in weights)  # the built-in model
    # SwanLab keeps its own debug log 0600 on purpose (its SecureRotatingFileHandler): not ours to open up.
    files = [p for p in _files(*roots) if not (p.name.startswith("debug.log") and p.parent.name == "debug")]
    private = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in files if p.stat().st_mode & 0o044 != 0o044]
    private += [f"{p} {stat.filemode(p.stat().st_mode)}" for root in roots for p in [root, *root.rglob("*")]
                if p.is_dir() and p.stat().st_mode & 0o055 != 0o055]
    assert not private, "not readable by the team:\n" + "\n".join(private)


def test_each_checkpoint_is_scrubbed_readable_and_marked_complete(run):
    """The save overrides compose: a checkpoint's training_args.bin is written without the token and its weights
    take the umask's mode inside the Trainer's save, before the COMPLETE marker lists every file by size, so the
    marker vouches for the files as they are and the checkpoint can resume."""
    from trainer.checkpoints import MARKER, resume_problems

    checkpoints = sorted(run["out"].glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in checkpoints:
        assert (checkpoint / MARKER).is_file() and resume_problems(checkpoint) == [], checkpoint
        assert torch.load(checkpoint / "training_args.bin", weights_only=False).hub_token is None
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in checkpoint.glob("*.safetensors"))
