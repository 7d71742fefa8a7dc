"""What the SwanLab dashboard shows first, and what is a result rather than a chart.

SwanLab (0.10.3) lays charts out in the order their keys are first logged: the local dashboard (``swanlab watch``)
puts them all in one section in that order, and the cloud orders sections the same way. SwanLab's transformers
integration logged the "before" samples and their scores first (at step 0, before any loss), the Trainer's final
figures (``train_runtime``, ``train_loss``, ``total_flos``…) and each sample score as charts of a single dot, and a
``train/global_step`` chart of the x axis itself: train/loss was below the fold.

:class:`DashboardLayout` decides instead:

- first the curves that say whether training works: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
  then the evaluation's own (``eval/loss`` and the generation scores);
- the rest (throughput, memory, epoch, evaluation timings, sample texts) is held back until the first evaluation has
  been logged when the run evaluates, then logged with its original steps (SwanLab takes earlier steps for a new key);
- single values (the Trainer's final figures, the samples' scores before and after) are results, not charts: the
  callback puts them in the run's config under ``results`` and in one text table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The Trainer's figures of a whole run, logged once at its end (SwanLab's integration names the same set).
FINAL_FIGURES = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                           "total_flos"})
FIRST = ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss")
# Evaluation keys that are bookkeeping rather than a measure of the model.
_EVAL_BOOKKEEPING = ("eval/runtime", "eval/samples_per_second", "eval/steps_per_second", "eval/generate_seconds")

Batch = tuple[dict[str, Any], int]  # what to pass to swanlab.log, at which step


def chart_key(key: str) -> str:
    """The chart a Trainer log key goes to: ``eval_x`` -> ``eval/x``, ``test_x`` -> ``test/x``, else ``train/x``."""
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def is_primary(key: str) -> bool:
    return key in FIRST or (key.startswith("eval/") and key not in _EVAL_BOOKKEEPING)


class DashboardLayout:
    """Turns the Trainer's log lines into SwanLab batches, in the order the dashboard should show them."""

    def __init__(self, evaluates: bool) -> None:
        self._holding = evaluates  # hold secondary keys back until the first evaluation is charted
        self._held: list[Batch] = []
        self.results: dict[str, Any] = {}  # single values: the run's final figures, the samples' scores

    def log_line(self, logs: Mapping[str, Any], step: int) -> list[Batch]:
        """The batches to log now for one Trainer log line."""
        if FINAL_FIGURES & set(logs):
            self.results.update({k: v for k, v in logs.items() if k in FINAL_FIGURES})
            return []
        charts = {chart_key(k): v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        primary = {k: charts[k] for k in sorted((k for k in charts if is_primary(k)), key=_first_order)}
        secondary = {k: v for k, v in charts.items() if k not in primary}
        batches = [(primary, step)] if primary else []
        evaluated = any(k.startswith("eval/") for k in primary)
        if evaluated and self._holding:
            self._holding = False
            batches += self._held
            self._held = []
        return batches + self.secondary(secondary, step)

    def secondary(self, data: dict[str, Any], step: int) -> list[Batch]:
        """Batches for keys that should not open the dashboard (held back until the first evaluation)."""
        if not data:
            return []
        if self._holding:
            self._held.append((data, step))
            return []
        return [(data, step)]

    def flush(self) -> list[Batch]:
        """Whatever is still held back (a run that ended before its first evaluation)."""
        self._holding = False
        held, self._held = self._held, []
        return held

    def add_results(self, values: Mapping[str, Any]) -> None:
        self.results.update(values)

    def results_text(self) -> str:
        """The results as a two-column text table, one line each."""
        width = max((len(k) for k in self.results), default=0)
        return "\n".join(f"{k.ljust(width)}  {_format(v)}" for k, v in self.results.items())


def _first_order(key: str) -> tuple[int, str]:
    return (FIRST.index(key) if key in FIRST else len(FIRST), key)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
