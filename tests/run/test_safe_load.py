"""Checkpoints load no code: a pickle that would create a file when loaded is refused in every file a resume reads,
and DeepSpeed's own loader (``weights_only=False``) refuses it too inside :func:`guard_loading`."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.run.safe_load import UnsafeCheckpointError, guard_loading, pickle_files, verify_checkpoint


class Payload:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plain_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(2)
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0).state_dict(), folder / "scheduler.pt")
    torch.save({"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"weight": weight.detach()}, folder / "pytorch_model.bin")
    torch.save({"hub_token": "x"}, folder / "training_args.bin")  # never read by a resume: not checked
    (folder / "trainer_state.json").write_text("{}")
    return folder


def deepspeed_checkpoint(folder: Path) -> Path:
    from trainer.run.safe_load import deepspeed_globals

    loss_scaler, dynamic, stage, fragment = deepspeed_globals()
    (folder / "global_step2").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"},
               folder / "global_step2" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"loss_scaler": loss_scaler(1.0), "zero_stage": stage(2),
                                         "param_slice_mappings": [{"w": fragment(numel=2, start=0)}],
                                         "dynamic": dynamic(2**16, 1000, 1, 2, False)}},
               folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state_0.pth")
    return folder


def poisoned(path: Path, marker: Path) -> None:
    """Add a payload to a file as a pickle, keeping its torch format (zip) when it has one."""
    if path.read_bytes()[:2] == b"PK":
        with guard_off():
            content = torch.load(path, weights_only=False)
        torch.save({"original": content, "extra": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


class guard_off:
    def __enter__(self):
        self.before = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)

    def __exit__(self, *exc):
        if self.before is not None:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = self.before


@pytest.mark.parametrize("kind", ["plain", "deepspeed"])
def test_a_payload_in_any_file_a_resume_reads_is_refused(kind, tmp_path):
    make = plain_checkpoint if kind == "plain" else deepspeed_checkpoint
    clean = make(tmp_path / "clean")
    verify_checkpoint(clean)  # what the libraries save loads
    names = [p.relative_to(clean) for p in pickle_files(clean)]
    assert "training_args.bin" not in {str(n) for n in names} and len(names) >= 3
    for name in names:
        folder = make(tmp_path / f"poisoned-{str(name).replace('/', '-')}")
        marker = tmp_path / f"ran-{name.name}"
        poisoned(folder / name, marker)
        with pytest.raises(UnsafeCheckpointError) as refused:
            verify_checkpoint(folder)
        assert str(folder / name) in str(refused.value) and "a pickled io.open" in str(refused.value), refused.value
        assert "loading it could run code" in str(refused.value)
        assert not marker.exists(), f"loading {name} ran code"


def test_raw_pickle_and_damaged_files_are_refused_in_one_sentence(tmp_path):
    folder = plain_checkpoint(tmp_path / "c")
    (folder / "scheduler.pt").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    with pytest.raises(UnsafeCheckpointError, match=r"scheduler.pt: this checkpoint file holds pickled objects other"):
        verify_checkpoint(folder)
    folder = plain_checkpoint(tmp_path / "d")
    (folder / "optimizer.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer.pt: this checkpoint file cannot be read"):
        verify_checkpoint(folder)
    assert not (tmp_path / "ran").exists()


def test_deepspeeds_own_loader_runs_no_code_under_the_guard(tmp_path):
    """DeepSpeed loads its files with ``weights_only=False``; inside :func:`guard_loading` torch loads them
    weights-only anyway: a payload fails instead of running, and the allow-listed types still load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    folder = deepspeed_checkpoint(tmp_path / "c")
    states = folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with guard_loading(folder):
        assert TorchCheckpointEngine().load(str(states))["optimizer_state_dict"]["zero_stage"] == 2
        poisoned(states, tmp_path / "ran")
        with pytest.raises(pickle.UnpicklingError):
            TorchCheckpointEngine().load(str(states))
    assert not (tmp_path / "ran").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # scoped to the run
