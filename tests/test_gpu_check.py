"""The GPU check is ready to run: its dry run goes through every part end to end on CPU with tiny shapes."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_covers_every_part(tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-gpu-check-dry-run-cpu.json")
    report = json.loads(report_file.read_text())
    parts = {part["part"]: part for part in report["parts"]}
    assert set(parts) == {"isolation", "throughput", "qlora", "liger", "long_rows"}
    assert not [p for p in report["parts"] if "error" in p], report["parts"]
    assert {b["mechanism"] for b in parts["isolation"]["backends"].values()} == {"position_ids"}
    runs = parts["throughput"]["results"]
    assert {(r["seq_len"], r["loss_impl"]) for r in runs} == {(256, "hf"), (256, "chunked"), (512, "hf"),
                                                               (512, "chunked")}
    # the chunked loss trains the same model the same way: equal losses after the same steps
    by = {(r["seq_len"], r["loss_impl"]): r for r in runs}
    assert abs(by[256, "hf"]["loss"] - by[256, "chunked"]["loss"]) < 1e-4
    assert parts["qlora"]["step_s"] > 0 and "skipped" in parts["liger"]
    long_rows = {(r["seq_len"], r["tiled_mlp"]): r for r in parts["long_rows"]["results"]}
    assert set(long_rows) == {(256, False), (256, True), (512, False), (512, True)}
    assert abs(long_rows[512, False]["loss"] - long_rows[512, True]["loss"]) < 1e-4  # tiling changes no figure
    assert report_file.with_suffix(".md").read_text().startswith("# GPU check")
