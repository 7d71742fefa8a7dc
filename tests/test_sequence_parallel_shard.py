"""Sequence-parallel arithmetic without processes: shards, padding, the label count, the sampler's dealing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.batch import GlobalBatchSampler
from trainer.data.templates import IGNORE_INDEX
from trainer.sequence_parallel.attention import SequenceParallel
from trainer.sequence_parallel.sampler import SequenceParallelSampler
from trainer.sequence_parallel.shard import padding_for, shard_batch


def batch(length: int = 7) -> dict:
    ids = torch.arange(10, 10 + 2 * length).view(2, length)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # right padding of the shorter row
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_shards_rebuild_the_shifted_row_with_no_target_lost_at_a_boundary():
    for size in (2, 3, 4):
        whole = batch()
        shards = [shard_batch(whole, size, rank, pad_token_id=0) for rank in range(size)]
        assert len({s["input_ids"].shape for s in shards}) == 1  # equal shards
        labels = torch.cat([s["shift_labels"] for s in shards], dim=1)
        shifted = F.pad(whole["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
        pad = padding_for(7, size)
        assert labels.shape[1] == 7 + pad
        assert torch.equal(labels[:, :7], shifted)  # every target kept, the shard edges included
        assert (labels[:, 7:] == IGNORE_INDEX).all()  # padding is never trained
        assert torch.equal(torch.cat([s["input_ids"] for s in shards], dim=1)[:, :7], whole["input_ids"])
        positions = torch.cat([s["position_ids"] for s in shards], dim=1)
        assert torch.equal(positions, torch.arange(7 + pad).expand(2, -1))  # positions count on through the padding
        assert all("attention_mask" not in s and torch.equal(s["labels"], s["shift_labels"]) for s in shards)


def test_packed_position_ids_travel_with_their_shards():
    whole = batch(6)
    whole["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])
    shards = [shard_batch(whole, 2, rank, pad_token_id=0) for rank in range(2)]
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], dim=1), whole["position_ids"])


def test_the_label_count_held_by_every_rank_of_a_group_is_divided_back():
    group = SequenceParallel(size=2, rank=1, pad_token_id=0)
    shard, count = group.shard(batch(), torch.tensor(20.0))  # 2 ranks counted the same 10 labels
    assert float(count) == 10.0
    assert shard["input_ids"].shape == (2, 4)


def test_the_ranks_of_a_group_take_the_same_rows_and_the_groups_different_ones():
    micro, groups, size, accumulation = 2, 2, 2, 2
    inner = GlobalBatchSampler(num_rows=22, global_batch_size=micro * groups * accumulation, seed=3)
    sampler = SequenceParallelSampler(inner, micro, size)
    order = list(sampler)
    assert len(order) == len(sampler) == len(inner) * size
    assert len(sampler) // sampler.global_batch_size == len(inner) // inner.global_batch_size  # steps an epoch
    world = groups * size
    batches = [order[i:i + micro] for i in range(0, len(order), micro)]
    per_rank = [batches[rank::world] for rank in range(world)]  # accelerate deals batch k to rank k mod world
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    assert per_rank[0] != per_rank[2]
    inner.set_epoch(0)
    rows = sorted(i for rank in (0, 2) for b in per_rank[rank] for i in b)
    assert rows == sorted(list(inner))  # each row once over the data-parallel ranks (empty rows included)
