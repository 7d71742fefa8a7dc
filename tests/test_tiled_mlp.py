"""``--tiled_mlp`` equals the untiled model (loss and every gradient, fp32), saves the MLP's activations, and refuses
architectures it was not checked on.

Tiny random fp32 models in-process (rows longer than the hidden size, so each MLP runs over several tiles); the last
test trains two DDP processes over gloo, where DeepSpeed's own ``TiledMLP`` would fire each weight's gradient hook
once per tile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.args import FinetuneArguments
from trainer.lora import apply_lora
from trainer.memory.tiled_mlp import TiledMLPError, apply_tiled_mlp, tile_count

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5
REPO = Path(__file__).resolve().parents[1]


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def batch(rows: int = 2, tokens: int = 75, seed: int = 0) -> dict:
    """Packed rows of 75 tokens (examples of 40 + 35, position ids restarting), prompt halves unlabelled: 5 tiles."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, tokens), generator=g)
    labels = input_ids.clone()
    position_ids = torch.cat([torch.arange(40), torch.arange(tokens - 40)]).repeat(rows, 1)
    labels[:, :20] = -100
    labels[:, 40:57] = -100
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm()) if a.norm() > 0 else float((a - b).norm())


def assert_same(reference: torch.nn.Module, tiled: torch.nn.Module, inputs: dict) -> None:
    ref_loss, ref_grads = loss_and_grads(reference, inputs)
    loss, grads = loss_and_grads(tiled, inputs)
    assert relative(ref_loss, loss) <= LOSS_RTOL, f"loss {float(loss)!r} vs untiled {float(ref_loss)!r}"
    assert ref_grads and set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    worst = max((relative(ref_grads[n], grads[n]), n) for n in ref_grads)
    assert worst[0] <= GRAD_RTOL, f"gradient of {worst[1]}: relative difference {worst[0]:.2e}"


def count_tiles(model: torch.nn.Module) -> list[int]:
    """Calls of each MLP's untiled forward, recorded by wrapping it (one per tile, forward and backward)."""
    calls = []
    for module in model.modules():
        if hasattr(module, "_untiled_forward"):
            inner = module._untiled_forward

            def counted(x, inner=inner):
                calls.append(x.shape[-2])
                return inner(x)
            module._untiled_forward = counted
    return calls


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_tiled_equals_untiled_full_fine_tuning(model_type):
    reference, tiled = tiny(model_type), tiny(model_type)
    assert apply_tiled_mlp(tiled) == 2
    calls = count_tiles(tiled)
    assert_same(reference, tiled, batch())
    # 75 tokens / hidden 16 -> 5 tiles of 15 tokens per MLP, run in the forward and again in the backward.
    assert calls == [15] * 5 * 2 * 2


def test_tiled_equals_untiled_with_lora_and_gradient_checkpointing():
    args = FinetuneArguments(finetuning_type="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    models = []
    for _ in range(2):
        model = tiny()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models.append(apply_lora(model, args, seed=0, gradient_checkpointing=True))
    reference, tiled = models
    apply_tiled_mlp(tiled)  # after LoRA: each tile runs the adapted projections
    calls = count_tiles(tiled)
    reference.train(), tiled.train()
    assert_same(reference, tiled, batch())
    # forward, the checkpoint's recompute, and the tiled backward: three MLP passes of 5 tiles, 2 layers.
    assert calls == [15] * 5 * 3 * 2
    lora = [n for n, p in tiled.named_parameters() if p.requires_grad and "mlp" in n]
    assert lora and all("lora_" in n for n in lora)


def test_tiled_mlp_before_lora_and_without_grad():
    reference, tiled = tiny(), tiny()
    apply_tiled_mlp(tiled)
    args = FinetuneArguments(finetuning_type="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    reference = apply_lora(reference, args, seed=0, gradient_checkpointing=False)
    tiled = apply_lora(tiled, args, seed=0, gradient_checkpointing=False)
    assert_same(reference, tiled, batch(rows=1, tokens=100))
    with torch.no_grad():  # evaluation: tiled too, no autograd function
        assert torch.allclose(reference(**batch()).logits, tiled(**batch()).logits, rtol=1e-5, atol=1e-6)


def test_the_tolerance_catches_a_wrong_tile():
    """A tiled MLP that drops one token's output in one tile must fail the comparison (the test can fail)."""
    reference, tiled = tiny(), tiny()
    apply_tiled_mlp(tiled)
    for module in tiled.modules():
        if hasattr(module, "_untiled_forward"):
            inner = module._untiled_forward

            def broken(x, inner=inner):
                out = inner(x)
                return torch.cat([out[..., :1, :] * 0, out[..., 1:, :]], dim=-2) if x.shape[-2] == 15 else out
            module._untiled_forward = broken
            break
    with pytest.raises(AssertionError):
        assert_same(reference, tiled, batch())


def test_tiling_keeps_less_for_the_backward():
    """What autograd keeps for the backward (bytes of saved tensors) falls: the MLP keeps only its input."""
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch(rows=1, tokens=512)).loss
        loss.backward()
        return total
    plain, tiled = tiny(intermediate_size=256), tiny(intermediate_size=256)
    apply_tiled_mlp(tiled)
    before, after = saved_bytes(plain), saved_bytes(tiled)
    assert after < 0.6 * before, (before, after)


def test_refuses_an_unchecked_architecture():
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(TiledMLPError, match=r"--tiled_mlp: model type 'gpt2' .* leave --tiled_mlp off"):
        apply_tiled_mlp(model)


def test_tile_count():
    assert tile_count(1, 16, False, torch.device("cpu")) == 1
    assert tile_count(16, 16, False, torch.device("cpu")) == 1
    assert tile_count(17, 16, False, torch.device("cpu")) == 2
    assert tile_count(16384, 896, False, torch.device("cpu")) == 19


def _ddp_worker(rank: int, port: int, tiled: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny()
    if tiled:
        apply_tiled_mlp(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = batch(rows=2)
    ddp(**{k: v[rank : rank + 1] for k, v in rows.items()}).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    torch.distributed.destroy_process_group()


def test_ddp_sees_each_gradient_once(tmp_path):
    """Two DDP processes with tiled MLPs: no 'ready only once' error, and the averaged gradients equal one process's
    gradients of the two rows (each row its own mean loss, averaged)."""
    out = tmp_path / "grads.pt"
    # In a fresh interpreter: spawned workers of the pytest process itself hung at start-up. Once in a whole-suite
    # run the fresh interpreter's pair hung too (not reproduced alone: ~30 s every time), so a hang gets one more
    # try on a new port before the test fails; a wrong gradient or an error fails at once.
    for attempt in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code = ("import torch; from tests.test_tiled_mlp import _ddp_worker; "
                f"torch.multiprocessing.spawn(_ddp_worker, args=({port}, True, {str(out)!r}), nprocs=2)")
        try:
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=150,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            break
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
    grads = torch.load(out)
    model = tiny()
    rows = batch(rows=2)
    loss = sum(model(**{k: v[r : r + 1] for k, v in rows.items()}).loss for r in range(2)) / 2
    loss.backward()
    worst = max(relative(p.grad, grads[n]) for n, p in model.named_parameters())
    assert worst <= GRAD_RTOL
