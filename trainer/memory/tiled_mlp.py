"""``--tiled_mlp``: each decoder layer's MLP runs over tiles of the sequence, with DeepSpeed's ALST ``TiledMLP``.

Why: on a long row the MLP's intermediate activations (gate, up, their product: 3 x tokens x intermediate_size, about
8x the hidden state on Llama/Qwen shapes) are the largest tensors a layer holds, and its backward needs them all at
once. ``deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP`` runs the MLP under ``no_grad`` one tile of tokens at
a time, keeps only the MLP's input, and in the backward recomputes tile by tile: the intermediates of one tile exist at
a time, for one more MLP forward per step. The MLP treats every token alone, so the result equals the untiled MLP to
fp32 rounding (``tests/test_tiled_mlp.py``); with and without sequence parallelism, LoRA and gradient checkpointing.

Tiles: ``ceil(tokens / hidden_size)`` as DeepSpeed's own example (a tile's intermediates then weigh about as much as
the MLP's weights); under ZeRO-3, where each tile's module call gathers the weights collectively, all ranks take the
largest count.

What DeepSpeed's function does not do, done here:

- It accumulates the weights' gradients tile by tile with nested ``torch.autograd.backward`` calls and tells only
  DeepSpeed's ZeRO (``ds_grad_is_ready``) to wait for the last one; torch DDP's reducer would see each weight ready
  once per tile. Its function is used where the weights are ZeRO-3 partitions (they exist whole only inside each
  module call); everywhere else (one process, DDP, ZeRO-1/2) :class:`_TiledMLPGrads`, the same tiling, returns the
  summed weight gradients through autograd once, so every gradient hook fires once.
- It is applied by patching the model class's ``forward`` (DeepSpeed's docstring); here only the instances of this
  model get a tiled forward, so other models in the process (generation, a reference model in tests) are untouched.
"""

from __future__ import annotations

import logging
import math
import types

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import UserError

logger = logging.getLogger(__name__)

# Model types whose decoder layers' ``mlp`` was read (transformers 5.23) to be a dense, token-wise MLP without
# dropout: gate/up/down projections (Llama family) or fc1/fc2 (Phi). Sparse mixture-of-experts blocks also act per
# token but return router logits and differ per architecture: refused until checked.
TILEABLE_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "cohere", "granite",
    "olmo2",
})


class TiledMLPError(UserError, ValueError):
    pass


def tile_count(tokens: int, hidden_size: int, sharded: bool, device: torch.device) -> int:
    """Tiles for ``tokens`` rows of an MLP input: one per ``hidden_size`` tokens; the same on every rank if sharded."""
    count = max(1, math.ceil(tokens / hidden_size))
    if sharded and dist.is_available() and dist.is_initialized():
        agreed = torch.tensor(count, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        count = int(agreed)
    return count


def apply_tiled_mlp(model: nn.Module) -> int:
    """Give every decoder layer's MLP of ``model`` (a transformers causal LM, possibly a ``PeftModel``) a tiled
    forward; returns how many MLPs. Call after LoRA is applied or before: the tiled forward calls the MLP's own
    submodules, adapters included. Raises :class:`TiledMLPError` for an architecture not known to have a dense MLP.
    """
    config = getattr(model, "config", None)
    model_type = getattr(getattr(config, "get_text_config", lambda: config)(), "model_type", None)
    if model_type not in TILEABLE_MODEL_TYPES:
        raise TiledMLPError(
            f"--tiled_mlp: model type {model_type!r} is not among those whose MLP was checked to be dense and "
            f"token-wise ({', '.join(sorted(TILEABLE_MODEL_TYPES))}); leave --tiled_mlp off for this model")
    mlps = [module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "mlp" and type(module).__name__.endswith("MLP")]
    if not mlps:
        raise TiledMLPError(f"--tiled_mlp: found no decoder MLP in {type(model).__name__}; leave --tiled_mlp off")
    for mlp in mlps:
        if getattr(mlp, "_untiled_forward", None) is None:
            mlp._untiled_forward = mlp.forward  # the bound class forward: what each tile runs
            mlp.forward = types.MethodType(_tiled_forward, mlp)
    logger.info("tiled MLP: %d MLPs run over tiles of hidden-size tokens (DeepSpeed ALST TiledMLP)", len(mlps))
    return len(mlps)


def _run_untiled(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp._untiled_forward(x)


def _tiled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(self.parameters())
    zero = any(hasattr(p, "ds_id") for p in params)  # DeepSpeed ZeRO-3 partitioned weights
    tiles = tile_count(x.shape[-2], x.shape[-1], zero, x.device)  # tiles of the sequence, as DeepSpeed's example
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        if tiles == 1:
            return _run_untiled(self, x)
        return torch.cat([_run_untiled(self, t) for t in torch.chunk(x, tiles, dim=-2)], dim=-2)
    if zero:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        return TiledMLP.apply(_run_untiled, self, x, tiles, params)
    trainable = [p for p in params if p.requires_grad]
    return _TiledMLPGrads.apply(self, x, tiles, *trainable)


class _TiledMLPGrads(torch.autograd.Function):
    """DeepSpeed's ``TiledMLP`` tiling with the weight gradients summed over tiles and returned through autograd once.

    Forward: the MLP under ``no_grad`` tile by tile, keeping only ``x``. Backward: per tile, the MLP again with grad
    enabled and ``torch.autograd.grad`` w.r.t. the tile's input and the trainable weights; the weights' gradients
    are summed (in fp32 at least) and returned, so DDP's and any other gradient hooks see each weight once.
    """

    @staticmethod
    def forward(ctx, mlp, x, tiles, *params):
        ctx.mlp, ctx.tiles = mlp, tiles
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([_run_untiled(mlp, t) for t in torch.chunk(x, tiles, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        params = [p for p, needed in zip(_trainable(ctx.mlp), ctx.needs_input_grad[3:]) if needed]
        need_x = ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
        start = 0
        for x_tile, g_tile in zip(torch.chunk(x, ctx.tiles, dim=-2), torch.chunk(grad_output, ctx.tiles, dim=-2)):
            x_tile = x_tile.detach().requires_grad_(need_x)
            with torch.enable_grad():
                out = _run_untiled(ctx.mlp, x_tile)
            wrt = ([x_tile] if need_x else []) + params
            grads = torch.autograd.grad(out, wrt, g_tile, allow_unused=True)
            if need_x:
                grad_x.narrow(-2, start, x_tile.shape[-2]).copy_(grads[0])
            for total, g in zip(sums, grads[int(need_x):]):
                if g is not None:
                    total += g
            start += x_tile.shape[-2]
        param_grads = iter(total.to(p.dtype) for total, p in zip(sums, params))
        return (None, grad_x, None, *(next(param_grads) if needed else None for needed in ctx.needs_input_grad[3:]))


def _trainable(mlp: nn.Module) -> list[torch.Tensor]:
    return [p for p in mlp.parameters() if p.requires_grad]
