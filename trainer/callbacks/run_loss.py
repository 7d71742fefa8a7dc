"""The run's ``train_loss``: the mean loss over every optimizer step of the run, whatever the processes or restarts.

The HF Trainer's summary ``train_loss`` sums the gathered losses of its log lines, then adds the loss accumulated
since the last log line *of this process only* (not gathered across ranks: with 2 processes it is one rank's share,
scaled), and divides by the steps of this call of ``train()`` only: a resumed run reported the mean of the resumed
steps. So 2 processes reported 5.5051 where 1 process reported 5.4795 with identical weights and logged losses.

Here the log history is the record: each logged ``loss`` is the mean over the steps since the previous log line,
gathered over all ranks, and ``trainer_state.json`` keeps the history in every checkpoint, so a resumed run holds the
log lines of the steps before its checkpoint. :class:`LogEveryCheckpointAndLastStep` makes sure a log line closes
every checkpoint and the last step, so the history covers every step; :func:`run_train_loss` weighs each logged loss
by the steps it covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback


class LogEveryCheckpointAndLastStep(TrainerCallback):
    """Ask the Trainer to log at every step it saves or stops at: no step of the run goes unlogged.

    Placed after the callbacks that request saves and stops (the default flow, preemption), so it sees their flags.
    With ``--logging_strategy no`` nothing is forced (and ``train_loss`` stays the Trainer's own).
    """

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_save or control.should_training_stop) and args.logging_strategy != "no":
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save and args.logging_strategy != "no":
            control.should_log = True
        return control


def run_train_loss(log_history: Iterable[Mapping[str, Any]]) -> float | None:
    """The mean training loss per optimizer step over the log history, or None when no loss was logged.

    Each log line's ``loss`` is the mean of the steps since the previous one, so it counts for that many steps.
    """
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" not in entry:
            continue
        step = int(entry["step"])
        covered = max(step - previous, 1)
        total += float(entry["loss"]) * covered
        steps += covered
        previous = step
    return total / steps if steps else None
