"""Global-batch arithmetic: the optimisation must not change when the number of processes does.

    global batch = per-device batch × world size × gradient accumulation

A recipe states the global batch it was tuned for; each launch derives the accumulation from the processes it
actually has, instead of the hand division (``GA //= world_size``) that silently rounds in notebooks.
"""

from __future__ import annotations

import os


class BatchSizeError(ValueError):
    pass


def world_size_from_env() -> int:
    """Processes in the job as the launcher (accelerate, torchrun, deepspeed) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation_for(global_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """The accumulation steps that make ``global_batch_size`` exactly; an error when it cannot."""
    per_step = per_device_batch_size * world_size
    if global_batch_size <= 0 or global_batch_size % per_step:
        raise BatchSizeError(
            f"--global_batch_size {global_batch_size} is not a multiple of per_device_train_batch_size "
            f"{per_device_batch_size} x world size {world_size} = {per_step}; choose a global batch that is, "
            f"or change --per_device_train_batch_size"
        )
    return global_batch_size // per_step
