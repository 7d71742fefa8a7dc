"""One compact line per log instead of the Trainer's dicts of quoted strings.

``step 20/176 · loss 7.0081 · lr 2.98e-03 · grad norm 0.6838 · 3,619 tok/s (1,301 labelled) · 0.85 GiB · ETA 1m27s``

The Trainer prints every log as a Python dict (through its progress bar or, without one, its printer callback).
:func:`use_compact_log` takes those two callbacks out through the Trainer's public ``remove_callback`` and adds this
one, which prints from the main process only. The logged values themselves (trainer_state.json, SwanLab) are
unchanged.
"""

from __future__ import annotations

import sys
import time

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

SEPARATOR = " · "


def duration(seconds: float) -> str:
    """``1h02m``, ``1m27s``, ``9s``."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def train_line(logs: dict, step: int, max_steps: int, eta_s: float | None) -> str:
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad norm {logs['grad_norm']:.4f}")
    if "tokens_per_second" in logs:
        speed = f"{logs['tokens_per_second']:,.0f} tok/s"
        if "label_tokens_per_second" in logs:
            speed += f" ({logs['label_tokens_per_second']:,.0f} labelled)"
        parts.append(speed)
    if "peak_memory_gib" in logs:
        parts.append(f"{logs['peak_memory_gib']:.2f} GiB")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return SEPARATOR.join(parts)


def other_line(logs: dict, step: int) -> str:
    """An evaluation (its numbers, ``eval_`` dropped) or the end of training (time and train_loss; the Trainer's
    metrics block follows with the rest)."""
    if not any(key.startswith("eval_") for key in logs):
        parts = [f"done at step {step}"]
        if "train_runtime" in logs:
            parts[0] += f" in {duration(logs['train_runtime'])}"
        if "train_loss" in logs:
            parts.append(f"train_loss {_number(logs['train_loss'])}")
        return SEPARATOR.join(parts)
    parts = [f"eval at step {step}"]
    for key, value in logs.items():
        if key.startswith("eval_") and isinstance(value, (int, float)):
            name = key.removeprefix("eval_")
            parts.append(f"{name} {duration(value) if name == 'runtime' else _number(value)}")
    return SEPARATOR.join(parts)


class CompactLogCallback(TrainerCallback):
    def __init__(self, stream=None) -> None:
        self.stream = stream
        self._start: float | None = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._start_step = time.monotonic(), state.global_step

    def _eta(self, state) -> float | None:
        done = state.global_step - self._start_step
        if self._start is None or done <= 0 or not state.max_steps:
            return None
        return (time.monotonic() - self._start) / done * (state.max_steps - state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            line = train_line(logs, state.global_step, state.max_steps, self._eta(state))
        else:
            line = other_line(logs, state.global_step)
        print(line, file=self.stream or sys.stdout, flush=True)


def use_compact_log(trainer: Trainer) -> None:
    """Replace the Trainer's dict printing (progress bar or printer) with :class:`CompactLogCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CompactLogCallback())
