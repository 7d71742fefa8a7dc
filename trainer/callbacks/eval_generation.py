"""``--eval_generate N``: at each evaluation, generate for N held-out prompts and score the replies.

Eval loss says how likely the references are; this says what the model now *writes*. Each evaluation, the
first N evaluation conversations (prompt = everything before the final answer, reference = that answer) are
answered with the run's stop tokens and scored with ``--eval_metrics``; the values are logged as ``eval_<metric>``
(``eval/<metric>`` in SwanLab, beside ``eval_loss``), the predictions kept for the tracker and appended to
``OUTPUT_DIR/eval_generations.jsonl``.

Every rank takes part: the prompts are dealt out (each rank the same number, the last prompt repeated where the
division is uneven, so that ZeRO-3 — which gathers parameters collectively at every forward — sees the same
number of generate calls everywhere, with ``synced_gpus``), replies are gathered, and only the main process writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch.distributed as dist
from transformers import GenerationConfig, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from trainer.data.prompts import Prompt
from trainer.metrics import compute_metrics
from trainer.sampling import generate_replies

logger = logging.getLogger(__name__)


class EvalGenerationCallback(TrainerCallback):
    def __init__(self, prompts: list[Prompt], tokenizer, config: GenerationConfig, stop_ids: list[int],
                 metrics: str, batch_size: int = 16) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = stop_ids
        self.metrics = metrics
        self.batch_size = batch_size
        self.trainer = None  # set once the Trainer exists: the scores are logged through it
        self.latest: tuple[int, list[str]] | None = None  # (step, replies) of the last evaluation
        self._done_at: int | None = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # With several eval sets the Trainer evaluates (and calls back) once per set: generate once per step.
        if model is None or self._done_at == state.global_step or not self.prompts:
            return control
        self._done_at = state.global_step
        started = time.perf_counter()
        replies = self._generate(model)
        scored = compute_metrics(self.metrics, replies, [p.reference for p in self.prompts])
        values = {f"eval_{name}": round(value, 6) for name, value in scored.values().items()}
        values["eval_generate_seconds"] = round(time.perf_counter() - started, 2)
        self.latest = (state.global_step, replies)
        if state.is_world_process_zero:
            with (Path(args.output_dir) / "eval_generations.jsonl").open("a", encoding="utf-8") as f:
                for prompt, reply, scores in zip(self.prompts, replies, scored.per_example):
                    f.write(json.dumps({"step": state.global_step, "prompt": prompt.messages, "prediction": reply,
                                        "reference": prompt.reference, "scores": scores}, ensure_ascii=False) + "\n")
        if self.trainer is not None:
            self.trainer.log(values)
        return control

    def _generate(self, model) -> list[str]:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        per_rank = -(-len(self.prompts) // world)
        mine = self.prompts[rank * per_rank : (rank + 1) * per_rank]
        padded = mine + [self.prompts[-1]] * (per_rank - len(mine))  # equal work on every rank (ZeRO-3)
        replies = generate_replies(model, self.tokenizer, padded, self.config, self.stop_ids,
                                   batch_size=self.batch_size, synced_gpus=world > 1 and is_deepspeed_zero3_enabled())
        replies = replies[: len(mine)]
        if world == 1:
            return replies
        gathered: list = [None] * world
        dist.all_gather_object(gathered, replies)
        return [reply for part in gathered for reply in part]
