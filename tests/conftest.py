"""Shared fixtures: the shipped demo data, a persistent test cache, and a runner for the real entry point.

Every test runs in a fresh clone: the Tang records come from ``data/demo/`` (the first 400 records of the Tang set,
5 test poems and their ground truth), everything else is generated. The full sets (5,001 Tang records, huanhuan)
are an extra for the few tests whose figure needs them (:func:`shared_file`): ``../shared/data/`` beside the repo,
or ``SFT_DATA_DIR``.

The cache (built-in tiny models, tokenised data, DeepSpeed's compiled ops) lives in ``.cache/tests`` at the
repo root so that repeated test runs, and the subprocesses of one run, build each thing once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo"
DEMO_TEST = DEMO_DATA / "tang_test.json"  # 5 Tang test prompts (alpaca records without an answer)
DEMO_TEST_GT = DEMO_DATA / "tang_test_gt.txt"  # their ground truth, one poem a line
SHARED_DATA = Path(os.environ.get("SFT_DATA_DIR") or REPO.parent / "shared" / "data")
TEST_CACHE = REPO / ".cache" / "tests"
# The embedded demo recipe. It applies only when a command names neither model nor data, so tests that build on it
# (tiny model, packing, its schedule) name it.
DEMO_RECIPE = str(REPO / "recipes" / "tiny_tang.yaml")

os.environ.setdefault("SFT_CACHE_DIR", str(TEST_CACHE))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("SFT_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


FULL_DATA_FILES = ("tang/Tang_training_data.json", "tang/Tang_testing_data.json", "tang/Tang_testing_gt.txt",
                   "huanhuan/huanhuan.json")
_GET_FULL_DATA = (f"put {', '.join(FULL_DATA_FILES)} under {SHARED_DATA} or point SFT_DATA_DIR at such a folder "
                  "(URLs in data/datasets.yaml)")
# The mark of the few tests whose figure needs the full sets (5,001 Tang records, huanhuan); each has a demo-set
# variant that runs everywhere. Skipped, with what to do, where the files are missing.
needs_full_data = pytest.mark.skipif(
    not all((SHARED_DATA / name).is_file() for name in FULL_DATA_FILES),
    reason=f"extra on the full data sets (its demo-set variant ran): {_GET_FULL_DATA}")


def shared_file(*parts: str) -> Path:
    """A file of the full data sets (see ``needs_full_data``); skips the calling test when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        test = os.environ.get("PYTEST_CURRENT_TEST", "this test").rsplit(" ", 1)[0]
        pytest.skip(f"{test} needs the full data set file {'/'.join(parts)}: {_GET_FULL_DATA}")
    return path


@pytest.fixture(scope="session")
def tang_records() -> list[dict]:
    """The 400 shipped Tang records (``data/demo/tang_train.json``, the first 400 of the full set)."""
    return json.loads((DEMO_DATA / "tang_train.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tang_slice(tang_records, tmp_path_factory) -> Path:
    """The first 64 Tang records as a small training file."""
    path = tmp_path_factory.mktemp("data") / "tang64.json"
    path.write_text(json.dumps(tang_records[:64], ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tang_records) -> Path:
    """The built-in tiny Llama with a tokenizer trained on the 400 demo Tang texts (built once, cached)."""
    from trainer.tiny import build_tiny_model

    texts = [r["instruction"] + "\n" + r["input"] + r["output"] for r in tang_records]
    return build_tiny_model("builtin:tiny-llama", texts, seed=0)


def raised_and_peak_memory(error: type[Exception], call, *args, **kwargs) -> tuple[Exception, int]:
    """The ``error`` that ``call(*args, **kwargs)`` raises, and the peak Python memory it held meanwhile (bytes):
    for readers that must refuse a huge record without loading it whole."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(error) as caught:
            call(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return caught.value, peak


def sft_command(*args: str, nproc: int = 1, launch_config: str | None = None,
                env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment that run the real entry point: plain python, or accelerate with
    ``nproc`` real CPU processes (``--multi_gpu`` + ``ACCELERATE_USE_CPU``: ``--cpu`` would start only one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    if launch_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_config,
                   "--num_processes", str(nproc)]
    elif nproc > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                   "--num_processes", str(nproc)]
        full_env["ACCELERATE_USE_CPU"] = "1"
    else:
        command = [sys.executable]
    return [*command, str(REPO / "trainer" / "sft.py"), *args], full_env


def run_sft(*args: str, nproc: int = 1, launch_config: str | None = None, env: dict | None = None,
            timeout: int = 600, expect_ok: bool = True) -> subprocess.CompletedProcess:
    command, full_env = sft_command(*args, nproc=nproc, launch_config=launch_config, env=env)
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"sft.py exited {result.returncode}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


def start_sft(*args: str, log: Path, nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start the entry point in its own process group (so a test can signal or kill the whole job)."""
    command, full_env = sft_command(*args, nproc=nproc, env=env)
    handle = log.open("w")
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
