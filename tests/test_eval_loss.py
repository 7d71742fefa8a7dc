"""eval_loss weighs every labelled token alike, however the evaluation set is cut into batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.eval_loss import TokenWeightedEvalLoss


def _batch(seed: int, rows: int, labelled: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (rows, 6), generator=generator)
    labels[:, : 6 - labelled] = -100
    return logits, labels


@pytest.mark.parametrize("chunk", [256, 3])  # 3: the labelled positions are taken a few at a time
def test_the_loss_is_the_mean_over_tokens_not_over_batches(chunk, monkeypatch):
    monkeypatch.setattr("trainer.eval_loss._CHUNK_TOKENS", chunk)
    batches = [_batch(0, 2, 5), _batch(1, 3, 2)]  # 5 and 2 labelled positions a row: batch means weigh unlike
    loss = TokenWeightedEvalLoss()
    assert loss.finish() is None
    loss.start()
    for logits, labels in batches:
        loss.add(logits, labels, lambda pair: pair)
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert loss.finish() == pytest.approx(float(expected), rel=1e-6)
    batch_means = [float(F.cross_entropy(lg[:, :-1].flatten(0, 1), lb[:, 1:].flatten(), ignore_index=-100))
                   for lg, lb in batches]
    assert abs(sum(batch_means) / 2 - float(expected)) > 1e-3  # the per-batch mean would differ


def test_a_batch_without_logits_keeps_the_trainers_value():
    loss = TokenWeightedEvalLoss()
    loss.start()
    loss.add(*_batch(0, 2, 3), lambda pair: pair)
    loss.add(None, None, lambda pair: pair)
    assert loss.finish() is None
