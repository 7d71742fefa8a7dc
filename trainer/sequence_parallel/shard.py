"""A rank's contiguous share of a batch's sequence, for sequence parallelism.

Labels are shifted over the whole row *before* it is cut (position t is trained to predict label t+1), so the
target of each shard's last position, which lies in the next shard, is not lost. The row is padded at its end to a
multiple of the group size: padding positions carry no label (never trained), and under causal attention a token
at the end cannot change any earlier one, so the trained tokens see exactly what one process sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.templates import IGNORE_INDEX
from trainer.loss import next_token_labels


def padding_for(length: int, size: int) -> int:
    """Positions added at the end of a row of ``length`` tokens so that ``size`` ranks get equal shards."""
    return (-length) % size


def shard_batch(batch: dict, size: int, rank: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``rank``'s shard (of ``size``) of a collated batch: ``input_ids``, ``position_ids`` and the shifted labels.

    The shifted labels go both as ``shift_labels`` (read by ``ForCausalLMLoss`` and the chunked loss instead of
    shifting again) and as ``labels`` (the model computes its loss only when given labels). ``attention_mask`` is
    dropped: Ulysses attention gathers the whole row and is causal over it; right padding needs no mask.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a sequence-parallel group of {size}")
    input_ids, labels = batch["input_ids"], batch["labels"]
    rows, length = input_ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(rows, length)
    shifted = next_token_labels(labels)
    pad = padding_for(length, size)
    if pad:
        input_ids = F.pad(input_ids, (0, pad), value=pad_token_id)
        shifted = F.pad(shifted, (0, pad), value=IGNORE_INDEX)
        more = position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device)
        position_ids = torch.cat([position_ids, more], dim=1)
    chunk = (length + pad) // size
    cut = slice(rank * chunk, (rank + 1) * chunk)
    shard_labels = shifted[:, cut].contiguous()
    return {"input_ids": input_ids[:, cut].contiguous(), "position_ids": position_ids[:, cut].contiguous(),
            "labels": shard_labels, "shift_labels": shard_labels}
