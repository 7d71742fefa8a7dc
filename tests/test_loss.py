"""The chunked causal-LM loss equals the model's own loss and gradients, and refuses the models where it would not.

Tiny random fp32 models (vocab 1000), in-process, well under a second each; the slow test at the end runs the
Trainer on 2 processes (DDP and DeepSpeed ZeRO-3 over gloo).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from trainer.args import FinetuneArguments
from trainer.lora import apply_lora
from trainer.loss import (
    CHUNKED_MIN_LOGITS,
    VERIFIED_MODEL_TYPES,
    causal_lm_loss,
    chunked_lm_loss_unsupported,
    should_use_chunked,
)

VOCAB = 1000
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             use_cache=False)  # as trainer.model.load_model: a cache would drop the packed rows' per-example mask
NEUTRAL = {"gemma2": {"final_logit_softcapping": None}, "cohere": {"logit_scale": 1.0}}
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    attention = "eager" if model_type == "gemma2" else "sdpa"  # Gemma 2 has no sdpa
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention)


def packed_batch(seed: int = 0) -> dict:
    """Two packed rows of 37 (examples of 13 + 11 + 13 and 20 + 17), prompts unlabelled, no attention mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 37), generator=g)
    labels, position_ids = input_ids.clone(), torch.zeros_like(input_ids)
    for row, lengths in enumerate(([13, 11, 13], [20, 17])):
        start = 0
        for length in lengths:
            position_ids[row, start : start + length] = torch.arange(length)
            labels[row, start : start + length // 2] = -100  # the prompt half of each example
            start += length
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def padded_batch(seed: int = 0) -> dict:
    """Three rows of 30, 21 and 9 tokens right-padded to 30, with an attention mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 30), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row, length in enumerate((30, 21, 9)):
        input_ids[row, length:], attention_mask[row, length:], labels[row, length:] = 0, 0, -100
        labels[row, : length // 3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BATCHES = {"packed": packed_batch, "padded": padded_batch}


def label_tokens(inputs: dict) -> int:
    return int((inputs["labels"][:, 1:] != -100).sum())


def run(model: torch.nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the gradient of every trainable parameter (None where none arrived)."""
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def own_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**inputs, **extra).loss


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm()) if a.norm() > 0 else float((a - b).norm())


def assert_matches(model: torch.nn.Module, inputs: dict, num_items_in_batch=None, *,
                   reference: torch.nn.Module | None = None, grad_rtol: float = GRAD_RTOL, **kwargs) -> None:
    """Chunked loss and gradients equal the model's own (or ``reference``'s) within LOSS_RTOL / GRAD_RTOL."""
    reference = model if reference is None else reference
    ref_loss, ref_grads = run(reference, lambda: own_loss(reference, inputs, num_items_in_batch))
    loss, grads = run(model, lambda: causal_lm_loss(model, inputs, num_items_in_batch, **kwargs))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative(ref_loss, loss) <= LOSS_RTOL, f"loss {float(loss)!r} vs the model's {float(ref_loss)!r}"
    assert ref_grads and set(grads) == set(ref_grads)
    missing = sorted(n for n in ref_grads if (ref_grads[n] is None) != (grads[n] is None))
    assert not missing, f"gradient present in one loss only: {missing}"
    worst = max((relative(ref_grads[n], grads[n]), n) for n in ref_grads if ref_grads[n] is not None)
    assert worst[0] <= grad_rtol, f"gradient of {worst[1]}: relative difference {worst[0]:.2e}"


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("num_items", ["none", "int", "tensor"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize(("model_type", "tied"), [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-tied"])
def test_full_fine_tuning_matches_the_models_own_loss(model_type, tied, batch, num_items, recompute):
    model = tiny(model_type, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    inputs = BATCHES[batch]()
    # As the Trainer passes it: label tokens of the whole accumulated global batch, more than this micro-batch's.
    n = {"none": None, "int": 3 * label_tokens(inputs), "tensor": torch.tensor(3 * label_tokens(inputs))}[num_items]
    assert_matches(model, inputs, n, chunk_tokens=7, recompute=recompute)  # 7 divides neither 39 nor 40 label tokens


@pytest.mark.parametrize("chunk_tokens", [1, 5, 38, 39, 10**6])
def test_any_chunk_size(chunk_tokens):
    inputs = packed_batch()
    assert label_tokens(inputs) == 39
    assert_matches(tiny(), inputs, 100, chunk_tokens=chunk_tokens)


def test_pre_shifted_labels_and_a_wrong_shift_is_caught():
    model, inputs = tiny(), packed_batch()
    shifted = {k: v for k, v in inputs.items() if k != "labels"}
    shifted["shift_labels"] = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    ref = own_loss(model, inputs, 50)
    assert relative(ref, causal_lm_loss(model, shifted, 50, chunk_tokens=7)) <= LOSS_RTOL
    unshifted = {**shifted, "shift_labels": inputs["labels"]}  # predicting the current token: must not pass
    assert relative(ref, causal_lm_loss(model, unshifted, 50, chunk_tokens=7)) > 1e-3


def test_the_tolerances_catch_a_small_change_of_the_head():
    model, inputs = tiny(), packed_batch()
    perturbed = tiny()
    with torch.no_grad():
        perturbed.lm_head.weight[int(inputs["labels"][0, -1])] *= 1 + 1e-3  # one row of the head, by 0.1%
    assert_matches(perturbed, inputs, 50, reference=perturbed, chunk_tokens=7)
    with pytest.raises(AssertionError, match="loss|gradient"):
        assert_matches(perturbed, inputs, 50, reference=model, chunk_tokens=7)


LORA_CASES = {
    "all-linear": dict(args=FinetuneArguments("lora", lora_dropout=0.0)),
    "head-trained-in-full": dict(args=FinetuneArguments("lora", lora_dropout=0.0), train_embeddings=True),
    "lora-on-the-head": dict(args=FinetuneArguments("lora", lora_dropout=0.0, lora_target="q_proj,v_proj,lm_head")),
    "tied-head-trained": dict(args=FinetuneArguments("lora", lora_dropout=0.0), train_embeddings=True, tied=True),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no-gc", "gc"])
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_matches_the_models_own_loss(case, gradient_checkpointing, recompute):
    spec = LORA_CASES[case]
    tied = spec.get("tied", False)
    base = tiny("qwen2" if tied else "llama", tie_word_embeddings=tied)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable()
    model = apply_lora(base, spec["args"], seed=0, gradient_checkpointing=gradient_checkpointing,
                       train_embeddings=spec.get("train_embeddings", False))
    model.train()
    assert chunked_lm_loss_unsupported(model) is None
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    assert head_trained == (case != "all-linear")
    with torch.no_grad():  # lora_B starts at zero: give it a value so that its gradient is not the trivial one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    assert_matches(model, packed_batch(), 90, chunk_tokens=7, recompute=recompute)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_of_the_decoder(use_reentrant):
    model = tiny()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    assert_matches(model, padded_batch(), None, chunk_tokens=7)


@pytest.mark.parametrize("model_type", sorted(VERIFIED_MODEL_TYPES))
def test_every_verified_family_matches(model_type):
    model = tiny(model_type, **NEUTRAL.get(model_type, {}))
    assert chunked_lm_loss_unsupported(model) is None
    assert_matches(model, packed_batch(), 60, chunk_tokens=7)


def test_the_head_bias_is_kept():
    model = tiny("phi")  # Phi-2's head has a bias: it is part of the head module, which is what is called
    assert model.lm_head.bias is not None
    with torch.no_grad():
        model.lm_head.bias.normal_()
    assert_matches(model, padded_batch(), 60, chunk_tokens=7)


@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
def test_a_batch_without_labels(recompute):
    model, inputs = tiny(), packed_batch()
    inputs["labels"][:] = -100
    # Given the global count (the Trainer's case: an empty filler row), the loss is 0 and every parameter gets a
    # zero gradient, as with the model's own loss (DDP waits for a gradient of every parameter).
    ref_loss, ref_grads = run(model, lambda: own_loss(model, inputs, 17))
    loss, grads = run(model, lambda: causal_lm_loss(model, inputs, 17, chunk_tokens=7, recompute=recompute))
    assert float(ref_loss) == float(loss) == 0.0
    assert all(g is not None and not g.any() for g in grads.values())
    assert all(r is not None and not r.any() for r in ref_grads.values())
    # Without it, both are the mean over no token: NaN.
    assert torch.isnan(own_loss(model, inputs)) and torch.isnan(causal_lm_loss(model, inputs, chunk_tokens=7))


def test_a_sharded_head_is_called_as_often_whatever_the_labels():
    """Under ZeRO-3 each head call gathers its weights collectively: ranks with more or fewer label tokens (or none)
    must call it equally often, or they deadlock (seen with 2 processes before the count followed positions)."""
    model = tiny()
    model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    counts = []
    for labelled in (True, False):
        inputs = packed_batch()
        if not labelled:
            inputs["labels"][:] = -100
        calls.clear()
        causal_lm_loss(model, inputs, 50, chunk_tokens=7).backward()
        counts.append(len(calls))
    positions = inputs["labels"].numel()  # 74 -> 11 chunks: 1 call of the model's own + 11 + 11 recomputed
    assert counts == [1 + 2 * -(-positions // 7)] * 2


def test_evaluation_under_no_grad():
    model, inputs = tiny().eval(), padded_batch()
    with torch.no_grad():
        ref, loss = own_loss(model, inputs), causal_lm_loss(model, inputs, chunk_tokens=7)
    assert loss.grad_fn is None and relative(ref, loss) <= LOSS_RTOL


@pytest.mark.parametrize(("model_type", "overrides", "reason"), [
    ("gemma2", {}, "final_logit_softcapping=30.0"),  # Gemma 2's default
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ("cohere", {}, "logit_scale=0.0625"),  # Cohere's default
    ("granite", {"logits_scaling": 8.0}, "logits_scaling=8.0"),
])
def test_models_that_change_the_logits_are_refused(model_type, overrides, reason):
    model = tiny(model_type, **overrides)
    assert reason in chunked_lm_loss_unsupported(model)
    assert not should_use_chunked(model, 10**6)
    with torch.no_grad():  # logits of a trained model's size (random ones are too small for softcapping to bite)
        model.get_output_embeddings().weight *= 100
    inputs = packed_batch()  # and the refusal is needed: the chunked loss would differ
    assert relative(own_loss(model, inputs), causal_lm_loss(model, inputs)) > 1e-2


def test_other_refusals():
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaModel

    # Mixtral's forward adds the router's load-balancing loss when output_router_logits is set
    assert "not among" in chunked_lm_loss_unsupported(tiny("mixtral", num_local_experts=2, num_experts_per_tok=1))
    assert "not a transformers *ForCausalLM" in chunked_lm_loss_unsupported(LlamaModel(tiny().config))
    prompt_tuned = get_peft_model(tiny(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert "virtual tokens" in chunked_lm_loss_unsupported(prompt_tuned)
    custom = tiny()
    custom.loss_function = lambda *a, **k: 0
    assert "its own loss" in chunked_lm_loss_unsupported(custom)


def test_auto_chunks_large_vocabularies_times_long_rows():
    qwen_vocab = tiny("qwen2", vocab_size=151_936, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                      num_key_value_heads=1, num_hidden_layers=1)
    assert CHUNKED_MIN_LOGITS == 2**27
    assert should_use_chunked(qwen_vocab, 1024) and not should_use_chunked(qwen_vocab, 512)
    tokens = -(-(2**27) // VOCAB)  # the fewest tokens whose logits reach the threshold
    assert should_use_chunked(tiny(), tokens) and not should_use_chunked(tiny(), tokens - 1)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora(tmp_path):
    from trainer.model import load_model

    tiny().save_pretrained(tmp_path)
    base = load_model(str(tmp_path), finetuning_type="qlora", attn_implementation="sdpa")
    model = apply_lora(base, FinetuneArguments("qlora", lora_dropout=0.0), seed=0, gradient_checkpointing=True)
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    assert chunked_lm_loss_unsupported(model) is None
    # The gradient reaching the decoder matches to fp32 rounding (~5e-7), but the 4-bit layers' backward runs in
    # bf16 (as in training) and flips roundings: small adapter gradients then differ by up to ~3e-4 (layer 0's
    # k_proj here; the same gradient fed to the model's own backward gives ours exactly). The loss still to fp32.
    assert_matches(model, packed_batch(), 90, chunk_tokens=7, grad_rtol=2e-3)
