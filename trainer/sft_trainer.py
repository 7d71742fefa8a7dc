"""The HF Trainer plus useful-token accounting: tokens/s and label tokens/s summed over all ranks.

Throughput is measured where the batches are (``compute_loss``) and reported where the logs are made, so the
figures land in ``trainer_state.json``'s log history and every tracker alike. One all-reduce per log line is the
only synchronisation it adds.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist
from transformers import Trainer

from trainer.data.templates import IGNORE_INDEX


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory of this process when on CUDA, else its peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class SFTTrainer(Trainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._counts: torch.Tensor | None = None  # [tokens, label tokens] since the last log, on the device
        self._since: float | None = None  # set by the first training batch: model setup is not training time

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            if self._since is None:
                self._since = time.perf_counter()
            # Accumulated as device tensors: reading them back every micro-batch would stall the GPU.
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            labelled = (inputs["labels"] != IGNORE_INDEX).sum()
            step = torch.stack([torch.as_tensor(real, device=labelled.device), labelled]).to(torch.float64)
            self._counts = step if self._counts is None else self._counts + step
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _throughput(self) -> dict[str, float]:
        counts = self._counts if self._counts is not None else torch.zeros(2, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            counts = counts.to(self.args.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(counts)
        now = time.perf_counter()
        elapsed = max(now - (self._since or now), 1e-9)
        self._counts = None
        self._since = now
        return {
            "tokens_per_second": round(float(counts[0]) / elapsed, 1),
            "label_tokens_per_second": round(float(counts[1]) / elapsed, 1),
            "peak_memory_gib": round(peak_memory_gib(self.args.device), 3),
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line (all ranks log together, so the all-reduce is safe)
            logs.update(self._throughput())
        super().log(logs, start_time)
