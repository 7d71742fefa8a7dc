"""The batches each optimizer step sees: the same rows whatever the number of processes."""

from __future__ import annotations

from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from trainer.batch import BatchSizeError, GlobalBatchSampler, with_empty_row


def steps_seen(sampler: GlobalBatchSampler, per_device: int, world: int, epoch: int) -> list[list[int]]:
    """Rows of each optimizer step, sharded over ``world`` ranks as accelerate does for the Trainer."""
    accumulation = sampler.global_batch_size // (per_device * world)
    per_rank = []
    for rank in range(world):
        sampler.set_epoch(epoch)
        shard = BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), num_processes=world,
                                  process_index=rank)
        per_rank.append(list(shard))
    steps = []
    for step in range(len(per_rank[0]) // accumulation):
        rows = [i for batches in per_rank for b in batches[step * accumulation:(step + 1) * accumulation] for i in b]
        steps.append(sorted(rows))
    return steps


@pytest.mark.parametrize("num_rows", [22, 24, 5, 61])
def test_every_step_is_a_full_global_batch_of_the_same_rows_for_any_world_size(num_rows):
    sampler = GlobalBatchSampler(num_rows, global_batch_size=8, seed=3)
    for epoch in (0, 1):
        one = steps_seen(sampler, per_device=2, world=1, epoch=epoch)
        assert all(len(step) == 8 for step in one)
        assert steps_seen(sampler, per_device=2, world=2, epoch=epoch) == one
        assert steps_seen(sampler, per_device=1, world=4, epoch=epoch) == one
        assert steps_seen(sampler, per_device=1, world=8, epoch=epoch) == one
        seen = Counter(i for step in one for i in step)
        empty = seen.pop(num_rows, 0)  # the empty row's index
        assert seen == dict.fromkeys(range(num_rows), 1)  # every row exactly once per epoch
        assert empty == sampler.empty_rows == len(sampler) - num_rows == -num_rows % 8
        assert all(num_rows not in step for step in one[:-1])  # only the last step is completed


def test_order_depends_on_seed_and_epoch_only():
    a, b = GlobalBatchSampler(50, 8, seed=1), GlobalBatchSampler(50, 8, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(GlobalBatchSampler(50, 8, seed=2)) != list(GlobalBatchSampler(50, 8, seed=1))
    c = GlobalBatchSampler(50, 8, seed=1)
    first, second = list(c), list(c)  # a bare loop over epochs moves on by itself
    c.set_epoch(1)
    assert second == list(c) != first


def test_drop_last_drops_the_partial_global_batch():
    sampler = GlobalBatchSampler(22, 8, seed=0, drop_last=True)
    assert len(sampler) == 16 and len(set(sampler)) == 16 and max(sampler) < 22 and sampler.empty_rows == 0
    with pytest.raises(BatchSizeError, match="5 training rows do not fill one global batch of 8"):
        GlobalBatchSampler(5, 8, seed=0, drop_last=True)


def test_the_empty_row_is_one_unlabelled_token():
    import datasets

    packed = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[-100, 6, 7]],
                                         "position_ids": [[0, 1, 2]]})
    rows = with_empty_row(packed)
    assert len(rows) == 2 and rows[0] == packed[0]
    assert rows[1] == {"input_ids": [0], "labels": [-100], "position_ids": [0]}
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\]"):
        with_empty_row(datasets.Dataset.from_dict({"input_ids": [[1]], "text": ["a"]}))
