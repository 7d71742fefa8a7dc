"""DeepSpeed's Ulysses attention (``UlyssesSPAttentionHF``), switched on for training forwards only.

``UlyssesSPAttentionHF.register_with_transformers`` builds DeepSpeed's sequence-parallel process groups and replaces
the model's attention function (``ALL_ATTENTION_FUNCTIONS[backend]``) for the whole process: around the core
attention, an all-to-all turns sequence shards into head shards and back. Everything else that runs a forward
would then need every rank of the group, with shards of one row: evaluation (each rank its own rows), generation
(rank 0 alone, one token at a time), the packing isolation probe. So the replacement here dispatches: Ulysses while
:meth:`SequenceParallel.active` (a training step on sharded inputs), the original attention otherwise.

DeepSpeed's engine is *not* given the sequence-parallel groups (no ``mpu``): it treats every rank as data parallel
and averages gradients over all of them. That is exact here because each rank's loss is its shard's token-loss sum
over the global label-token count, times the world size (the Trainer's own scaling): the average over ranks of the
shard gradients is the gradient of the whole batch, as on one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from trainer.sequence_parallel.shard import padding_for, shard_batch

logger = logging.getLogger("sft")


class SequenceParallel:
    """The run's sequence-parallel group: this rank's place in it, the input sharding and the attention switch."""

    def __init__(self, size: int, rank: int, pad_token_id: int) -> None:
        self.size = size
        self.rank = rank
        self.pad_token_id = pad_token_id
        self.attention_calls = 0  # Ulysses calls while active: 0 after a step means the model bypassed it
        self.micro_batches = 0  # training micro-batches sharded by this rank ...
        self.padded_micro_batches = 0  # ... those whose length was not a multiple of the group size ...
        self.padding_positions = 0  # ... and the positions added to them (no label: never trained)
        self._active = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def shard(self, inputs: dict, num_items_in_batch):
        """This rank's shard of a training micro-batch, and the label-token count it is normalised by.

        Every rank of a group holds the same rows, so the Trainer's count (gathered over all ranks) holds each
        label ``size`` times: divided back, it is the global batch's count, as on one process.
        """
        if num_items_in_batch is not None:
            num_items_in_batch = num_items_in_batch / self.size
        rows, length = inputs["input_ids"].shape
        pad = padding_for(length, self.size)
        self.micro_batches += 1
        self.padded_micro_batches += bool(pad)
        self.padding_positions += pad * rows
        return shard_batch(inputs, self.size, self.rank, self.pad_token_id), num_items_in_batch


    def padding_summary(self) -> str:
        """What the padding to a multiple of the group size added over all ranks (a collective: call on every rank)."""
        counts = torch.tensor([self.micro_batches, self.padded_micro_batches, self.padding_positions],
                              dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(counts)
        batches, padded, positions = (int(c) // self.size for c in counts.tolist())  # each group counted it N times
        return (f"sequence parallel {self.size}: {padded} of {batches} micro-batches padded to a multiple of "
                f"{self.size} tokens, {positions} padding positions in all (no label: never trained)")


def enable_ulysses(model: torch.nn.Module, attn_implementation: str, size: int, micro_batch: int,
                   pad_token_id: int) -> SequenceParallel:
    """Register DeepSpeed's Ulysses attention for ``model``'s backend and return the run's :class:`SequenceParallel`.

    Needs the distributed set-up done (DeepSpeed's communication initialised): call after ``TrainingArguments``.
    """
    import deepspeed.comm
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not deepspeed.comm.is_initialized():  # ZeRO-3 set it up at model load; ZeRO-1/2 only in deepspeed.initialize
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)

    original = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn_implementation, sequence_parallel_size=size,
        micro_batch_size=micro_batch, seq_length_is_variable=True)
    ulysses = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    group = SequenceParallel(size, mpu.get_sequence_parallel_rank(), pad_token_id)

    def dispatch(module, query, key, value, attention_mask, *args, **kwargs):
        if group._active:
            group.attention_calls += 1
            return ulysses(module, query, key, value, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attn_implementation] = dispatch
    return group


def sequence_parallel_step(group: SequenceParallel, step, model, inputs: dict, num_items_in_batch):
    """One training micro-batch under sequence parallelism: ``step`` (the Trainer's) on this rank's shard.

    The forward *and* backward run inside :meth:`SequenceParallel.active`; a step in which the model never called
    its attention through transformers' attention functions (a custom attention module) would train each shard
    alone, so it stops the run.
    """
    from trainer.sequence_parallel.layout import FLAG, SequenceParallelError

    shard, count = group.shard(inputs, num_items_in_batch)
    before = group.attention_calls
    with group.active():
        loss = step(model, shard, count)
    if group.attention_calls == before:
        raise SequenceParallelError(
            f"{FLAG} {group.size}: the model's attention never went through transformers' attention functions, "
            "which Ulysses wraps, so each rank would attend only within its own shard; train this model without "
            "sequence parallelism")
    return loss
