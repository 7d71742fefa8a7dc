"""Generation with the training template: what the model says to a list of prompts.

Used for the before/after samples of a run, ``--eval_generate``, ``trainer/generate.py`` and
``trainer/evaluate.py``, all with the settings of :func:`default_generation_config`: the same model and prompt give
the same reply, and the same score, in ``samples.md`` and in ``evaluate.py --compare base``. The prompt is rendered
by the tokenizer's chat template (the one training used and saved), and generation stops at the end-of-turn token
that training labelled.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.data.prompts import Prompt

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")
# Greedy with no repeated trigram, as the Tang notebook decodes: an untrained model otherwise loops on one token (and
# scores 0 on every metric). Every generation path uses it unless told otherwise (0 turns it off).
NO_REPEAT_NGRAM_SIZE = 3
# A UTF-8 character is at most 4 bytes: a reply cut inside one ends in at most 3 tokens of a partial character.
_MAX_PARTIAL_TOKENS = 3


def default_generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, **overrides) -> GenerationConfig:
    """Greedy decoding without a repeated trigram unless asked otherwise; other options left as None keep
    transformers' defaults.

    Giving a sampling option (temperature, top_p, top_k) without ``do_sample`` turns sampling on: otherwise
    transformers would decode greedily and the option would silently do nothing.
    """
    options = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    options.update({k: v for k, v in overrides.items() if v is not None})
    options.setdefault("no_repeat_ngram_size", NO_REPEAT_NGRAM_SIZE)
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
    batch_size: int = 16,
    synced_gpus: bool = False,
) -> list[str]:
    """The model's reply to each prompt, generated ``batch_size`` prompts at a time.

    Batches are left-padded (the attention mask hides the padding, and transformers derives position ids from it),
    and prompts of similar length go together to waste little padding; replies come back in the prompts' order.
    Each reply stops at the first stop token (the end-of-turn token training labelled). ``synced_gpus``: under
    ZeRO-3 every rank must keep running forwards until all ranks are done (parameters are gathered collectively).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(**generation_config.to_dict())
    if stop_token_ids:
        config.eos_token_id = stop_token_ids
    # The KV cache is right here: unpacked sequences, so it cannot break the isolation packing relies on.
    config.use_cache = True
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    # The template writes its own BOS where it wants one: tokenise as apply_chat_template(tokenize=True) does.
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    replies: list[str | None] = [None] * len(texts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            batch = tokenizer([texts[i] for i in chunk], add_special_tokens=False, padding=True,
                              return_tensors="pt").to(device)
            output = model.generate(**batch, generation_config=config, synced_gpus=synced_gpus)
            for row, i in enumerate(chunk):
                replies[i] = decode_whole_characters(tokenizer, output[row, batch["input_ids"].shape[1]:].tolist())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return replies


def decode_whole_characters(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The reply's text without special tokens, and without a character cut in half at its end.

    A byte-level tokenizer spells a CJK character with up to 4 byte tokens; a reply stopped by ``max_new_tokens``
    inside one decodes to a trailing U+FFFD. Those trailing tokens of a partial character are dropped (at most 3,
    the fewest that leave no U+FFFD at the end; the text cannot tell a partial character from a generated U+FFFD,
    which goes too). A U+FFFD that 3 tokens do not explain is left as it is.
    """
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:  # the stop token and the padding after it
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(_MAX_PARTIAL_TOKENS, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        shorter = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
        if not shorter.endswith("\ufffd"):
            text = shorter
            break
    return text.strip()
