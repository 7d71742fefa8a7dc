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


def test_mixed_sources_log_one_eval_loss_per_source(tang_records, tmp_path):
    """Mixing by weight and per-source evaluation through the real entry point: the report says what the mixture
    took from each source, and the Trainer logs one eval loss per eval source."""
    import json

    def jsonl(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        return path

    poems, more = jsonl("poems.jsonl", tang_records[:40]), jsonl("more.jsonl", tang_records[40:120])
    out = tmp_path / "out"
    run_sft(*options(f"{poems}:0.5,{more}:0.5", out, tmp_path / "prepared"), "--eval_dataset",
            f"{jsonl('eval_a.jsonl', tang_records[200:208])},{jsonl('eval_b.jsonl', tang_records[300:306])}",
            "--eval_strategy", "steps", "--eval_steps", "2")
    report = json.loads((out / "data_report.json").read_text())
    assert {s["name"].rsplit("/", 1)[-1]: s.get("mixed_examples") for s in report["sources"]
            if s["role"] == "train"} == {"poems.jsonl": 40, "more.jsonl": 40}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_eval_a_loss" in h for h in history) and any("eval_eval_b_loss" in h for h in history)
