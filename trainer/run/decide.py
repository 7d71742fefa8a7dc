"""Decide once, on the main process, and let every process of the job act on the same decision.

What to resume from, whether the folder is free, whether a checkpoint is safe to load: each process deciding alone
could decide differently (a shared filesystem seen at different moments, a lock only one of them may take), and a
process that stops alone leaves the others waiting in a collective. So the main process decides and broadcasts the
outcome — its result, or the user error it raised — and every process returns or raises the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_on_main(decide: Callable[[], T], is_main: bool) -> T:
    """``decide()`` run on the main process only; its result (or exception) returned (raised) on every process."""
    result, error = None, None
    if is_main:
        try:
            result = decide()
        except Exception as raised:  # noqa: BLE001 - handed to the other processes, then raised here as it is
            error = raised
    if distributed():
        box = [(result, _portable(error))]
        dist.broadcast_object_list(box, src=0)
        if not is_main:
            result, error = box[0]
    if error is not None:
        raise error
    return result


def _portable(error: Exception | None) -> Exception | None:
    """The error as the other processes can rebuild it (an exception that does not pickle becomes its text)."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"the main process failed: {type(error).__name__}: {error}")


def barrier() -> None:
    if distributed():
        dist.barrier()
