"""Packed == unpacked through the real entry point: one SGD step over the whole small data set gives the same
weights with and without packing (and padding-free), which also proves the loss is normalised by label tokens,
not by rows or examples."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_sft

pytestmark = pytest.mark.slow


def one_step(model, data, out, *extra: str) -> dict[str, torch.Tensor]:
    run_sft("--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--report_to", "none", "--sample_prompts", "none", "--max_samples", "24", "--max_length", "512",
            "--per_device_train_batch_size", "32", "--global_batch_size", "32", "--max_steps", "1",
            "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
            "--max_grad_norm", "0", "--save_strategy", "no", *extra)
    return load_file(out / "model.safetensors")


def test_one_step_is_the_same_packed_unpacked_and_padding_free(tiny_model_dir, tang_slice, tmp_path):
    initial = load_file(tiny_model_dir / "model.safetensors")
    padded = one_step(tiny_model_dir, tang_slice, tmp_path / "padded", "--packing", "false")
    packed = one_step(tiny_model_dir, tang_slice, tmp_path / "packed", "--packing", "true")
    flat = one_step(tiny_model_dir, tang_slice, tmp_path / "flat", "--packing", "false", "--padding_free", "true")
    step = max(float((padded[k] - initial[k]).norm() / initial[k].norm()) for k in padded)
    assert step > 1e-3, "the step did not move the weights: the comparison would prove nothing"
    for name, weight in padded.items():
        for other in (packed, flat):
            difference = float((weight - other[name]).norm() / weight.norm())
            assert difference < 1e-5, f"{name}: relative difference {difference:.2e}"
