"""LoRA / QLoRA set-up: targets, saved modules, added tokens, gradient checkpointing, 4-bit training on CPU.

Most checks build the adapter in-process on the tiny model (seconds); one QLoRA run goes through the real
entry point.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_sft
from trainer.args import FinetuneArguments
from trainer.lora import apply_lora
from trainer.model import add_special_tokens, load_model, load_tokenizer, resize_for_tokenizer

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def lora_targets(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def batch(tokenizer, text: str = "以下是一首唐詩的第一句話") -> dict:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}, {"role": "assistant", "content": text}],
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return {"input_ids": ids, "labels": ids.clone()}


def test_lora_targets_every_linear_layer_but_the_head_by_default(tiny_model_dir):
    model = apply_lora(load_model(str(tiny_model_dir), finetuning_type="lora"), FinetuneArguments("lora"),
                       seed=0, gradient_checkpointing=False)
    assert lora_targets(model) == LINEAR
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_target_modules_to_save_and_dora_options(tiny_model_dir):
    args = FinetuneArguments("lora", lora_target="q_proj, v_proj", modules_to_save="norm", use_dora=True, lora_r=4)
    model = apply_lora(load_model(str(tiny_model_dir), finetuning_type="lora"), args, seed=0,
                       gradient_checkpointing=False)
    assert lora_targets(model) == {"q_proj", "v_proj"}
    config = model.peft_config["default"]
    assert config.use_dora and config.r == 4 and "norm" in config.modules_to_save
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    assert any("norm.modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())


def test_same_seed_same_adapter(tiny_model_dir):
    def lora_a(seed: int) -> torch.Tensor:
        model = apply_lora(load_model(str(tiny_model_dir), finetuning_type="lora"), FinetuneArguments("lora"),
                           seed=seed, gradient_checkpointing=False)
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(lora_a(3), lora_a(3))
    assert not torch.equal(lora_a(3), lora_a(4))


def test_added_special_tokens_grow_the_vocabulary_and_train_the_embeddings(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    before = len(tokenizer)
    added = add_special_tokens(tokenizer, ["<|im_start|>", "<|im_end|>", "<PAD>"])
    assert added == ["<PAD>"]  # the tiny tokenizer has the ChatML tokens already
    assert len(tokenizer) == before + 1 and tokenizer.pad_token == "<PAD>"
    pad_id = tokenizer.convert_tokens_to_ids("<PAD>")
    assert tokenizer("a<PAD>b", add_special_tokens=False)["input_ids"].count(pad_id) == 1  # never split
    assert "<PAD>" not in tokenizer.decode(tokenizer("a<PAD>b")["input_ids"], skip_special_tokens=True)

    model = load_model(str(tiny_model_dir), finetuning_type="lora")
    assert resize_for_tokenizer(model, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) and rows % 64 == 0
    model = apply_lora(model, FinetuneArguments("lora"), seed=0, gradient_checkpointing=False, train_embeddings=True)
    embed = model.get_input_embeddings()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert any("embed_tokens" in n for n in trained)
    # The tiny model ties its head to the embedding: one shared trained copy, still tied after peft.
    assert model.get_output_embeddings().weight is embed.weight
    model(**batch(tokenizer)).loss.backward()
    assert embed.weight.grad is not None and embed.weight.grad[pad_id].abs().sum() > 0  # the head's softmax


def test_gradient_checkpointing_with_lora_reaches_the_first_layer(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = apply_lora(load_model(str(tiny_model_dir), finetuning_type="lora"), FinetuneArguments("lora"), seed=0,
                       gradient_checkpointing=True)
    model.activation_checkpointing_enable()  # what the Trainer does with --gradient_checkpointing
    model.train()
    assert model.base_model.model.model.gradient_checkpointing
    model(**batch(tokenizer)).loss.backward()
    first = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    assert first is not None and first.abs().sum() > 0


@needs_bnb
def test_qlora_loads_nf4_double_quant_and_trains_on_cpu(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), finetuning_type="qlora")
    quant = model.config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)

    model = apply_lora(model, FinetuneArguments("qlora"), seed=0, gradient_checkpointing=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(tokenizer)
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [t for k, t in saved.items() if "lora_B" in k]
    assert len(lora_b) == 4 * len(LINEAR) and all(t.abs().sum() > 0 for t in lora_b)


@pytest.mark.slow
@needs_bnb
def test_qlora_entry_point_trains_a_step_with_a_paged_optimizer(tiny_model_dir, tang_slice, tmp_path):
    out = tmp_path / "qlora"
    result = run_sft(
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tang_slice), "--output_dir", str(out),
        "--finetuning_type", "qlora", "--optim", "paged_adamw_32bit", "--gradient_checkpointing", "true",
        "--max_steps", "1", "--warmup_steps", "0", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
        "--global_batch_size", "2", "--max_length", "128", "--packing", "false",
        "--report_to", "none", "--sample_prompts", "none",
    )
    assert "qlora fine-tuning" in result.stderr
    saved = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in saved.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # one step moved every adapter
    assert not (out / "model.safetensors").exists()  # the adapter only, not the 4-bit base
