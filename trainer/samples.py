"""Sample generations that show whether a fine-tune worked: before training, at each evaluation, after.

As in the Tang-poem notebook's before/after comparison, the same prompts are answered by the model before and
after training and written side by side to ``samples.md`` (and ``samples.json``) in the output folder.
Generation runs on the main process only; under ZeRO-3 the in-training model is sharded across ranks, so the
evaluation samples are skipped there and the "after" samples come from the saved model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from trainer import markdown
from trainer.args import ConfigError
from trainer.data.prompts import Prompt, read_prompts, with_references
from trainer.data.registry import has_split, registered_names, resolve_dataset, resolve_references
from trainer.metrics import compute_metrics, metrics_table, side_by_side
from trainer.sampling import default_generation_config, generate_replies

logger = logging.getLogger(__name__)


def load_sample_prompts(cfg) -> list[Prompt]:
    """``--sample_prompts``: a file, ``none``, or ``auto`` = the test split of the registered training data.

    References come from the prompt records' answers, from ``--sample_references``, or (``auto``) from the
    references registered with the test split, where found.
    """
    spec, limit, system = cfg.data.sample_prompts, cfg.data.num_sample_prompts, cfg.data.system
    references = cfg.data.sample_references
    if not spec or spec == "none" or limit <= 0:
        return []
    if spec != "auto":
        prompts = read_prompts(spec, system)
    else:
        names = set(registered_names())
        registered = next((item for item in (s.strip().rsplit(":", 1)[0] for s in cfg.data.dataset.split(","))
                           if item in names and has_split(item, "test")), None)
        if registered is None:
            return []
        (path,) = resolve_dataset(registered, split="test", data_dir=cfg.data.data_dir)
        prompts = read_prompts(path, system)
        if references == "auto":
            references = resolve_references(registered, "test", cfg.data.data_dir)
            if references is None:
                logger.info("samples of %s: no local copy of the test references; samples are not scored",
                            registered)
    if references and references != "auto":
        prompts = with_references(prompts, references)
    return prompts[:limit]


class SampleRecorder:
    """Replies to the sample prompts before training, at each evaluation and after; scored with ``metrics`` when
    every prompt has a reference (the Tang test poems and their ground truth)."""

    def __init__(self, prompts: list[Prompt], tokenizer, stop_ids: list[int], max_new_tokens: int,
                 metrics: str | None = None) -> None:
        if prompts and not tokenizer.chat_template:  # a base model trained on raw text: no way to render a chat
            raise ConfigError("--sample_prompts: the tokenizer has no chat template (a base model?) to render the "
                              "sample prompts with; pass --sample_prompts none, or --template chatml|llama2")
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        # The settings evaluate.py and generate.py use too (greedy, no repeated trigram): the same scores there.
        self.config = default_generation_config(tokenizer, max_new_tokens)
        self.replies: dict[str, list[str]] = {}
        self.latest: tuple[str, list[str]] | None = None
        self.metrics = metrics if prompts and all(p.reference for p in prompts) else None
        self.scores: dict[str, dict[str, float]] = {}  # stage -> metric values

    def can_generate(self) -> bool:
        return bool(self.prompts) and not is_deepspeed_zero3_enabled()

    def record(self, stage: str, model) -> list[str]:
        replies = generate_replies(model, self.tokenizer, self.prompts, self.config, self.stop_ids)
        self.replies[stage] = replies
        self.latest = (stage, replies)
        for prompt, reply in zip(self.prompts, replies):
            logger.info("sample [%s] %s → %s", stage, prompt.text.replace("\n", " "), reply.replace("\n", " "))
        if self.metrics:
            self.scores[stage] = compute_metrics(self.metrics, replies, [p.reference for p in self.prompts]).values()
            logger.info("samples [%s] scored: %s", stage, ", ".join(f"{k} {v:.4f}" for k, v in
                                                                  self.scores[stage].items()))
        return replies

    def callbacks(self) -> list[TrainerCallback]:
        return [_EvalSamples(self)] if self.can_generate() else []

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        stages = [s for s in ("before", "after") if s in self.replies]
        rows = []
        for i, prompt in enumerate(self.prompts):
            row = {"prompt": prompt.messages, "reference": prompt.reference}
            row.update({stage: self.replies[stage][i] for stage in stages})
            rows.append(row)
        (folder / "samples.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")

        has_reference = any(p.reference for p in self.prompts)
        header = ["#", "prompt", *stages] + (["reference"] if has_reference else [])
        cells = [[str(i + 1), prompt.text, *(row[s] for s in stages), *([row["reference"]] if has_reference else [])]
                 for i, (prompt, row) in enumerate(zip(self.prompts, rows))]
        lines = markdown.table(header, cells)
        scored = ""
        if self.scores:
            (folder / "samples_metrics.json").write_text(json.dumps(self.scores, indent=2), encoding="utf-8")
            scored = (f"Scored against the references ({len(self.prompts)} prompts):\n\n"
                      + metrics_table(side_by_side(**self.scores)) + "\n\n")
        path = folder / "samples.md"
        path.write_text("# Samples: before and after fine-tuning\n\n" + scored + "\n".join(lines) + "\n",
                        encoding="utf-8")
        return path


class _EvalSamples(TrainerCallback):
    def __init__(self, recorder: SampleRecorder) -> None:
        self.recorder = recorder

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.recorder.record(f"step {state.global_step}", model)
        return control
