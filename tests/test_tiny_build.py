"""The built-in model is built once, completely, whichever process of a distributed job gets there first.

transformers 5 writes no weights or config from ``save_pretrained`` on a process whose global rank is not 0 once
torch.distributed is up. A rank-1 builder used to rename a folder holding only the tokenizer into the cache, and every
later run failed on it ("Unrecognized model"). Here two real gloo processes build the same model; rank 0 arrives
late, so rank 1 builds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.tiny import REQUIRED_FILES


def _build(rank: int, cache: str, init_file: str, texts: list[str], results: str) -> None:
    os.environ["SFT_CACHE_DIR"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from trainer.tiny import build_tiny_model

    if rank == 0:
        time.sleep(3)  # rank 1 takes the lock and builds
    folder = build_tiny_model("builtin:tiny-llama", texts, seed=0)
    Path(results, f"rank{rank}").write_text(str(folder))
    dist.barrier()
    dist.destroy_process_group()


def test_a_rank_1_builder_leaves_a_complete_model(tmp_path, tang_records):
    texts = [r["instruction"] + r["input"] + r["output"] for r in tang_records[:50]]
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_build, args=(str(tmp_path / "cache"), str(tmp_path / "init"), texts, str(results)),
                       nprocs=2, start_method="spawn")
    folders = {(results / f"rank{r}").read_text() for r in (0, 1)}
    assert len(folders) == 1
    folder = Path(folders.pop())
    for name in REQUIRED_FILES:
        assert (folder / name).is_file(), f"{name} missing from {folder}"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.num_parameters() > 0
    # The tied pair is stored under the name a trained model's save_pretrained uses, so a run's initial and final
    # weights compare key for key.
    from safetensors.torch import load_file

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert set(load_file(folder / "model.safetensors")) == set(load_file(saved / "model.safetensors"))
