"""Packing isolation, proven on the model as loaded: before the first step, not assumed from its name.

Whether the examples of a packed row stay apart depends on the architecture, the attention backend, and how the
batch tells the model where examples start. transformers turns position ids that restart at 0 into a block-diagonal
mask for most decoders, but not for all: models with ALiBi or attention sinks (BLOOM, MPT, Falcon, gpt-oss...), BERT
-style decoders, and every model with state-space, recurrent or linear-attention layers (Mamba, Jamba, Qwen3-Next,
LFM2...) let a packed example see the ones before it — silently, with logits off by 1e-3 to 1. So the run measures it:

    three short random examples a, b, c        packed row  a a a a a b b b b b b b c c c c c c
    each run alone                             same row with a and b replaced by other tokens

and compares, for b and c, the packed logits with the logits alone (does the model see what it would see alone?) and
with those of the row whose earlier examples differ (does anything leak in?). The second comparison has identical
shapes, so an isolating model gives the same numbers to the last bit and the test is sharp in any dtype; the first
is limited by the dtype's rounding, calibrated on example a, which cannot leak (causal).

Mechanisms are tried in order: position-id restarts alone, then a 4-D block-diagonal causal mask (as LLaMA-Factory's
``neat_packing`` builds for sdpa/eager) where the backend takes one. The first that isolates is used; none → the run
stops with :class:`IsolationError` naming the architecture, backend, measured differences and the fix. The check
runs the same forwards on every rank (ZeRO-3 gathers parameters collectively), agrees on the result with one
all-reduce, and runs under ``fork_rng`` in eval mode: it consumes no random number of the run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.data.packing import pack_examples
from trainer.errors import UserError

logger = logging.getLogger(__name__)

MECHANISMS = ("position_ids", "mask4d")
PROBE_LENGTHS = (9, 13, 11)
# Largest |logit difference to alone| / logit scale that rounding explains, per dtype (above: not isolated).
ALONE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# Largest relative change that differing earlier examples may cause (same shapes: ~0 when isolated).
LEAK_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_RECURRENT = re.compile(r"Mamba|Mixer|DeltaNet|Rwkv|RWKV|Recurrent|Lru|ShortConv|LinearAttention|SSM|Lightning")


class IsolationError(UserError, RuntimeError):
    """Packed examples would attend to each other on this model; the message says how much and what to do."""


@dataclass
class Measurement:
    mechanism: str
    alone: float  # max |logit - logit alone| over the later examples, relative to the logit scale
    leak: float  # max |logit - logit with other earlier examples|, relative
    noise: float  # the same as `alone` for the first example: what rounding does at this length
    error: str | None = None  # the forward failed (e.g. a 4-D mask the model does not take)

    def isolates(self, dtype: torch.dtype) -> bool:
        if self.error is not None:
            return False
        alone_tolerance = max(ALONE_TOLERANCE.get(dtype, 3e-2), 4 * self.noise)
        return self.alone <= alone_tolerance and self.leak <= LEAK_TOLERANCE.get(dtype, 1e-2)

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.mechanism}: forward failed ({self.error})"
        return (f"{self.mechanism}: vs alone {self.alone:.1e} (rounding at this length {self.noise:.1e}), "
                f"leak from earlier examples {self.leak:.1e}")


def probe_examples(vocab_size: int, seed: int = 0) -> list[dict]:
    """Three short examples of random tokens, from a private generator (the run's RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    out = []
    for n in PROBE_LENGTHS:
        ids = torch.randint(low, vocab_size, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _logits(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**batch, use_cache=False).logits.float()


def measure(model: torch.nn.Module, make_batch: Callable[[list[dict]], dict], mechanism: str,
            vocab_size: int) -> Measurement:
    """Compare packed logits with the examples alone and with other earlier examples (see the module docstring).

    ``make_batch`` turns examples into the batch training would feed: one packed row (or one flattened micro-batch).
    """
    device = next(model.parameters()).device
    examples = probe_examples(vocab_size)
    others = probe_examples(vocab_size, seed=1)
    # Same lengths, other tokens before the last example: isolation means the last example cannot tell.
    swapped = [*others[:-1], examples[-1]]
    try:
        packed = _logits(model, make_batch(examples), device)[0]
        changed = _logits(model, make_batch(swapped), device)[0]
    except Exception as error:  # the mechanism is not accepted by this model (e.g. a 4-D mask): not isolating
        return Measurement(mechanism, float("inf"), float("inf"), 0.0, error=f"{type(error).__name__}: {error}")
    alone, noise, scale, start = 0.0, 0.0, 1e-6, 0
    for k, example in enumerate(examples):
        n = len(example["input_ids"])
        ids = torch.tensor([example["input_ids"]], device=device)
        single = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=False)
        single = single.logits.float()[0]
        scale = max(scale, single.abs().max().item())
        diff = (packed[start : start + n] - single).abs().max().item()
        if k == 0:
            noise = diff
        else:
            alone = max(alone, diff)
        start += n
    n_last = len(examples[-1]["input_ids"])
    leak = (packed[start - n_last : start] - changed[start - n_last : start]).abs().max().item()
    return Measurement(mechanism, alone / scale, leak / scale, noise / scale)


def _agree(values: Sequence[float]) -> list[float]:
    """The element-wise maximum over all ranks, so that every rank takes the same decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([v if v == v else float("inf") for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _describe(model: torch.nn.Module) -> str:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = base.config
    wrapped = " + LoRA" if base is not model else ""
    return (f"{type(base).__name__} ({config.model_type}{wrapped}), attention {config._attn_implementation}, "
            f"dtype {base.dtype}")


def check_isolation(model: torch.nn.Module, batch_makers: dict[str, Callable[[list[dict]], dict]],
                    vocab_size: int) -> Measurement:
    """The first mechanism that isolates examples on ``model``, measured; :class:`IsolationError` if none does.

    ``batch_makers`` maps mechanism names (in the order to try) to functions building the training batch.
    """
    started = time.perf_counter()
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    dtype = base.dtype
    was_training = model.training
    tried = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            for mechanism, make_batch in batch_makers.items():
                measured = measure(model, make_batch, mechanism, vocab_size)
                measured.alone, measured.leak, measured.noise = _agree([measured.alone, measured.leak,
                                                                        measured.noise])
                tried.append(measured)
                if measured.isolates(dtype):
                    logger.info("packing isolation on %s: %s -> isolated, using %s (checked in %.2f s)",
                                _describe(model), measured, mechanism, time.perf_counter() - started)
                    return measured
    finally:
        model.train(was_training)
    recurrent = sorted({type(m).__name__ for m in base.modules() if _RECURRENT.search(type(m).__name__)})
    hint = (f" Its layers {', '.join(recurrent[:4])} carry state along the row (state-space / recurrent / "
            "linear attention), which no attention mask stops, and transformers' torch path takes no sequence "
            "boundaries for them." if recurrent else "")
    raise IsolationError(
        f"packed examples would attend to each other on {_describe(model)}: "
        + "; ".join(str(m) for m in tried)
        + f" (relative to the logit scale; isolated means <= {ALONE_TOLERANCE.get(dtype, 3e-2):.0e} vs alone and "
        f"<= {LEAK_TOLERANCE.get(dtype, 1e-2):.0e} leak).{hint} Train without packing: --packing false "
        "(and --padding_free false)."
    )


def probe_batch_makers(collator, packing: bool, mechanisms: Sequence[str]) -> dict[str, Callable]:
    """Batch builders for :func:`check_isolation`: the run's own collator, switched to each mechanism in turn."""

    def maker(mechanism: str) -> Callable[[list[dict]], dict]:
        def make(examples: list[dict]) -> dict:
            collator.mechanism = mechanism
            if not packing:  # padding-free: the collator flattens the examples itself
                return collator(examples)
            rows = pack_examples(examples, max_length=sum(len(e["input_ids"]) for e in examples))
            assert len(rows) == 1  # one row holding a, b, c in that order (a bin lists its examples ascending)
            return collator(rows)
        return make

    return {m: maker(m) for m in mechanisms}
