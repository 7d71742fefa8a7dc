"""The run's train_loss weighs each logged loss by the steps it covers; a log line closes every save and the end."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from trainer.callbacks.run_loss import LogEveryCheckpointAndLastStep, run_train_loss


def test_each_logged_loss_counts_for_the_steps_since_the_previous_one():
    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 1.0, "step": 3},
               {"loss": 2.0, "step": 6}, {"train_loss": 7.0, "step": 6}]
    assert run_train_loss(history) == pytest.approx((4.0 * 2 + 1.0 + 2.0 * 3) / 6)
    assert run_train_loss([{"eval_loss": 1.0, "step": 1}]) is None


@pytest.mark.parametrize(("save", "stop", "logged"), [(True, False, True), (False, True, True),
                                                      (False, False, False)])
def test_a_save_or_the_last_step_is_logged(save, stop, logged, tmp_path):
    control = TrainerControl(should_save=save, should_training_stop=stop)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    LogEveryCheckpointAndLastStep().on_step_end(args, TrainerState(), control)
    assert control.should_log is logged


def test_no_log_is_forced_when_logging_is_off(tmp_path):
    control = TrainerControl(should_save=True, should_training_stop=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_strategy="no")
    LogEveryCheckpointAndLastStep().on_step_end(args, TrainerState(), control)
    assert control.should_log is False
