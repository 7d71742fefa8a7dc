"""Generation with the training template: what the model says to a list of prompts.

Used for the before/after comparison of a run, samples at each evaluation, and ``trainer/generate.py``. The
prompt is rendered by the tokenizer's chat template (the one training used and saved), and generation stops at
the end-of-turn token that training labelled.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.data.prompts import Prompt

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")


def default_generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, **overrides) -> GenerationConfig:
    """Greedy decoding unless asked otherwise; options left as None keep transformers' defaults.

    Giving a sampling option (temperature, top_p, top_k) without ``do_sample`` turns sampling on: otherwise
    transformers would decode greedily and the option would silently do nothing.
    """
    options = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    options.update({k: v for k, v in overrides.items() if v is not None})
    if "do_sample" not in options:
        options["do_sample"] = any(options.get(k) is not None for k in SAMPLING_OPTIONS)
    return GenerationConfig(**options)


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    generation_config: GenerationConfig,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(**generation_config.to_dict())
    if stop_token_ids:
        config.eos_token_id = stop_token_ids
    # The KV cache is right here: one unpacked sequence, so it cannot break the isolation packing relies on.
    config.use_cache = True
    replies = []
    try:
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                prompt.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"].to(device)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            replies.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return replies
