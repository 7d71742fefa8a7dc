"""Preemption: SIGTERM / SIGUSR1 (Slurm's warning, Ctrl-C's polite cousin) → checkpoint at the next step, exit.

The handler only sets a flag; the work happens at a step boundary, where a checkpoint is consistent. Ranks may
receive the signal at different moments (or only some of them), so the flag is max-reduced over all ranks at
every step end: either every rank stops at the same step, or none does — a rank that stopped alone would leave
the others waiting in a collective forever.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — a checkpoint was saved; resume with `latest`.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCallback(TrainerCallback):
    def __init__(self) -> None:
        self.requested = False
        self.preempted = False
        self._received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum
        self.requested = True

    def _any_rank_requested(self, args) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = args.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_requested(args):
            name = signal.Signals(self._received).name if self._received else "a signal on another rank"
            logger.warning("received %s: saving a checkpoint at step %d and stopping", name, state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control
