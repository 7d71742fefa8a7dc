"""The HF Trainer plus two things it lacks: full global batches on any world size, and useful-token accounting.

Batches come from :class:`~trainer.batch.GlobalBatchSampler`, so one process and N processes take the same
optimizer steps (see its docstring for the last, partial global batch where the stock samplers differ).

Throughput is measured where the batches are (``compute_loss``) and reported where the logs are made, so the
figures land in ``trainer_state.json``'s log history and every tracker alike. One all-reduce per log line is the
only synchronisation it adds.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from trainer.batch import GlobalBatchSampler, with_empty_row
from trainer.callbacks.checkpoints import CheckpointCallback
from trainer.callbacks.nonfinite import NonFiniteGuard
from trainer.callbacks.run_loss import LogEveryCheckpointAndLastStep, run_train_loss
from trainer.checkpoints import remove_folder
from trainer.console.tied_keys import without_tied_keys
from trainer.data.templates import IGNORE_INDEX
from trainer.errors import UserError
from trainer.eval_loss import TokenWeightedEvalLoss
from trainer.file_modes import readable_weights
from trainer.loss import CHUNKED_MIN_LOGITS, causal_lm_loss, chunked_lm_loss_unsupported
from trainer.run.decide import barrier
from trainer.run.disk import disk_full_as_error
from trainer.run_config import training_args_without_secrets
from trainer.sequence_parallel.attention import SequenceParallel, sequence_parallel_step
from trainer.sequence_parallel.sampler import SequenceParallelSampler

logger = logging.getLogger("sft")


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory of this process when on CUDA, else its peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class _SamplerEpoch(TrainerCallback):
    """Tell the trainer's sampler which epoch starts, from the step count.

    The Trainer's own ``set_epoch`` does not reach a sampler behind accelerate's shard and skip wrappers, which is
    what a multi-process run resumed in the middle of a later epoch has; without this it would replay epoch 0's order.
    """

    def __init__(self, trainer: SFTTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer.train_sampler
        if sampler is not None:
            sampler.set_epoch(state.global_step // (len(sampler) // sampler.global_batch_size))


class LossSetupError(UserError, ValueError):
    """``--loss_impl`` cannot be honoured for this model or with these options."""


class SFTTrainer(Trainer):
    """The Trainer with full global batches, token accounting and ``--loss_impl`` (hf | chunked | auto)."""

    def __init__(self, *args, loss_impl: str = "hf", tokens_per_micro_batch: int | None = None,
                 sequence_parallel: SequenceParallel | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sequence_parallel = sequence_parallel  # --sequence_parallel_size > 1: training steps on row shards
        self._counts: torch.Tensor | None = None  # [tokens, label tokens] since the last log, on the device
        self._since: float | None = None  # set by the first training batch: model setup is not training time
        self.train_sampler: GlobalBatchSampler | None = None
        self._loader_with_empty_row = None  # the training loader's data set: the caller's rows + the empty row
        self.add_callback(_SamplerEpoch(self))
        self.add_callback(LogEveryCheckpointAndLastStep())  # after the callbacks that request saves and stops
        self.eval_loss = TokenWeightedEvalLoss()
        self.nonfinite = NonFiniteGuard()  # last: it sees the save/stop requests of every other callback
        self.add_callback(self.nonfinite)
        self.chunked_loss = self._decide_loss(loss_impl, tokens_per_micro_batch)

    def _decide_loss(self, loss_impl: str, tokens_per_micro_batch: int | None) -> bool:
        """Whether the run uses the chunked loss, decided once: every rank must take the same path at every
        micro-batch (under ZeRO-3 each call of the LM head gathers its weights collectively)."""
        if loss_impl == "hf":
            return False
        args = self.args
        reason = chunked_lm_loss_unsupported(self.model)
        if args.use_liger_kernel:
            reason = "--use_liger_kernel brings its own fused linear + cross-entropy"
        elif args.label_smoothing_factor > 0 or self.compute_loss_func is not None:
            reason = "the loss is smoothed or user-defined (--label_smoothing_factor / compute_loss_func)"
        elif args.n_gpu > 1:
            reason = "single-process multi-GPU (DataParallel) runs the model once per replica"
        if reason and loss_impl == "chunked":
            raise LossSetupError(f"--loss_impl chunked: {reason}; use --loss_impl hf (or auto)")
        vocab = self.model.config.get_text_config().vocab_size
        tokens = tokens_per_micro_batch or 0
        chunked = reason is None and (loss_impl == "chunked" or vocab * tokens >= CHUNKED_MIN_LOGITS)
        why = reason or (f"vocabulary {vocab:,} x up to {tokens:,} tokens per micro-batch"
                         + ("" if chunked or loss_impl == "chunked" else f" < {CHUNKED_MIN_LOGITS:,} logits"))
        logger.info("loss: %s (%s)", "chunked LM head + cross-entropy" if chunked else "the model's own", why)
        return chunked

    def get_train_dataloader(self):
        # The sampler completes the last global batch with an empty row appended for the data loader only: the
        # data set the caller passed keeps its rows (and the Trainer's "Num examples" its count).
        dataset = self.train_dataset
        if not (self.args.train_sampling_strategy == "random" and isinstance(dataset, datasets.Dataset)
                and len(dataset) > 0):
            self.train_sampler = None
            return super().get_train_dataloader()
        self.train_sampler = self._global_batch_sampler(len(dataset))
        self.train_dataset = with_empty_row(dataset)
        try:
            loader = super().get_train_dataloader()  # takes the sampler from _get_train_sampler
        finally:
            self.train_dataset = dataset
        self._loader_with_empty_row = loader.dataset
        return loader

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def num_examples(self, dataloader) -> int:
        if self.train_sampler is not None and getattr(dataloader, "dataset", None) is self._loader_with_empty_row:
            return self.train_sampler.num_rows  # the empty row is no example
        return super().num_examples(dataloader)

    def _global_batch_sampler(self, rows: int) -> GlobalBatchSampler:
        args = self.args
        copies = self.sequence_parallel.size if self.sequence_parallel is not None else 1
        global_batch = args.per_device_train_batch_size * (args.world_size // copies) * args.gradient_accumulation_steps
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = GlobalBatchSampler(rows, global_batch, seed, drop_last=args.dataloader_drop_last)
        if rows % global_batch:
            logger.info("each epoch: %d rows in %d steps of %d; the last step %s", rows, len(sampler) // global_batch,
                        global_batch, f"has {rows % global_batch} rows (+ {sampler.empty_rows} empty ones)"
                        if sampler.empty_rows else f"is dropped ({rows % global_batch} rows, --dataloader_drop_last)")
        if copies > 1:  # every rank of a sequence-parallel group takes the same rows
            return SequenceParallelSampler(sampler, args.per_device_train_batch_size, copies)
        return sampler

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sequence_parallel is not None:
            loss = sequence_parallel_step(self.sequence_parallel, super().training_step, model, inputs,
                                          num_items_in_batch)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.observe_loss(loss, self.state.global_step + 1)
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save, into a folder of its own, without its rotation when ours runs after the marker.

        A folder of the same name (an unmarked leftover of a kill, or a checkpoint of a later step than the one
        resumed) is removed first: files of another save must not mix into this one, nor its old marker vouch for
        it. The Trainer's rotation deletes old checkpoints before this one is marked complete; with
        :class:`~trainer.callbacks.checkpoints.CheckpointCallback` present it rotates after the marker instead.
        """
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            logger.warning("%s exists from an earlier save that this run does not continue: replaced", folder)
            remove_folder(folder)
        barrier()
        ours = any(isinstance(cb, CheckpointCallback) for cb in self.callback_handler.callbacks)
        limit = self.args.save_total_limit
        if ours:
            self.args.save_total_limit = None
        try:
            with disk_full_as_error(folder, f"checkpoint-{self.state.global_step}"):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with disk_full_as_error(output_dir or self.args.output_dir, "the model"):
            super().save_model(output_dir, _internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count_tokens(inputs)
        # Evaluation asks for outputs; without compute_metrics it uses only the loss, so it is chunked too.
        if self.chunked_loss and (not return_outputs or self.compute_metrics is None):
            # As the Trainer's own loss: divided by the accumulated global label-token count when the model takes
            # it, and scaled back by the number of processes that the gradient all-reduce averages over.
            counted = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            loss = causal_lm_loss(model, inputs, num_items_in_batch if counted else None)
            if counted and self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if not model.training:
                self.eval_loss.add(None, None, self.accelerator.gather_for_metrics)  # no logits to count with
            return (loss, {"loss": loss}) if return_outputs else loss
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training and return_outputs:
            outputs = result[1]
            logits = outputs.get("logits") if isinstance(outputs, dict) else None
            self.eval_loss.add(logits, inputs.get("labels"), self.accelerator.gather_for_metrics)
        return result

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop, with ``<prefix>_loss`` token-weighted over all ranks (:mod:`trainer.eval_loss`)."""
        self.eval_loss.start()
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            loss = self.eval_loss.finish()
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if loss is not None and f"{prefix}_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = loss
        return output

    def _count_tokens(self, inputs) -> None:
        if self._since is None:
            self._since = time.perf_counter()
        # Accumulated as device tensors: reading them back every micro-batch would stall the GPU.
        mask = inputs.get("attention_mask")
        real = mask.sum() if mask is not None and mask.dim() == 2 else inputs["input_ids"].numel()
        labelled = (inputs["labels"] != IGNORE_INDEX).sum()
        step = torch.stack([torch.as_tensor(real, device=labelled.device), labelled]).to(torch.float64)
        self._counts = step if self._counts is None else self._counts + step

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Every saved model and checkpoint: training_args.bin pickles the arguments, so it gets them without secrets
        # (hub_token); safetensors writes weights 0600 whatever the umask, so they get the umask's mode.
        args, self.args = self.args, training_args_without_secrets(self.args)
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args = args
        if args.should_save:
            readable_weights(output_dir or args.output_dir)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        return result._replace(training_loss=result.metrics.get("train_loss", result.training_loss))

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied head is stored once (as the embedding): listed as missing on every correct resume, it is no warning.
        super()._issue_warnings_after_load(without_tied_keys(self.model, load_result))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line (all ranks log together, so the all-reduce is safe)
            logs.update(self._throughput())
        if "train_loss" in logs:  # the summary: over every step of the run, on any number of processes
            train_loss = run_train_loss(self.state.log_history)
            if train_loss is not None:
                logs["train_loss"] = train_loss  # the Trainer's metrics dict itself: train_results.json gets it too
        super().log(logs, start_time)
