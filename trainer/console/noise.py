"""Known-harmless library messages, silenced at the logger that emits them and only where they are harmless.

Each entry names the logger, the start of the message and the condition under which it says nothing the user can
act on; any other message of the same logger still shows. Filters are attached to the library's own logger
(created here if the library is not imported yet), so they hold from the library's first line on.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def _no_kernels_package() -> bool:
    return importlib.util.find_spec("kernels") is None


@dataclass(frozen=True)
class Noise(logging.Filter):
    logger: str
    starts_with: str
    harmless_when: Callable[[], bool]
    why: str

    def filter(self, record: logging.LogRecord) -> bool:  # False drops the record
        return not (str(record.msg).lstrip().startswith(self.starts_with) and self.harmless_when())


KNOWN_NOISE = (
    Noise("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
          _no_kernels_package,
          "an optional faster 4-bit CPU kernel from the `kernels` package (and the hub); without the package "
          "bitsandbytes uses its own CPU code, which is what runs anyway"),
    Noise("DeepSpeed", "Setting accelerator to CPU", _no_cuda,
          "torch sees no CUDA device, so CPU is the only accelerator; every rank prints its device at start"),
    Noise("transformers.trainer", "Training completed. Do not forget to share your model", lambda: True,
          "an invitation to upload, printed after every run"),
)


def silence_known_noise() -> None:
    """Attach each filter to its logger (idempotent)."""
    for noise in KNOWN_NOISE:
        logging.getLogger(noise.logger).addFilter(noise)
