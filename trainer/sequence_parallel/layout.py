"""What a sequence-parallel launch may do: checked before any weight is loaded, refused in one sentence each.

Ulysses splits each row over N ranks and, around attention, the heads over the same N ranks, so it needs N to
divide the processes (data-parallel size = processes / N), the attention heads, and the key/value heads (or the
reverse: fewer key/value heads than N are replicated). Its data path carries ``input_ids``, ``labels`` and
``position_ids`` only and gathers the whole row before a causal core attention: a backend that needs a 4-D mask
(eager), or packed rows kept apart by a mask built from the shard's position ids (sdpa), cannot work. It is built on
DeepSpeed's pieces, so the launch must be a DeepSpeed one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.args import Config

FLAG = "--sequence_parallel_size"
# Backends whose core attention takes the gathered row's position ids as they are and so keeps packed examples apart.
ISOLATING_BACKENDS = ("flash_attention_2", "flash_attention_3")


class SequenceParallelError(UserError, ValueError):
    """A sequence-parallel launch that cannot work as asked."""


def check_launch(cfg: Config, world_size: int) -> None:
    """Refusals that need only the options and the launch (no model)."""
    size = cfg.finetune.sequence_parallel_size
    if size < 1:
        raise SequenceParallelError(f"{FLAG} {size}: the number of ranks each row is split over, 1 (off) or more")
    if size == 1:
        return
    args = cfg.training
    if world_size % size:
        raise SequenceParallelError(
            f"{FLAG} {size} does not divide the {world_size} launched process(es): launch a multiple of {size} "
            f"processes (data-parallel size = processes / {size}) or choose a divisor of {world_size}")
    if getattr(args, "deepspeed_plugin", None) is None:
        raise SequenceParallelError(
            f"{FLAG} {size} runs on DeepSpeed's Ulysses sequence parallelism: launch with DeepSpeed "
            "(e.g. accelerate launch --config_file launch/zero3.yaml, or launch/cpu_zero3.yaml on CPU, or --deepspeed "
            "ds_configs/zero3.json)")
    if cfg.data.packing or cfg.data.padding_free:
        from trainer.model import choose_attention

        backend = choose_attention(cfg.model.attn_implementation)
        if backend not in ISOLATING_BACKENDS:
            what = "--packing" if cfg.data.packing else "--padding_free"
            raise SequenceParallelError(
                f"{what} with {FLAG} {size} on {backend} attention: sequence parallelism gathers each row for a plain "
                f"causal attention and drops the mask that keeps packed examples apart, so they would attend to each "
                f"other; use {what.lstrip('-')} false (padded rows), or flash attention "
                f"(--attn_implementation flash_attention_2), whose padding-free position ids travel with the shards")
    if args.train_sampling_strategy != "random":
        raise SequenceParallelError(f"{FLAG} {size} deals whole global batches to the groups: keep "
                                    f"--train_sampling_strategy random (not {args.train_sampling_strategy})")


def check_model(model_path: str, attn_implementation: str, size: int, trust_remote_code: bool = False,
                max_length: int | None = None) -> None:
    """Refusals that need the model's configuration (read without its weights)."""
    if size == 1:
        return
    from transformers import AutoConfig

    from trainer.model import choose_attention

    backend = choose_attention(attn_implementation)
    if backend in ("eager", "paged|eager"):
        raise SequenceParallelError(
            f"{FLAG} {size} cannot wrap eager attention (it needs the full 4-D mask, which the sequence shards do "
            "not carry): use --attn_implementation sdpa, or flash_attention_2 on GPUs")
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        raise SequenceParallelError(f"{FLAG} {size}: {model_path} states no num_attention_heads in its config, so "
                                    "its attention cannot be split by heads; train it without sequence parallelism")
    if heads % size:
        raise SequenceParallelError(
            f"{FLAG} {size} must divide the model's {heads} attention heads (Ulysses gives each rank heads/{size} "
            f"of them); choose a divisor of {heads}")
    if kv_heads % size and size % kv_heads:
        raise SequenceParallelError(
            f"{FLAG} {size} and the model's {kv_heads} key/value heads must divide one another (Ulysses splits or "
            f"replicates them); choose a divisor or multiple of {kv_heads} that divides {heads}")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and backend not in ISOLATING_BACKENDS and (max_length is None or max_length > window):
        raise SequenceParallelError(
            f"{FLAG} {size} on {backend} attention would drop the model's sliding window of {window} tokens (it lives "
            f"in the mask, which Ulysses discards; rows of up to {max_length} tokens would attend beyond it): use "
            f"flash_attention_2, which takes the window as an argument, or --max_length {window} at most")


def describe(size: int, world_size: int, zero_stage: int | None) -> str:
    """The layout in one line, e.g. ``sequence parallel 2 x data parallel 4, ZeRO-3``."""
    zero = f"ZeRO-{zero_stage}" if zero_stage is not None else "no ZeRO"
    return f"sequence parallel {size} x data parallel {world_size // size}, {zero}"
