"""What --sequence_parallel_size refuses before any weight loads, each in one sentence naming the flag."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig

from trainer.args import parse_config
from trainer.sequence_parallel.layout import SequenceParallelError, check_launch, check_model, describe


def config(*flags: str, deepspeed: bool = True):
    cfg = parse_config(["--model_name_or_path", "builtin:tiny-llama", "--dataset", "tang-demo",
                        "--output_dir", "/tmp/unused", *flags])
    if deepspeed:
        cfg.training.deepspeed_plugin = object()  # as a DeepSpeed launch sets it
    return cfg


def refusal(call, *args) -> str:
    with pytest.raises(SequenceParallelError) as error:
        call(*args)
    message = str(error.value)
    assert "--sequence_parallel_size" in message
    return message


def test_a_launch_that_cannot_split_rows_is_refused():
    assert "does not divide the 3 launched process(es)" in refusal(
        check_launch, config("--sequence_parallel_size", "2"), 3)
    assert "launch with DeepSpeed" in refusal(
        check_launch, config("--sequence_parallel_size", "2", deepspeed=False), 2)
    assert "1 (off) or more" in refusal(check_launch, config("--sequence_parallel_size", "0"), 2)
    message = refusal(check_launch, config("--sequence_parallel_size", "2", "--packing", "true"), 2)
    assert "sequence parallelism" in message and "packing false" in message and "flash" in message
    assert "padding_free false" in refusal(
        check_launch, config("--sequence_parallel_size", "2", "--padding_free", "true"), 2)
    check_launch(config("--sequence_parallel_size", "2"), 4)  # 2 x 2: fine
    check_launch(config(deepspeed=False), 3)  # off: nothing to check


def test_models_whose_heads_ulysses_cannot_share_out_are_refused(tmp_path):
    def model(heads: int, kv_heads: int):
        path = tmp_path / f"m{heads}-{kv_heads}"
        config = LlamaConfig(hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv_heads)
        config.save_pretrained(path)
        return str(path)

    assert "must divide the model's 6 attention heads" in refusal(check_model, model(6, 6), "sdpa", 4)
    assert "the model's 3 key/value heads must divide one another" in refusal(check_model, model(12, 3), "sdpa", 2)
    assert "cannot wrap eager attention" in refusal(check_model, model(4, 2), "eager", 2)
    check_model(model(4, 2), "sdpa", 2)
    windowed = tmp_path / "mistral"
    MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, sliding_window=64).save_pretrained(
        windowed)
    assert "would drop the model's sliding window of 64 tokens" in refusal(
        check_model, str(windowed), "sdpa", 2, False, 128)
    check_model(str(windowed), "sdpa", 2, False, 64)  # rows no longer than the window: the mask changes nothing
    check_model(model(8, 2), "auto", 4)  # fewer key/value heads than ranks: replicated
    check_model(model(6, 6), "eager", 1)  # off


def test_the_layout_line():
    assert describe(2, 8, 3) == "sequence parallel 2 x data parallel 4, ZeRO-3"
