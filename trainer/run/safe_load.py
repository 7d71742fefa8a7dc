"""Checkpoints load no code: every pickle a resume reads is loaded with ``weights_only`` semantics, or refused.

A pickle can name any importable callable and have it called while loading (``os.system`` included), so a folder
anyone else can write to — a shared output folder, a copied checkpoint — must not be unpickled freely; Slurm
requeues resume automatically, without anyone looking. The plain Trainer path already loads optimizer, scheduler,
scaler and RNG state with ``torch.load(weights_only=True)``; DeepSpeed 0.19's ``TorchCheckpointEngine.load`` loads
``global_step*/*_model_states.pt`` and ``*_optim_states.pt`` with ``weights_only=False``, and DeepSpeed offers no
option to change that. Two measures, neither of which patches a library:

- :func:`verify_checkpoint` (main process, before anything is loaded): every pickle file of the checkpoint is loaded
  once with ``weights_only=True`` under :func:`allowed_globals` — storages memory-mapped, so only the small pickle
  record is read (about 10 ms a checkpoint, whatever its size: ``bench/results/2026-12-06-cpu-run-guards.md``) — and a
  file that names anything else is refused in one sentence naming the file and the type. ``training_args.bin`` is
  skipped: no resume reads it.
- :func:`guard_loading` (every process, for the run, when resuming): sets torch's own
  ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which makes every ``torch.load`` of the process use the weights-only
  unpickler even where the caller passed ``weights_only=False`` (DeepSpeed), and registers the few DeepSpeed types
  its checkpoints really contain with ``torch.serialization.add_safe_globals``. A file changed between the check and
  DeepSpeed's load is therefore still loaded without running code (it fails with torch's own error instead).

The allow-list is what these libraries save: numpy's array/dtype reconstruction in RNG states (transformers' own
list), and in ZeRO optimizer states DeepSpeed's ``LossScaler``, ``ZeroStageEnum`` and ``fragment_address`` (found in
ZeRO-2 and ZeRO-3 checkpoints, full and LoRA, on CPU) and ``DynamicLossScaler`` (what fp16 stores in place of
``LossScaler``). All are plain data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.trainer_pt_utils import safe_globals as numpy_safe_globals

from trainer.checkpoints import NOT_NEEDED_FOR_RESUME, CheckpointError

logger = logging.getLogger(__name__)

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code (or cannot be read) when loaded."""


def is_deepspeed_checkpoint(checkpoint: str | Path) -> bool:
    return any(p.is_dir() for p in Path(checkpoint).glob("global_step*"))


def deepspeed_globals() -> list:
    """The DeepSpeed types found in ZeRO checkpoints (imported only when a DeepSpeed checkpoint is resumed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def allowed_globals(checkpoint: str | Path) -> list:
    return deepspeed_globals() if is_deepspeed_checkpoint(checkpoint) else []


def pickle_files(checkpoint: str | Path) -> list[Path]:
    """Files of the checkpoint a resume unpickles: torch's zip format or a bare pickle, by their first bytes."""
    found = []
    for path in sorted(Path(checkpoint).rglob("*")):
        if not path.is_file() or path.name in NOT_NEEDED_FOR_RESUME:
            continue
        with path.open("rb") as handle:
            head = handle.read(4)
        if head.startswith(_ZIP) or head.startswith(_PICKLE):
            found.append(path)
    return found


def verify_checkpoint(checkpoint: str | Path) -> None:
    """Load every pickle of ``checkpoint`` with ``weights_only=True``; :class:`UnsafeCheckpointError` on the first
    that names a type outside the allow-list or cannot be read."""
    allowed = allowed_globals(checkpoint)
    for path in pickle_files(checkpoint):
        with path.open("rb") as handle:
            zipped = handle.read(4) == _ZIP
        try:
            with numpy_safe_globals(), torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's remarks on a pickle protocol it does not expect
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors and plain data"
            raise UnsafeCheckpointError(
                f"{path}: this checkpoint file holds {what}, and loading it could run code; refusing to resume "
                f"from {checkpoint} (resume only from checkpoints this trainer wrote, or start over)"
            ) from None
        except Exception as error:  # noqa: BLE001 - a damaged file: say which, in one sentence
            raise UnsafeCheckpointError(
                f"{path}: this checkpoint file cannot be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}); resume from another checkpoint"
            ) from None


@contextlib.contextmanager
def guard_loading(checkpoint: str | Path) -> Iterator[None]:
    """Within the block, every ``torch.load`` of this process is weights-only, with the allow-list for
    ``checkpoint`` registered."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        logger.warning("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: %s is loaded as DeepSpeed loads it (only the "
                       "check before the resume guards against code in it)", checkpoint)
        yield
        return
    torch.serialization.add_safe_globals(allowed_globals(checkpoint))
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before
