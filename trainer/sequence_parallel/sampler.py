"""The same rows for every rank of a sequence-parallel group: batches dealt by data-parallel rank.

accelerate deals the micro-batches a sampler yields to the ranks in turn (batch k to rank k mod world size), as for
plain data parallelism. The N ranks of a sequence-parallel group are consecutive (DeepSpeed's groups: ranks
[i*N, (i+1)*N)), so yielding each micro-batch N times in a row gives all of group i the rows of data-parallel rank
i, with no change to accelerate's sharding, its resume skipping, or the Trainer's step counting.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trainer.batch import GlobalBatchSampler


class SequenceParallelSampler(torch.utils.data.Sampler[int]):
    """:class:`GlobalBatchSampler` (over data-parallel ranks) with each micro-batch repeated ``copies`` times."""

    def __init__(self, inner: GlobalBatchSampler, micro_batch: int, copies: int) -> None:
        if inner.global_batch_size % micro_batch:
            raise ValueError(f"global batch {inner.global_batch_size} is not made of micro-batches of {micro_batch}")
        self.inner = inner
        self.micro_batch = micro_batch
        self.copies = copies

    @property
    def num_rows(self) -> int:
        return self.inner.num_rows

    @property
    def empty_rows(self) -> int:
        return self.inner.empty_rows

    @property
    def global_batch_size(self) -> int:
        """Indices yielded per optimizer step (rows x copies): ``len(self) // global_batch_size`` steps an epoch."""
        return self.inner.global_batch_size * self.copies

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner) * self.copies

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)
        for start in range(0, len(order), self.micro_batch):
            block = order[start:start + self.micro_batch]
            for _ in range(self.copies):
                yield from block
