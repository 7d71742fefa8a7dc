"""One set of generation settings everywhere, and replies that never end in half a character."""

from __future__ import annotations

from transformers import AutoTokenizer

from trainer.sampling import NO_REPEAT_NGRAM_SIZE, decode_whole_characters, default_generation_config


def test_a_reply_cut_inside_a_character_drops_the_partial_bytes(tiny_model_dir):
    """The tiny model's byte-level BPE spells 眠 with 2 tokens and 😀 with 4: every cut of the reply decodes to
    whole characters only, and the stop token and padding after it do not hide a cut."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "春眠😀龘"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # the tokenizer does cut
    for k in range(1, len(ids) + 1):
        reply = decode_whole_characters(tokenizer, ids[:k])
        assert "\ufffd" not in reply and text.startswith(reply), (k, reply)
    cut = tokenizer.encode("春眠", add_special_tokens=False)[:-1]
    padded = cut + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 3
    assert decode_whole_characters(tokenizer, padded) == "春"


def test_every_path_avoids_repeated_trigrams_unless_told_otherwise(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert NO_REPEAT_NGRAM_SIZE == 3
    assert default_generation_config(tokenizer, 8).no_repeat_ngram_size == 3
    assert default_generation_config(tokenizer, 8, no_repeat_ngram_size=None).no_repeat_ngram_size == 3
    assert default_generation_config(tokenizer, 8, no_repeat_ngram_size=0).no_repeat_ngram_size == 0
