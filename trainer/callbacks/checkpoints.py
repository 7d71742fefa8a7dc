"""Finish each checkpoint once every rank has written its part: settings recorded, marked complete, old ones rotated.

The Trainer's own rotation deletes old checkpoints inside ``_save_checkpoint``, before this callback runs: with
``--save_total_limit 1`` a kill at that moment left no complete checkpoint at all. :class:`~trainer.sft_trainer.
SFTTrainer` lifts the Trainer's limit for its save and the limit is applied here instead, after the marker.

Every rank lists the files it sees and the lists are merged, so a checkpoint written by several nodes to a shared
filesystem is listed whole even when one node's view of the folder lags behind another's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from transformers import TrainerCallback

from trainer.checkpoints import list_files, mark_complete, rotate
from trainer.run.decide import barrier, distributed
from trainer.run.disk import disk_full_as_error
from trainer.run.settings import write_settings

logger = logging.getLogger(__name__)


class CheckpointListener(Protocol):
    def check(self) -> None: ...

    def checkpoint_complete(self, checkpoint: Path) -> None: ...


class CheckpointCallback(TrainerCallback):
    def __init__(self, keep: int | None, settings: dict[str, Any] | None = None,
                 listener: CheckpointListener | None = None) -> None:
        self.keep = keep
        self.settings = settings
        self.listener = listener

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        main = state.is_world_process_zero
        barrier()  # every rank has written its part
        with disk_full_as_error(checkpoint, "the checkpoint's settings and marker"):
            if main:
                if self.listener is not None:
                    self.listener.check()
                if self.settings is not None:
                    write_settings(checkpoint, self.settings)
            barrier()
            files = list_files(checkpoint)
            if distributed():
                seen: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
                dist.all_gather_object(seen, files)
                for other in seen:
                    for name, size in other.items():
                        files[name] = max(size, files.get(name, 0))
            if main:
                mark_complete(checkpoint, files)
        if main:
            for removed in rotate(args.output_dir, self.keep, state.best_model_checkpoint):
                logger.info("deleted %s (--save_total_limit %s)", removed.name, self.keep)
            if self.listener is not None:
                self.listener.checkpoint_complete(checkpoint)
        return control
