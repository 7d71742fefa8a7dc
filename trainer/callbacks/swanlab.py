"""SwanLab monitoring: exactly one run per job, whatever the number of processes or nodes.

Built on SwanLab's own transformers integration (``swanlab.integration.transformers.SwanLabCallback``), which logs
the Trainer's log lines with ``train/`` and ``eval/`` prefixes and only on the global main process
(``state.is_world_process_zero``), so two processes or two nodes still make one run. transformers' built-in
``report_to="swanlab"`` callback is not used: it fails with SwanLab 0.10 ("No active Run"); ``trainer/sft.py`` takes
"swanlab" out of ``report_to`` and adds this callback instead, so there is never a second one.

On top of the integration this adds what a fine-tuning run needs to be judged and reproduced later:

- the full resolved configuration (recipe, our options, every ``TrainingArguments`` value, world size, global
  batch, library versions, data report, the command line), with secrets scrubbed: tokens and API keys never reach
  SwanLab's files, which travel with output folders and checkpoints. SwanLab records the command line in its run
  metadata on its own (from ``/proc/self/cmdline``, which no process can scrub); when that holds a secret
  (``--hub_token …``) its runtime probe is switched off and the scrubbed command line is in the config instead;
- the sample generations (prompt, reference, output) before training, at each evaluation and after training,
  as ``swanlab.Text``;
- a dashboard that opens on train/loss and the evaluation, with single values (the run's final figures, the
  samples' scores before and after) as results in the config and one text table rather than single-dot charts
  (:mod:`trainer.callbacks.swanlab_layout`);
- our mode names (``cloud`` is SwanLab's ``online``) and a fallback from ``local`` to ``offline`` when the dashboard
  package is missing, because a missing viewer should not stop a long training job.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import swanlab
from swanlab.integration.transformers import SwanLabCallback
from transformers import TrainerCallback

from trainer.callbacks.swanlab_layout import Batch, DashboardLayout
from trainer.run_config import resolved_config, run_secrets, scrub

if TYPE_CHECKING:
    from trainer.args import Config
    from trainer.callbacks.eval_generation import EvalGenerationCallback
    from trainer.data.build import DataReport
    from trainer.samples import SampleRecorder

logger = logging.getLogger(__name__)

# Our --swanlab_mode names → SwanLab's.
MODES = {"cloud": "online", "local": "local", "offline": "offline", "disabled": "disabled"}


def resolve_mode(mode: str) -> str:
    """SwanLab's mode for ours; ``local`` falls back to ``offline`` (with a warning) without the dashboard package.

    ``local`` mode needs ``swanboard`` (``pip install 'swanlab[dashboard]'``) and would otherwise fail when the run
    starts. An offline run keeps every metric on disk and can be uploaded later with ``swanlab sync``.
    """
    if mode not in MODES:
        raise ValueError(f"--swanlab_mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "local" and importlib.util.find_spec("swanboard") is None:
        logger.warning(
            "--swanlab_mode local needs the dashboard package (pip install 'swanlab[dashboard]'); logging in "
            "offline mode instead: the run is kept on disk and can be uploaded later with `swanlab sync DIR`"
        )
        return "offline"
    return MODES[mode]


def _model_facts(model) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_dict", None)):
        facts["model_config"] = config.to_dict()
    if callable(getattr(model, "num_parameters", None)):
        facts["num_parameters"] = model.num_parameters()
        facts["trainable_parameters"] = model.num_parameters(only_trainable=True)
    return facts


class SFTSwanLabCallback(SwanLabCallback):
    """SwanLab's transformers callback plus our scrubbed config, sample generations and a clean finish.

    The run is started lazily by the integration at ``on_train_begin`` on the world-zero process only; no other
    rank ever calls ``swanlab.init``. It is finished at interpreter exit, after the "after" samples recorded by
    ``sft.py`` once training has returned, so they land in the same run.
    """

    def __init__(self, config: dict[str, Any], samples: SampleRecorder | None = None,
                 generations: EvalGenerationCallback | None = None, secrets: tuple[str, ...] = (),
                 **init_kwargs: Any) -> None:
        super().__init__(log_config=False, **init_kwargs)
        self._secrets = secrets
        command = command_line()
        self._config = {**config, "command": scrub(command, secrets)}
        # SwanLab's runtime probe records the raw command line: off when that holds a secret.
        hide_runtime = scrub(command, secrets) != command
        self._init = {**init_kwargs, "settings": swanlab.Settings(probe={"runtime": False}) if hide_runtime else None}
        self._samples = samples
        self._generations = generations
        self._generations_logged: int | None = None
        self._logged_stages: set[str] = set()
        self._last_step = 0
        self._mode = init_kwargs.get("mode")
        self._configured = False
        self._layout: DashboardLayout | None = None  # made at setup, when the arguments say whether it evaluates

    def setup(self, args: Any, state: Any, model: Any = None) -> None:
        try:
            if state.is_world_process_zero and not swanlab.has_run():
                # Started here rather than by the integration, which passes no settings on (it would then find
                # this run active and use it).
                swanlab.init(callbacks=[self], **self._init)
            super().setup(args, state, model)
        except Exception as error:
            if self._mode != "online":
                raise
            # SwanLab's own messages blame the API key even when the server is unreachable; say what to do.
            reason = scrub(str(error), self._secrets).rstrip(".")
            raise RuntimeError(
                f"SwanLab cloud run could not start: {reason}. Set SWANLAB_API_KEY or run `swanlab login` once, and "
                "check that the SwanLab server can be reached; without network use --swanlab_mode offline and "
                "`swanlab sync DIR` later."
            ) from None
        if self._configured or not _is_main(state):
            return  # already set up, or not the world-zero process
        self._configured = True
        self._layout = DashboardLayout(evaluates=args.eval_strategy != "no")
        self.update_config(scrub({**self._config, **_model_facts(model)}, self._secrets))
        # Registered after swanlab.init, so it runs before SwanLab's own exit hook (atexit is last-in first-out).
        atexit.register(self._finish)
        # The "before" samples wait for the first log line: the dashboard opens on the loss, not on them.

    def on_log(self, args, state, control, model=None, logs=None, **kwargs) -> None:
        """The Trainer's log line, laid out by :class:`DashboardLayout` (not the integration's one chart per key)."""
        self._last_step = state.global_step
        self.setup(args, state, model)
        if not logs or not _is_main(state) or self._layout is None:
            return
        self._send(self._layout.log_line(logs, state.global_step))
        self._log_new_samples(state.global_step)
        self._log_new_generations()

    def _send(self, batches: list[Batch]) -> None:
        for data, step in batches:
            swanlab.log(data, step=step)

    def _log_new_generations(self) -> None:
        """The predictions of the latest generation-based evaluation, as text beside its scores."""
        latest = self._generations.latest if self._generations is not None else None
        if latest is None or latest[0] == self._generations_logged:
            return
        step, replies = latest
        self._generations_logged = step
        secrets = self._secrets
        texts = [swanlab.Text(scrub(sample_text(prompt, reply), secrets), caption=f"step {step} #{i + 1}")
                 for i, (prompt, reply) in enumerate(zip(self._generations.prompts, replies))]
        self._send(self._layout.secondary({"eval/predictions": texts}, step))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        # The metrics reached on_log just before (the Trainer logs them, then calls back): only the samples here.
        self.setup(args, state, kwargs.get("model"))
        if _is_main(state) and self._layout is not None:  # this evaluation's samples were made by an earlier callback
            self._last_step = state.global_step
            self._log_new_samples(self._last_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._last_step = state.global_step

    def _log_new_samples(self, step: int) -> None:
        if self._samples is None or not self._samples.prompts or self._layout is None:
            return
        secrets = self._secrets
        for stage, replies in list(self._samples.replies.items()):
            if stage in self._logged_stages:
                continue
            self._logged_stages.add(stage)
            key = f"samples/{stage}" if stage in ("before", "after") else "samples/eval"
            texts = [
                swanlab.Text(scrub(sample_text(prompt, reply), secrets), caption=f"{stage} #{i + 1}")
                for i, (prompt, reply) in enumerate(zip(self._samples.prompts, replies))
            ]
            if stage in ("before", "after"):  # single values: results, not charts of one dot
                self._layout.add_results({f"samples_{stage}_{name}": value
                                          for name, value in self._samples.scores.get(stage, {}).items()})
            self._send(self._layout.secondary({key: texts}, 0 if stage == "before" else step))

    def _finish(self) -> None:
        """Log the samples made after training (if any) and the results, and close the run while the process is
        still whole."""
        if not swanlab.has_run():
            return
        try:
            if self._layout is not None:
                self._log_new_samples(self._last_step)
                self._send(self._layout.flush())
                if self._layout.results:
                    self.update_config({"results": self._layout.results})
                    text = scrub(self._layout.results_text(), self._secrets)
                    swanlab.log({"results": swanlab.Text(text, caption="results")}, step=self._last_step)
        finally:
            swanlab.finish()


def command_line() -> str:
    """This process's command line as SwanLab records it (``/proc/self/cmdline`` on Linux, else ``sys.argv``)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            parts = f.read().decode("utf-8", errors="replace").split("\x00")
    except OSError:
        parts = [sys.executable, *sys.argv]
    return " ".join(part for part in parts if part).strip()


def _is_main(state) -> bool:
    """World-zero process (global rank 0 over all nodes) with a live run."""
    return bool(state.is_world_process_zero) and swanlab.has_run()


def sample_text(prompt, reply: str) -> str:
    """Prompt, reference and output of one sample, as the Qwen2 fine-tuning example logs its predictions."""
    parts = [f"{m['role']}: {m['content']}" for m in prompt.messages if m["role"] != "assistant"]
    if prompt.reference:
        parts.append(f"reference: {prompt.reference}")
    parts.append(f"output: {reply}")
    return "\n\n".join(parts)


class _Disabled(TrainerCallback):
    """``--swanlab_mode disabled``: nothing is started or written."""


def make_swanlab_callback(
    cfg: Config, report: DataReport, world_size: int, samples: SampleRecorder | None = None,
    generations: EvalGenerationCallback | None = None,
) -> TrainerCallback:
    """The SwanLab callback for this job; only the world-zero process will ever start a run.

    ``cfg`` is the parsed :class:`trainer.args.Config`, ``report`` the :class:`DataReport`, ``samples`` the
    :class:`SampleRecorder` whose generations are logged as text.
    """
    tracking = cfg.tracking
    mode = resolve_mode(tracking.swanlab_mode)
    if mode == "disabled":
        return _Disabled()
    init_kwargs: dict[str, Any] = {"project": tracking.swanlab_project, "mode": mode}
    if tracking.swanlab_experiment_name:
        init_kwargs["experiment_name"] = tracking.swanlab_experiment_name
    if tracking.swanlab_workspace:
        init_kwargs["workspace"] = tracking.swanlab_workspace
    secrets = run_secrets(cfg)
    if tracking.swanlab_description:
        init_kwargs["description"] = scrub(tracking.swanlab_description, secrets)
    # Every mode keeps its files with the output (cloud runs too: their local copy can be re-synced).
    init_kwargs["log_dir"] = str(Path(tracking.swanlab_logdir or Path(cfg.training.output_dir) / "swanlog"))
    return SFTSwanLabCallback(resolved_config(cfg, report, world_size), samples=samples, generations=generations,
                              secrets=secrets, **init_kwargs)
