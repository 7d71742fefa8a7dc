"""The causal-LM loss without the full logits: LM head and cross-entropy run over labelled tokens, chunk by chunk.

A packed row of 8,192 tokens against Qwen's 151,936-token vocabulary has 1.2e9 logits: 5 GB in fp32. The model's own
loss (``ForCausalLMLoss``) materialises them, upcasts them, keeps the log-softmax for the backward and then builds a
gradient of the same size, so the LM head, not the decoder, sets the peak memory of the step. Here

- the decoder runs through the caller's model (DDP / DeepSpeed / peft wrappers included), so every input reaches it
  exactly as in the model's own forward, and wrappers' forward-time work (DDP's reducer, ZeRO-3's hooks, this
  project's packing guard) still happens; the model is asked for no logits (``logits_to_keep``) and the decoder's
  last hidden state is taken from a forward hook;
- only positions that have a label are kept (prompt tokens of an SFT row never reach the head: memory *and* time);
- the head and the fp32 cross-entropy run on at most ``chunk_tokens`` of them at a time, forward and backward.

The sum is divided as ``ForCausalLMLoss`` divides: by ``num_items_in_batch`` (the Trainer's label-token count over the
accumulated global batch) when given, else by this batch's label tokens. Results equal the model's own loss and
gradients to fp32 rounding (see ``tests/test_loss.py``).

Two ways to keep one chunk's logits at a time:

- default: the chunk's gradients (w.r.t. its hidden states and the head's trainable parameters) are computed in the
  forward, right after its loss, and handed to autograd in the backward (``_LinearCrossEntropy``). Three head matmuls
  per token, as the unchunked loss. The head is still called as a module, so a bias, a LoRA adapter or a
  ``modules_to_save`` copy on it are handled by the module itself.
- ``recompute``: every chunk runs under ``torch.utils.checkpoint`` and is recomputed in the backward (one more head
  matmul). Used when the head's weights are sharded (DeepSpeed ZeRO-3, FSDP2): there, only calling the head module
  makes them whole, in the backward too. Every rank then runs the same number of chunks, because each call of the
  head module gathers its weights collectively.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss

from trainer.data.templates import IGNORE_INDEX

# vocab x tokens of a micro-batch from which --loss_impl auto chunks: 2**27 logits are 0.5 GiB in fp32, and the
# unchunked loss holds about three such tensors at its peak (logits, log-softmax, their gradient; more in bf16, which
# adds the fp32 upcast). Below that the head is a small share of a step's memory and the model's own, well-trodden
# loss is kept. Examples: Qwen (151,936) from 884 tokens; Llama 3 (128,256) from 1,047; Llama 2 (32,000) from 4,195.
CHUNKED_MIN_LOGITS = 2**27

# Model types whose *ForCausalLM.forward was read (transformers 5.23) to be ``lm_head(decoder output)`` followed by
# ``ForCausalLMLoss``, apart from the config knobs below, and that tests/test_loss.py checks against the model's own
# loss. Any other type is refused: a forward that softcaps, scales or adds an auxiliary loss would be trained wrong.
VERIFIED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "cohere", "granite", "olmo2",
})

# Config knobs with which those forwards change the logits after the head, and the values that leave them alone.
LOGIT_KNOBS = {
    "final_logit_softcapping": (None, 0, 0.0),  # gemma2, gemma3_text: tanh softcapping of the logits
    "logit_scale": (None, 1, 1.0),  # cohere: logits * logit_scale (0.0625 by default)
    "logits_scaling": (None, 1, 1.0),  # granite: logits / logits_scaling
}


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside DDP / DeepSpeed / torch.compile / peft wrappers."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    return inner.get_base_model() if isinstance(inner, PeftModel) else inner


def chunked_lm_loss_unsupported(model: torch.nn.Module) -> str | None:
    """None when :func:`causal_lm_loss` equals this model's own loss; else why not, in a sentence.

    Checked once, when the loss implementation is chosen: :func:`causal_lm_loss` itself does not check again.
    A bias on the head is no reason: the head is called as a module, bias included.
    """
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if isinstance(inner, PeftModel) and inner.active_peft_config.is_prompt_learning:
        return f"{inner.active_peft_config.peft_type} adapters add virtual tokens in the model's forward"
    lm = causal_lm(inner)
    name = type(lm).__name__
    if not isinstance(lm, PreTrainedModel) or not name.endswith("ForCausalLM"):
        return f"{name} is not a transformers *ForCausalLM model"
    config = lm.config
    if config.model_type not in VERIFIED_MODEL_TYPES:
        return (f"model type {config.model_type!r} is not among those whose forward was checked to be the plain head + "
                f"ForCausalLMLoss ({', '.join(sorted(VERIFIED_MODEL_TYPES))})")
    for knob, neutral in LOGIT_KNOBS.items():
        value = getattr(config, knob, None)
        if value not in neutral:
            return f"{name} changes the logits after the head ({knob}={value})"
    if lm.get_output_embeddings() is None or lm.get_decoder() in (None, lm):
        return f"{name} has no separate decoder and output head"
    if lm.loss_function is not ForCausalLMLoss:
        return f"{name} uses its own loss function ({getattr(lm.loss_function, '__name__', lm.loss_function)})"
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return f"{name}.forward has no logits_to_keep (it would compute the full logits anyway)"
    return None


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted so that position t holds the target of position t (label t+1); the last position has none."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def should_use_chunked(model: torch.nn.Module, tokens_per_micro_batch: int) -> bool:
    """``--loss_impl auto``: chunk when the logits of a micro-batch reach ``CHUNKED_MIN_LOGITS`` and it is exact."""
    vocab = causal_lm(model).config.get_text_config().vocab_size  # the config: under ZeRO-3 weights are placeholders
    return vocab * tokens_per_micro_batch >= CHUNKED_MIN_LOGITS and chunked_lm_loss_unsupported(model) is None


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = 1024,
    recompute: bool | None = None,
) -> torch.Tensor:
    """``model(**inputs).loss`` (``ForCausalLMLoss``) without materialising the logits; returns the fp32 loss.

    ``model`` is what the Trainer passes to ``compute_loss`` (possibly DDP- or DeepSpeed-wrapped, possibly a
    ``PeftModel``); ``inputs`` the batch with ``labels`` (or pre-shifted ``shift_labels``). The loss is the sum of the
    cross-entropy over label tokens divided by ``num_items_in_batch``, or by this batch's label tokens when None
    (NaN when there are none, as the model's mean). ``recompute``: None picks the checkpointed chunks when the
    head's weights are sharded (ZeRO-3 / FSDP2) and trained, the gradients-in-the-forward chunks otherwise (a frozen
    sharded head, as under LoRA, is gathered for its forward calls and never needed again: its recompute in the
    backward would find it released).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    hidden = _decoder_output(model, lm, inputs)
    shift_labels = inputs.get("shift_labels")
    if shift_labels is None:
        if "labels" not in inputs:
            raise ValueError("causal_lm_loss needs labels (or shift_labels) in the inputs")
        shift_labels = next_token_labels(inputs["labels"])
    shift_labels = shift_labels.to(hidden.device)
    labelled = shift_labels != IGNORE_INDEX
    hidden, targets = hidden[labelled], shift_labels[labelled]  # (label tokens, hidden): the only ones the head sees

    sharded = _sharded(head)
    chunks = _chunk_count(len(targets), labelled.numel(), chunk_tokens, sharded, hidden.device)
    params = tuple(p for p in head.parameters() if p.requires_grad)
    if recompute is None:
        recompute = sharded and bool(params)  # a frozen head needs no weight gradient: nothing to recompute
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        with torch.no_grad():
            total = sum((_chunk_sum(head, h, y) for h, y in zip(hidden.tensor_split(chunks),
                                                                 targets.tensor_split(chunks))),
                        hidden.new_zeros((), dtype=torch.float32))
    elif recompute:
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, y in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
            total = total + checkpoint(_chunk_sum, head, h, y, use_reentrant=False)
    else:
        total = _LinearCrossEntropy.apply(hidden, targets, head, chunks, *params)

    if num_items_in_batch is None:
        return total / len(targets)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _decoder_output(model: torch.nn.Module, lm: PreTrainedModel, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden state, from a forward of the whole (wrapped) model that computes no logits."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    device = next(v.device for v in forward_inputs.values() if torch.is_tensor(v))
    handle = lm.get_decoder().register_forward_hook(keep)
    try:
        # An empty index tensor: no position is kept, so the head projects nothing (but still runs, on every rank).
        model(**forward_inputs, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder ran {len(captured)} times in one forward of {type(lm).__name__}")
    return captured[0]


def _sharded(head: torch.nn.Module) -> bool:
    """Whether the head's weights are whole only inside its module call (DeepSpeed ZeRO-3, FSDP2 DTensors)."""
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in head.parameters())


def _chunk_count(tokens: int, positions: int, chunk_tokens: int, sharded: bool, device: torch.device) -> int:
    """Chunks of at most ``chunk_tokens`` label tokens; with sharded weights, one count for all ranks.

    Every call of a sharded head gathers its weights with a collective, so ranks must make the same number of calls.
    That count follows the batch's positions, not its label tokens: with packed rows of a fixed length it is the same
    every step, which keeps DeepSpeed's recorded module order (and its prefetching) valid.
    """
    if not sharded:
        return max(1, math.ceil(tokens / chunk_tokens))
    count = torch.tensor(max(1, math.ceil(positions / chunk_tokens)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def _chunk_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk, upcast to fp32 before the softmax as ``ForCausalLMLoss`` does."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _chunk_loss_and_grads(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, need_hidden: bool,
                          params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One chunk's summed loss and its gradients w.r.t. ``hidden`` (if needed) and ``params``; its logits die here."""
    with torch.enable_grad():
        hidden = hidden.detach().requires_grad_(need_hidden)
        logits = head(hidden)
    loss, grad_logits = _cross_entropy_sum_and_grad(logits.detach(), targets)
    wrt = ([hidden] if need_hidden else []) + list(params)
    return loss, torch.autograd.grad(logits, wrt, grad_outputs=grad_logits.to(logits.dtype))


def _cross_entropy_sum_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits`` and its gradient (softmax - one-hot), in one fp32 buffer of logits.

    The same arithmetic as ``F.cross_entropy`` on ``logits.float()`` (log-sum-exp after subtracting the row maximum),
    done in place: fp32 logits are overwritten (the head's backward does not read its output), others upcast once as
    ``ForCausalLMLoss`` does. ``F.cross_entropy`` would hold the log-softmax and two gradient-sized tensors besides.
    """
    z = logits.float()
    target_logits = z.gather(1, targets[:, None])
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max).exp_()
    norm = z.sum(dim=1, keepdim=True)
    loss = (norm.log() + row_max - target_logits).sum()
    z.div_(norm).scatter_add_(1, targets[:, None], torch.full_like(target_logits, -1.0))
    return loss, z


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)``, one chunk's logits at a time, gradients computed in the forward.

    Per chunk: the head module's output, the loss and its gradient w.r.t. the logits computed in place in one fp32
    buffer (:func:`_cross_entropy_sum_and_grad`), then ``torch.autograd.grad`` through the head for the gradients
    w.r.t. the chunk's hidden states and the head's trainable parameters (``params``). So no logits outlive their
    chunk, and the backward only scales the stored gradients by the incoming one. Parameter gradients are summed in
    fp32 (at least) over the chunks and reach the parameters through autograd in the backward, once: DDP's and
    DeepSpeed's gradient hooks fire as usual.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, chunks, *params):
        need_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        start = 0
        for h, y in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
            loss, grads = _chunk_loss_and_grads(head, h, y, need_hidden, params)
            if need_hidden:
                grad_hidden[start : start + len(h)] = grads[0]
            for i, acc in enumerate(grad_params, start=int(need_hidden)):
                acc += grads[i]
            del grads  # before the next chunk's logits: one chunk's tensors alive at a time
            total += loss
            start += len(h)
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.used:
            raise RuntimeError("the chunked loss scales its stored gradients in place: backward runs once per forward")
        ctx.used = True
        grad_hidden, *grad_params = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total)
        grads = [g.mul_(grad_total).to(dtype) for g, dtype in zip(grad_params, ctx.param_dtypes)]
        return grad_hidden, None, None, None, *grads
