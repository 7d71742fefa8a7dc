"""The non-finite guard: losses watched on the device, weights checked at the boundaries, and every rank stopping
at the same boundary whichever rank went bad (two real gloo processes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerControl, TrainerState

from trainer.callbacks.nonfinite import NonFiniteError, NonFiniteGuard


def args(tmp_path, **extra):
    return SimpleNamespace(device=torch.device("cpu"), output_dir=str(tmp_path), learning_rate=1e4, fp16=False,
                           bf16=False, max_grad_norm=1.0, **extra)


def state(step: int, losses: dict[int, float] | None = None) -> TrainerState:
    result = TrainerState()
    result.global_step = step
    result.log_history = [{"step": s, "loss": v} for s, v in (losses or {}).items()]
    return result


def boundary() -> TrainerControl:
    return TrainerControl(should_log=True)


def test_a_non_finite_loss_stops_at_the_next_boundary_naming_its_step(tmp_path):
    guard, model = NonFiniteGuard(), torch.nn.Linear(2, 2)
    for step, loss in ((1, 3.0), (2, 2.5), (3, math.nan), (4, math.inf)):
        guard.observe_loss(torch.tensor(loss), step)
        if step == 2:
            guard.on_step_end(args(tmp_path), state(2, {1: 3.0, 2: 2.5}), boundary(), model=model)
    guard.on_step_end(args(tmp_path), state(4, {1: 3.0, 2: 2.5}), TrainerControl(), model=model)  # no boundary
    with pytest.raises(NonFiniteError) as stopped:
        guard.on_step_end(args(tmp_path), state(4, {1: 3.0, 2: 2.5}), boundary(), model=model)
    message = str(stopped.value)
    assert message.startswith("training diverged: the loss became NaN or infinite at step 3; the last finite loss "
                              "logged was 2.5 at step 2; nothing non-finite was saved (no checkpoint yet); try a "
                              "lower --learning_rate (now 10000), bf16 rather than fp16 (now fp32), or a smaller "
                              "--max_grad_norm (now 1)")


def test_non_finite_weights_stop_even_when_every_loss_was_finite(tmp_path):
    """A NaN gradient norm at a save step: the loss was finite, the weights it leaves are not."""
    guard, model = NonFiniteGuard(), torch.nn.Linear(2, 2)
    guard.observe_loss(torch.tensor(5835.0), 4)
    model.weight.data[0, 0] = math.inf
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    frozen.weight.data[:] = math.nan
    NonFiniteGuard().on_train_end(args(tmp_path), state(4), TrainerControl(), model=frozen)  # frozen: not checked
    with pytest.raises(NonFiniteError, match="weights became NaN or infinite between steps 1 and 4"):
        guard.on_epoch_end(args(tmp_path), state(4), TrainerControl(should_save=True), model=model)


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    guard, model = NonFiniteGuard(), torch.nn.Linear(2, 2)
    outcome = "trained on"
    try:
        for step in (1, 2, 3):
            guard.observe_loss(torch.tensor(math.inf if (rank, step) == (1, 2) else 1.0), step)
            guard.on_step_end(SimpleNamespace(device=torch.device("cpu"), output_dir=".", learning_rate=1.0,
                                              fp16=False, bf16=False, max_grad_norm=0.0),
                              state(step), TrainerControl(should_log=step == 3), model=model)
    except NonFiniteError as error:
        outcome = str(error).split(";")[0]
    results[rank] = outcome
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_boundary_when_one_rank_goes_bad():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="fork")
    assert dict(results) == {r: "training diverged: the loss became NaN or infinite at step 2" for r in (0, 1)}


def test_large_fp16_weights_whose_sum_exceeds_fp16_are_finite():
    from trainer.callbacks.nonfinite import weights_finite

    layer = torch.nn.Linear(400, 400).half()
    layer.weight.data.fill_(1.0)  # sums to 160,000: beyond fp16's 65,504, yet every weight is finite
    assert bool(weights_finite(layer, torch.device("cpu")))
    layer.weight.data[3, 3] = math.nan
    assert not bool(weights_finite(layer, torch.device("cpu")))
