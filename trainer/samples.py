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

from trainer.data.prompts import Prompt, read_prompts
from trainer.data.registry import has_split, registered_names, resolve_dataset
from trainer.sampling import default_generation_config, generate_replies

logger = logging.getLogger(__name__)


def load_sample_prompts(cfg) -> list[Prompt]:
    """``--sample_prompts``: a file, ``none``, or ``auto`` = the test split of the registered training data."""
    spec, limit, system = cfg.data.sample_prompts, cfg.data.num_sample_prompts, cfg.data.system
    if not spec or spec == "none" or limit <= 0:
        return []
    if spec != "auto":
        return read_prompts(spec, system, limit)
    names = set(registered_names())
    for item in (s.strip() for s in cfg.data.dataset.split(",")):
        if item in names and has_split(item, "test"):
            (path,) = resolve_dataset(item, split="test", data_dir=cfg.data.data_dir)
            return read_prompts(path, system, limit)
    return []


def markdown_table(header: list[str], rows: list[list[str | None]]) -> list[str]:
    """The lines of a markdown table; pipes and newlines in generated text are escaped so each row stays one row."""

    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|").replace("\n", "<br>")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


class SampleRecorder:
    def __init__(self, prompts: list[Prompt], tokenizer, stop_ids: list[int], max_new_tokens: int) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        # Greedy with no repeated trigram, as the Tang notebook decodes: untrained models otherwise loop on one token.
        self.config = default_generation_config(tokenizer, max_new_tokens, no_repeat_ngram_size=3)
        self.replies: dict[str, list[str]] = {}
        self.latest: tuple[str, list[str]] | None = None

    def can_generate(self) -> bool:
        return bool(self.prompts) and not is_deepspeed_zero3_enabled()

    def record(self, stage: str, model) -> list[str]:
        replies = generate_replies(model, self.tokenizer, self.prompts, self.config, self.stop_ids)
        self.replies[stage] = replies
        self.latest = (stage, replies)
        for prompt, reply in zip(self.prompts, replies):
            logger.info("sample [%s] %s → %s", stage, prompt.text.replace("\n", " "), reply.replace("\n", " "))
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
        lines = markdown_table(header, cells)
        path = folder / "samples.md"
        path.write_text("# Samples: before and after fine-tuning\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
        return path


class _EvalSamples(TrainerCallback):
    def __init__(self, recorder: SampleRecorder) -> None:
        self.recorder = recorder

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.recorder.record(f"step {state.global_step}", model)
        return control
