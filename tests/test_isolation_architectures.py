"""Packing isolation decided on the model, across architectures built from transformers' own configs.

``tests/data/architectures.json`` lists 33 decoder architectures (tiny random models: transformers' default config
of each ``model_type`` shrunk by the overrides given there), chosen from a survey of all 189 causal-LM types of
transformers 5.23 to cover the three outcomes of a packed row:

- ``position_ids``: position ids restarting at 0 isolate the examples (Llama, Qwen, Mistral, Gemma, GPT-2, ...);
- ``mask4d``: they do not (ALiBi, attention sinks, BERT-style decoders...) but a 4-D block-diagonal mask does;
- ``refused``: nothing does (state-space / recurrent / linear-attention layers, decoders without position ids):
  the run must stop with an error naming the architecture and the fix.

For every architecture that isolates, one SGD step on a packed row equals one on the same examples padded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.callbacks.isolation import PackingIsolationCallback
from trainer.data.packing import IGNORE_INDEX, PackedCollator, PaddedCollator, pack_examples
from trainer.isolation import IsolationError, check_isolation, probe_batch_makers, probe_examples

TABLE = json.loads((Path(__file__).parent / "data" / "architectures.json").read_text())
CASES = [pytest.param(entry, id=entry["model_type"]) for entry in TABLE]


def _model(entry: dict) -> torch.nn.Module:
    config = AutoConfig.for_model(entry["model_type"], **entry["overrides"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=entry["backends"][0])
    model.config.use_cache = False
    if hasattr(model, "set_default_language"):
        model.set_default_language("en_XX")
    return model.float()


def _decide(model, entry) -> tuple[str, PackedCollator]:
    """What a run decides: the callback on the model, with the run's collator."""
    collator = PackedCollator(pad_token_id=0)
    callback = PackingIsolationCallback(collator, packing=True, vocab_size=entry["overrides"].get("vocab_size", 256))
    callback.on_train_begin(None, None, None, model=model)
    return collator.mechanism, collator


def _train_examples(vocab: int) -> list[dict]:
    examples = probe_examples(vocab, seed=7)
    for example in examples:  # prompt half untrained; the first label is never a target (packing drops it too)
        half = len(example["input_ids"]) // 2
        example["labels"] = [IGNORE_INDEX] * half + example["input_ids"][half:]
    return examples


def _sgd_step(model, batch) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()  # dropout (and layer drop) off: both batches see the same network
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch, use_cache=False).loss.backward()
    optimizer.step()
    return model


@pytest.mark.parametrize("entry", CASES)
def test_the_check_decides_and_packed_training_equals_unpacked(entry):
    model = _model(entry)
    vocab = entry["overrides"].get("vocab_size", 256)
    if entry["expect"] == "refused":
        with pytest.raises(IsolationError) as caught:
            _decide(model, entry)
        message = str(caught.value)
        assert type(model).__name__ in message and entry["backends"][0] in message
        assert "--packing false" in message
        return
    mechanism, collator = _decide(model, entry)
    assert mechanism == entry["expect"]
    examples = _train_examples(vocab)
    packed = collator(pack_examples(examples, max_length=64))
    padded = PaddedCollator(pad_token_id=0)(examples)
    after_packed, after_padded = _sgd_step(model, packed), _sgd_step(model, padded)
    worst = max((a - b).abs().max().item() for a, b in zip(after_packed.parameters(), after_padded.parameters()))
    assert worst < 1e-5, f"{entry['model_type']}: packed and unpacked steps differ by {worst:.2e}"


def test_a_leak_is_measured_not_assumed():
    """Negative control: the same Llama with a 2-D all-ones mask forced into every packed batch is refused."""
    entry = TABLE[0]
    model = _model(entry)
    collator = PackedCollator(pad_token_id=0)

    def leaky(examples):
        batch = collator(pack_examples(examples, max_length=64))
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    with pytest.raises(IsolationError, match="leak from earlier examples"):
        check_isolation(model, {"position_ids": leaky}, 256)


def test_the_check_consumes_no_random_numbers():
    entry = TABLE[0]
    model = _model(entry).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_isolation(model, probe_batch_makers(PackedCollator(0), True, ["position_ids"]), 256)
    assert torch.equal(torch.rand(3), expected)  # resume stays exact: the run's random stream is untouched
    assert model.training  # and the model is left in the mode it was in
