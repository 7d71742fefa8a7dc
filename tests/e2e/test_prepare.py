"""Prepare once, train from it: ``trainer/prepare.py`` ahead of a run, and N processes sharing one preparation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import DEMO_RECIPE, REPO, run_sft

pytestmark = pytest.mark.slow


def options(data, out, prepared) -> list[str]:
    return [DEMO_RECIPE, "--dataset", str(data), "--output_dir", str(out), "--prepared_data_dir", str(prepared),
            "--report_to", "none", "--sample_prompts", "none", "--max_length", "128", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--save_strategy", "no"]


def test_sft_uses_what_prepare_made(tang_slice, tmp_path):
    prepared = tmp_path / "prepared"
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "prepare.py"),
                             *options(tang_slice, tmp_path / "out", prepared)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = result.stdout.strip().splitlines()[-1]
    assert (prepared / folder.rsplit("/", 1)[-1] / "manifest.json").is_file()
    assert "prepared here" in result.stderr and "tokens/s" in result.stderr  # the progress bar says how fast
    trained = run_sft(*options(tang_slice, tmp_path / "out", prepared))
    assert f"prepared data: {folder} (found, memory-mapped, no re-tokenisation)" in trained.stderr


def test_two_processes_share_one_preparation(tang_slice, tmp_path):
    prepared = tmp_path / "prepared"
    result = run_sft(*options(tang_slice, tmp_path / "out", prepared), nproc=2)
    lines = [line for line in result.stderr.splitlines() if "prepared data:" in line]
    assert len(lines) == 2, lines
    assert sum("prepared here" in line for line in lines) == 1 and sum("found" in line for line in lines) == 1
    assert len([p for p in prepared.iterdir() if not p.name.endswith((".lock", ".progress"))]) == 1
