"""Labels from token byte lengths are exactly the labels from the tokenizer's offsets, or the offsets are used.

The byte path (:mod:`trainer.data.token_bytes`) is what data preparation takes for byte-level BPE tokenizers; the
rule it must keep is :func:`trainer.data.templates.label_tokens` on the offsets the tokenizer reports. Texts mix
ASCII, CJK, emoji, whitespace runs and special tokens, spans start and end at random characters (inside multi-byte
characters' tokens, inside whitespace runs, on special tokens).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.data.encode import ConversationEncoder, _Rendered
from trainer.data.templates import IGNORE_INDEX, label_tokens
from trainer.data.token_bytes import TokenBytes, _is_byte_level

PIECES = ["Hello", " world", "，", "床前明月光", "疑是地上霜", " 🙂", "\n\n", "   ", "\t", "<|im_start|>", "<|im_end|>",
          "assistant\n", " 42", "3.14", "é", "ß", "naïve", "\r\n", " — ", "<s>", "</s>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _spans(text: str, rng: random.Random) -> tuple[tuple[int, int], ...]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randint(1, 3))))
    return tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a)


def _llama3_like(normalizer=None) -> PreTrainedTokenizerFast:
    """Llama-3 / Qwen2 style: a regex split, then byte-level without its own regex, specials added (Qwen2 adds an NFC
    normaliser)."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    if normalizer is not None:
        bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(LLAMA3_SPLIT, behavior="isolated"),  # type: ignore[arg-type]
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(1, 300), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["tiny_builtin", "llama3_like", "qwen2_like"])
def byte_level(request, tiny_model_dir) -> PreTrainedTokenizerFast:
    if request.param == "tiny_builtin":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    return _llama3_like(normalizers.NFC() if request.param == "qwen2_like" else None)


def _offset_labels(tokenizer, texts, spans) -> list[tuple[list[int], list[int]]]:
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        trained = label_tokens(offsets, text_spans)
        out.append((list(ids), [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]))
    return out


def _encoded(encoder: ConversationEncoder, texts, spans) -> list[tuple[list[int], list[int]]]:
    batch = encoder.tokenize(_Rendered(list(texts), list(spans), list(range(len(texts))), []))
    ends = np.cumsum(batch.lengths)
    return [(batch.input_ids[e - n:e].tolist(), batch.labels[e - n:e].tolist()) for n, e in zip(batch.lengths, ends)]


def test_byte_path_labels_are_the_offset_labels(byte_level):
    rng = random.Random(0)
    texts = _texts(7, 400)
    spans = [_spans(t, rng) for t in texts]
    encoder = ConversationEncoder(byte_level, "{{ '' }}")
    assert encoder._bytes is not None, "a byte-level BPE tokenizer must take the byte path"
    ids = [np.asarray(byte_level.encode(t, add_special_tokens=False)) for t in texts]
    assert encoder._bytes.spells(texts, ids).all()
    assert _encoded(encoder, texts, spans) == _offset_labels(byte_level, texts, spans)


def test_ids_that_do_not_spell_their_text_fall_back_to_the_offsets(byte_level):
    """An added token that swallows the spaces around it: its ids no longer spell the text byte for byte."""
    tokenizer = byte_level.__class__(tokenizer_object=Tokenizer.from_str(byte_level.backend_tokenizer.to_str()))
    tokenizer.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    texts = ["Hello   <mask>   world 床前", "no mask here", "a <mask>"]
    spans = [((0, 8),), ((3, 7),), ((1, 8),)]
    encoder = ConversationEncoder(tokenizer, "{{ '' }}")
    assert encoder._bytes is not None
    ids = [np.asarray(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert encoder._bytes.spells(texts, ids).tolist() == [False, True, False]
    assert _encoded(encoder, texts, spans) == _offset_labels(tokenizer, texts, spans)
    # Same number of bytes, other bytes: every byte is compared, not only the count.
    swapped = [np.asarray(tokenizer.encode(t, add_special_tokens=False)) for t in ["ab 床前", "ba 床前"]]
    assert encoder._bytes.spells(["ab 床前", "ab 床前"], swapped).tolist() == [True, False]


def test_tokenizers_that_are_not_byte_level_keep_the_offsets_path():
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(_texts(2, 100), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                                show_progress=False))
    assert TokenBytes.of(bpe) is None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    texts, spans = ["Hello world", "床前明月光 Hello"], [((6, 11),), ((0, 3),)]
    encoder = ConversationEncoder(tokenizer, "{{ '' }}")
    assert encoder._bytes is None
    assert _encoded(encoder, texts, spans) == _offset_labels(tokenizer, texts, spans)


def test_a_text_the_normal_form_changes_takes_the_offsets_path():
    """Qwen2's NFC turns a decomposed "é" into one character: its ids spell other bytes than the text."""
    tokenizer = _llama3_like(normalizers.NFC())
    texts = ["cafe\u0301 au lait", "café au lait"]
    spans = [((2, 8),), ((2, 7),)]
    encoder = ConversationEncoder(tokenizer, "{{ '' }}")
    assert encoder._bytes is not None
    ids = [np.asarray(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert encoder._bytes.spells(texts, ids).tolist() == [False, True]
    assert _encoded(encoder, texts, spans) == _offset_labels(tokenizer, texts, spans)


@pytest.mark.parametrize(("normalizer", "pre_tokenizer", "eligible"), [
    (None, {"type": "ByteLevel", "add_prefix_space": False}, True),  # GPT-2
    ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}, True),  # Qwen2
    ({"type": "Sequence", "normalizers": []}, {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}]},
     True),  # DeepSeek-V3
    (None, {"type": "ByteLevel", "add_prefix_space": True}, False),  # a space before every text
    ({"type": "Lowercase"}, {"type": "ByteLevel"}, False),
    ({"type": "Sequence", "normalizers": [{"type": "Prepend"}, {"type": "Replace"}]}, {"type": "Metaspace"}, False),
])
def test_which_tokenizer_descriptions_take_the_byte_path(normalizer, pre_tokenizer, eligible):
    config = {"normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "model": {"type": "BPE"}}
    assert _is_byte_level(config) is eligible
    assert _is_byte_level({**config, "model": {"type": "Unigram"}}) is False
