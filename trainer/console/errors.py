"""Report a user fault once, from one process, where the user looks last.

Under ``torchrun`` / ``accelerate launch --multi_gpu`` every rank usually meets the same fault (they read the same
options and data), and the launcher ends the job with its failure summary, which used to hold only "To enable
traceback see …". torch's elastic agent gives each worker an error file (env ``TORCHELASTIC_ERROR_FILE``) and shows
its message in that summary, so the main process writes the ``error: …`` sentence there instead of printing it:
it then appears once, at the end. The other ranks stay silent for a grace period (the launcher terminates them as
soon as the main process has failed); a rank whose fault is its own reports it after that grace. Without such a
launcher (plain python, accelerate's one-process launcher, srun) the sentence is printed to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from trainer.errors import UserError

USER_ERROR_EXIT_CODE = 2  # what argparse uses for a usage error; launchers turn it into their own non-zero code
OTHER_RANKS_GRACE_S = 15.0


def error_sentence(error: UserError | str) -> str:
    return f"error: {error}"


def _global_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _elastic_error_file() -> str | None:
    """The file torch's elastic agent reads a worker's failure from (unset or empty: no such agent)."""
    return os.environ.get("TORCHELASTIC_ERROR_FILE") or None


def write_elastic_error_file(path: str, sentence: str) -> None:
    """The layout of ``torch.distributed.elastic``'s ErrorHandler: the summary shows ``py_callstack`` verbatim."""
    data = {"message": {"message": sentence,
                        "extraInfo": {"py_callstack": sentence, "timestamp": str(int(time.time()))}}}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False)


def _wait_for_the_launcher(grace_s: float) -> None:
    """Give the main process time to fail first; the launcher's SIGTERM then ends this one silently."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a preemption handler would otherwise swallow it
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.2)


def report_user_error(error: UserError | str, grace_s: float = OTHER_RANKS_GRACE_S) -> int:
    """Show ``error: …`` once for the whole job and return the exit code (2) for the entry point to exit with."""
    sentence = error_sentence(error)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if _global_rank() != 0 and world_size > 1:
        _wait_for_the_launcher(grace_s)
    error_file = _elastic_error_file()
    if error_file:
        try:
            write_elastic_error_file(error_file, sentence)
        except OSError:
            error_file = None
    if not error_file:
        print(sentence, file=sys.stderr, flush=True)
    return USER_ERROR_EXIT_CODE
