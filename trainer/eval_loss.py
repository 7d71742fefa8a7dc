"""``eval_loss`` as the mean over every labelled token of the evaluation set, the same on any number of processes.

The HF Trainer's ``eval_loss`` is the mean over examples of their batch's mean loss: batches of different label
counts weigh alike, and N processes cut the set into other batches than one process does, so a 2-process run's
``eval_loss`` differed from the 1-process one by 1e-3 to 4.5% with identical weights. Here each evaluation batch adds
its per-row sums of token losses and label-token counts, gathered over the ranks with
``accelerator.gather_for_metrics`` (which drops the rows repeated to even out the last batches, as the Trainer's own
gathering does), and the evaluation's loss is their quotient.

The token losses are computed from the logits the evaluation already has, shifted as ``ForCausalLMLoss`` shifts
them. Without logits (``--loss_impl chunked`` computes none) the Trainer's value is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer.data.templates import IGNORE_INDEX
from trainer.loss import next_token_labels

_CHUNK_TOKENS = 256


class TokenWeightedEvalLoss:
    def __init__(self) -> None:
        self._sum: float | None = None
        self._count = 0.0
        self._complete = False

    def start(self) -> None:
        self._sum, self._count, self._complete = 0.0, 0.0, True

    def add(self, logits: torch.Tensor | None, labels: torch.Tensor | None,
            gather: Callable[[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One evaluation batch; every rank must call it for every batch (``gather`` is a collective)."""
        if self._sum is None:
            return  # not inside an evaluation loop
        if logits is None or labels is None or logits.dim() != 3:
            self._complete = False
            return
        targets = next_token_labels(labels).to(logits.device)
        rows, length = targets.shape
        flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
        labelled = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        sums = torch.zeros(rows, dtype=torch.float64, device=logits.device)
        # A few labelled positions at a time: an fp32 copy of all the logits (5 GB for 8k tokens of a 150k-token
        # vocabulary) would raise the evaluation's peak memory.
        for chunk in labelled.split(_CHUNK_TOKENS):
            losses = F.cross_entropy(flat_logits[chunk].float(), flat_targets[chunk], reduction="none")
            sums.index_add_(0, torch.div(chunk, length, rounding_mode="floor"), losses.double())
        sums, counts = gather((sums, (targets != IGNORE_INDEX).sum(-1).double()))
        self._sum += float(sums.sum())
        self._count += float(counts.sum())

    def finish(self) -> float | None:
        """The evaluation's token-weighted loss, or None when some batch could not be counted (or none had labels)."""
        total, count, complete = self._sum, self._count, self._complete
        self._sum = None
        return total / count if complete and total is not None and count > 0 else None
