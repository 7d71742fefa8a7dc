"""SwanLab monitoring through the real entry point: one run per job, the logged losses, no leaked API key.

The end-to-end tests run ``trainer/sft.py`` in a subprocess on the built-in tiny model with SwanLab in offline or
local mode (no network) and read what SwanLab wrote back from disk with its own data-store reader.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.callbacks.swanlab import resolve_mode
from trainer.run_config import REDACTED, scrub

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-fake-test-key-123"


def test_modes_map_to_swanlab_names():
    assert resolve_mode("cloud") == "online"
    assert resolve_mode("offline") == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError):
        resolve_mode("online-ish")


def test_scrub_removes_secrets_but_keeps_token_counts():
    config = {
        "training": {"hub_token": "hf_abc", "push_to_hub": False, "run_name": f"run with {FAKE_KEY} inside"},
        "data": {"sample_max_new_tokens": 64, "add_special_tokens": "<|im_end|>"},
        "model_config": {"pad_token_id": 0},
        "tracking": {"api_key": FAKE_KEY, "token": None},
        "files": [{"path": f"/x/{FAKE_KEY}"}],
    }
    clean = scrub(config, (FAKE_KEY,))
    assert clean["training"]["hub_token"] == REDACTED
    assert clean["tracking"]["api_key"] == REDACTED
    assert clean["tracking"]["token"] is None
    assert FAKE_KEY not in json.dumps(clean)
    assert clean["data"] == config["data"]
    assert clean["model_config"] == {"pad_token_id": 0}
    assert clean["training"]["push_to_hub"] is False


def test_a_runs_secrets_come_from_recipes_flags_and_the_environment(tmp_path, monkeypatch):
    """hub_token from a recipe is as secret as from a flag; an environment variable named like a token is too (not
    TOKENIZERS_PARALLELISM); training_args.bin gets the arguments without them, the rest kept."""
    from trainer.args import parse_config
    from trainer.run_config import run_secrets, training_args_without_secrets

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"hub_token": "hf_fromTheRecipe123", "run_name": "run hf_fromTheRecipe123"}))
    monkeypatch.setenv("GITLAB_API_KEY", "glpat-fromTheEnvironment")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false_but_long")
    cfg = parse_config([str(recipe), "--dataset", "x.jsonl"])
    secrets = run_secrets(cfg)
    assert {"hf_fromTheRecipe123", "glpat-fromTheEnvironment"} <= set(secrets)
    assert "false_but_long" not in secrets
    clean = training_args_without_secrets(cfg.training)
    assert clean.hub_token is None and clean.run_name == f"run {REDACTED}" and clean.output_dir == "outputs/run"
    assert cfg.training.hub_token == "hf_fromTheRecipe123"  # the run itself keeps it (push_to_hub needs it)


def test_run_config_keeps_its_history_and_no_secret_of_any_start(tmp_path, monkeypatch):
    """A resumed run's run_config.json keeps the earlier starts under ``history``, written atomically, and is scrubbed
    whole: the start record and the earlier starts too (one written before the token was known as a secret)."""
    from trainer.args import parse_config
    from trainer.data.build import DataReport
    from trainer.run_config import RUN_CONFIG, write_run_config

    token = "hf_givenByFlag12345"
    monkeypatch.setenv("GITLAB_API_KEY", "glpat-fromTheEnvironment")
    out = tmp_path / "out"
    cfg = parse_config(["--dataset", "x.jsonl", "--hub_token", token, "--output_dir", str(out)])
    report = DataReport(files=[], skipped_records=[])
    first = write_run_config(cfg, report, 1, start={"time": "t0", "resumed_from": None})
    earlier = json.loads(first.read_text(encoding="utf-8"))
    earlier["note"] = f"pasted {token} and glpat-fromTheEnvironment"  # as an older version could have left it
    first.write_text(json.dumps(earlier), encoding="utf-8")
    path = write_run_config(cfg, report, 1, start={"time": "t1", "resumed_from": str(out / "checkpoint-2"),
                                                   "command": f"sft.py --hub_token {token}"})
    text = path.read_text(encoding="utf-8")
    assert token not in text and "glpat-fromTheEnvironment" not in text
    written = json.loads(text)
    assert written["start"]["time"] == "t1" and written["start"]["command"] == f"sft.py --hub_token {REDACTED}"
    assert [h["start"]["time"] for h in written["history"]] == ["t0"]
    assert written["history"][0]["note"] == f"pasted {REDACTED} and {REDACTED}"
    assert written["training"]["hub_token"] == REDACTED
    assert sorted(p.name for p in out.iterdir()) == [RUN_CONFIG]  # no temporary file left beside it


# ---------------------------------------------------------------- end to end


@pytest.fixture
def job(tmp_path, tang_slice):
    """Paths and environment for one small training job on 64 Tang records."""
    data = tang_slice
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    cache = Path(os.environ.get("SFT_TEST_CACHE", tmp_path / "cache"))  # reuse across tests when set
    env.update(SFT_CACHE_DIR=str(cache), SWANLAB_API_KEY=FAKE_KEY, TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "out"
    args = ["--dataset", str(data), "--max_steps", "4", "--logging_steps", "1", "--report_to", "swanlab",
            "--output_dir", str(out), "--sample_prompts", "none", "--save_strategy", "no",
            "--global_batch_size", "4"]
    return {"out": out, "env": env, "args": args}


def run(command: list[str], env: dict, timeout: int = 400) -> str:
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def run_folders(logdir: Path) -> list[Path]:
    return sorted(p for p in logdir.glob("run-*") if p.is_dir())


def logged_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """key → {step: value} as stored in the run's ``.swanlab`` file, read with SwanLab's own reader."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (store,) = run_dir.glob("run-*.swanlab")
    reader = DataStoreReader()
    reader.open(store)
    scalars: dict[str, dict[int, float]] = {}
    try:
        while (raw := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "scalar":
                scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    finally:
        reader.close()
    return scalars


def chart_keys_in_order(run_dir: Path) -> list[str]:
    """The keys of the run's charts in the order SwanLab created them (the order the dashboard shows them)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (store,) = run_dir.glob("run-*.swanlab")
    reader = DataStoreReader()
    reader.open(store)
    keys: list[str] = []
    try:
        while (raw := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "column" and record.column.column_key not in keys:
                keys.append(record.column.column_key)
    finally:
        reader.close()
    return keys


def logged_config(run_dir: Path) -> dict:
    loaded = yaml.safe_load((run_dir / "files" / "config.yaml").read_text(encoding="utf-8"))
    return {key: entry["value"] for key, entry in loaded.items()}


def losses_from_state(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def assert_key_nowhere(folder: Path, output: str) -> None:
    needle = FAKE_KEY.encode()
    leaked = [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
    assert FAKE_KEY not in output


def assert_one_run_with_state_losses(out: Path, world_size: int) -> Path:
    (run_dir,) = run_folders(out / "swanlog")  # exactly one run for the job
    scalars = logged_scalars(run_dir)
    expected = losses_from_state(out)
    assert sorted(expected) == [1, 2, 3, 4]
    assert scalars["train/loss"] == pytest.approx(expected, rel=1e-6)
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                "train/label_tokens_per_second", "train/peak_memory_gib"):
        assert sorted(scalars[key]) == [1, 2, 3, 4], key
    config = logged_config(run_dir)
    assert config["world_size"] == world_size
    assert config["global_batch_size"] == 4
    assert config["training"]["max_steps"] == 4
    assert config["versions"]["torch"] and config["versions"]["swanlab"]
    assert config["data_report"]["train_examples"] > 0
    return run_dir


@pytest.mark.slow
def test_offline_run_logs_trainer_losses_and_never_the_api_key(job):
    """Also the dashboard's layout, with an evaluation and scored samples: it opens on train/loss and eval/loss;
    single values (final figures, sample scores) are results in the config and a text, not one-dot charts."""
    from tests.conftest import DEMO_TEST, DEMO_TEST_GT

    out = job["out"]
    args = [arg for arg in job["args"] if arg != "none"]  # the samples are on here
    args.remove("--sample_prompts")
    output = run([sys.executable, "trainer/sft.py", *args, "--swanlab_mode", "offline",
                  "--per_device_train_batch_size", "4", "--val_size", "8", "--eval_strategy", "steps",
                  "--eval_steps", "2", "--sample_prompts", str(DEMO_TEST), "--sample_references", str(DEMO_TEST_GT),
                  "--num_sample_prompts", "2", "--sample_max_new_tokens", "8", "--eval_metrics", "rouge_l,chrf"],
                 job["env"])
    assert "world size 1" in output
    run_dir = assert_one_run_with_state_losses(out, world_size=1)
    assert_key_nowhere(out, output)

    keys = chart_keys_in_order(run_dir)
    assert keys[:4] == ["train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"], keys
    assert {"samples/before", "samples/after", "results", "train/tokens_per_second"} <= set(keys)
    assert not [k for k in keys if k.startswith(("single_value/", "samples/before_", "samples/after_"))
                or k in ("train/global_step", "train/train_loss", "train/total_flos")], keys
    scalars = logged_scalars(run_dir)
    assert all(len(scalars[k]) > 1 for k in scalars if not k.startswith("eval/")), \
        {k: v for k, v in scalars.items() if len(v) == 1}
    results = logged_config(run_dir)["results"]
    train_results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] == pytest.approx(train_results["train_loss"])
    samples = json.loads((out / "samples_metrics.json").read_text())
    assert results["samples_before_rouge_l"] == pytest.approx(samples["before"]["rouge_l"])
    assert results["samples_after_chrf"] == pytest.approx(samples["after"]["chrf"])


@pytest.mark.slow
def test_two_processes_make_one_local_run(job):
    out = job["out"]
    env = {**job["env"], "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    output = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "trainer/sft.py", *job["args"], "--swanlab_mode", "local",
                  "--per_device_train_batch_size", "2", "--use_cpu", "true"], env)
    assert "world size 2" in output
    assert_one_run_with_state_losses(out, world_size=2)
    with sqlite3.connect(out / "swanlog" / "runs.swanlab") as db:  # the local dashboard's index: one experiment
        assert db.execute("SELECT COUNT(*) FROM experiment").fetchone()[0] == 1
    assert_key_nowhere(out, output)
