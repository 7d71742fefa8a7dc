"""Global-batch arithmetic: the optimisation must not change when the number of processes does.

    global batch = per-device batch × world size × gradient accumulation

A recipe states the global batch it was tuned for; each launch derives the accumulation from the processes it
actually has, instead of the hand division (``GA //= world_size``) that silently rounds in notebooks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import datasets
import torch

from trainer.data.templates import IGNORE_INDEX
from trainer.errors import UserError


class BatchSizeError(UserError, ValueError):
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


EMPTY_ROW_VALUES = {"input_ids": [0], "labels": [IGNORE_INDEX], "position_ids": [0], "attention_mask": [1]}


def with_empty_row(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` plus one last row of a single token without a label: the filler of :class:`GlobalBatchSampler`."""
    unknown = set(dataset.column_names) - set(EMPTY_ROW_VALUES)
    if unknown:
        raise ValueError(f"cannot build an empty row for the column(s) {sorted(unknown)}")
    return dataset.add_item({name: EMPTY_ROW_VALUES[name] for name in dataset.column_names})


class GlobalBatchSampler(torch.utils.data.Sampler[int]):
    """A per-epoch shuffle made of whole global batches, the same on every rank, with nothing repeated.

    Why: when an epoch's rows do not fill the last global batch, the HF Trainer on one process takes a short last
    step (fewer micro-batches), while accelerate on several processes pads each rank's share with rows from the start
    of the epoch ("even batches"), so those rows count twice. The two runs then apply different last updates, and N
    processes stopped matching one process (3e-5 to 9e-2 relative after 3 steps on a 22-row epoch).

    Here the last global batch is completed with an empty row: index ``num_rows``, one token without a label
    (:func:`with_empty_row` appends it to the data set). It adds no label token, so no gradient and nothing to the
    token count the loss is divided by: the last step trains on exactly the remaining rows, whatever the number of
    processes, as the short step of a single process does. ``drop_last=True`` drops the partial global batch instead.

    The order depends only on ``seed`` and the epoch, never on the process: accelerate deals the batches this yields
    to the ranks, and a resumed run rebuilds the same order.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int, drop_last: bool = False) -> None:
        if num_rows < 1 or global_batch_size < 1:
            raise ValueError(f"need rows and a global batch, got {num_rows} rows, global batch {global_batch_size}")
        if drop_last and num_rows < global_batch_size:
            raise BatchSizeError(
                f"{num_rows} training rows do not fill one global batch of {global_batch_size}; "
                "lower --global_batch_size or turn --dataloader_drop_last off"
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        whole, partial = divmod(self.num_rows, self.global_batch_size)
        return (whole + (partial > 0 and not self.drop_last)) * self.global_batch_size

    @property
    def empty_rows(self) -> int:
        """Empty rows completing the last global batch of each epoch."""
        return max(len(self) - self.num_rows, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()[: len(self)]
        self.epoch += 1  # the Trainer sets the epoch explicitly; this keeps a bare loop over epochs right too
        return iter(order + [self.num_rows] * self.empty_rows)
