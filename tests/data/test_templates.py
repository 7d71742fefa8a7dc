"""Label masks: exactly the assistant tokens and the end-of-turn token after each answer carry labels.

Every record format is read from a real file, rendered with a built-in template and with tokenizer chat
templates (ChatML-style with an injected default system prompt), on a byte-level BPE tokenizer and a
SentencePiece-style one (a word-boundary marker prepended to every encode call), and the labelled runs are
decoded back.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.data.formats import read_conversations
from trainer.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    TemplateError,
    end_of_turn_token_id,
    resolve_template,
    tokenize_conversation,
)

# Qwen2-style: a default system prompt appears when the conversation has none.
QWEN_LIKE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

RECORDS = {
    "alpaca": [
        {"instruction": "寫一首詩", "input": "床前明月光", "output": "疑是地上霜。"},
        {"instruction": "And then?", "output": "Low the head.", "history": [["First?", "Bright moon."]],
         "system": "Be a poet."},
    ],
    "messages": [
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                      {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                      {"role": "assistant", "content": "2 then."}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Riddle me"}, {"from": "gpt", "value": "A shadow."}]},
        {"conversations": [{"from": "system", "value": "Riddler."}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "A1 yes"}, {"from": "human", "value": "Q2"},
                           {"from": "gpt", "value": "A2 no"}]},
    ],
    "alternating": [
        {"messages": ["What flies without wings?", "Time."]},
        {"messages": ["Born in despair?", "A flower.", "Which one?", "A sunflower, surely."]},
    ],
}


def _bpe_tokenizer(texts, *, normalizer=None, pre_tokenizer=None, decoder=None, specials=(), byte_fallback=False):
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=byte_fallback))
    if normalizer is not None:
        bpe.normalizer = normalizer
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizer, decoder
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", *specials]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _texts() -> list[str]:
    corpus = json.dumps(RECORDS, ensure_ascii=False) + " [INST] <<SYS>> <</SYS>> [/INST] system user assistant"
    return [corpus] * 20


@pytest.fixture(scope="module")
def byte_level(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """Llama-2 style: '▁' prepended to every encode call and replacing spaces, byte fallback for newlines."""
    return _bpe_tokenizer(
        _texts(),
        normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        pre_tokenizer=pre_tokenizers.Split("▁", behavior="merged_with_next"),
        decoder=decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)]),
        specials=[f"<0x{i:02X}>" for i in range(256)],
        byte_fallback=True,
    )


def _conversations(tmp_path, fmt):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[fmt]), encoding="utf-8")
    loaded = read_conversations(path)
    assert loaded.format == fmt
    return loaded.conversations


def _labelled_runs(tokenizer, ids, labels) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


EXPECTED_ANSWER = {
    "chatml": lambda answer, tok: answer + "<|im_end|>",
    "qwen_like": lambda answer, tok: answer + "<|im_end|>",
    "llama2": lambda answer, tok: " " + answer + " " + tok.eos_token,
}


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("template_name", ["chatml", "qwen_like", "llama2"])
@pytest.mark.parametrize("tokenizer_name", ["byte_level", "sentencepiece_like"])
def test_only_assistant_turns_and_end_of_turn_are_labelled(request, tmp_path, fmt, template_name, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = QWEN_LIKE if template_name == "qwen_like" else BUILTIN_TEMPLATES[template_name]
    for conversation in _conversations(tmp_path, fmt):
        (result,) = tokenize_conversation(tokenizer, template, conversation)  # prefix-consistent: one example
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        runs = _labelled_runs(tokenizer, result.input_ids, result.labels)
        expected = [EXPECTED_ANSWER[template_name](a, tokenizer) for a in answers]
        if tokenizer_name == "sentencepiece_like":  # its decoder strips the space of a leading '▁'
            runs, expected = [r.strip() for r in runs], [e.strip() for e in expected]
        assert runs == expected
        # The ids are those of the whole rendered text: what apply_chat_template gives at inference time.
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
        assert result.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not result.truncated


def test_user_and_system_text_is_never_labelled(byte_level):
    conversation = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "USERTEXT"},
                    {"role": "assistant", "content": "ANSWER"}]
    (result,) = tokenize_conversation(byte_level, BUILTIN_TEMPLATES["chatml"], conversation)
    unlabelled = byte_level.decode([t for t, lab in zip(result.input_ids, result.labels) if lab == IGNORE_INDEX])
    assert "SYSTEM" in unlabelled and "USERTEXT" in unlabelled and "ANSWER" not in unlabelled


def test_truncation_is_reported_and_keeps_the_prefix(byte_level):
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long answer " * 50}]
    (full,) = tokenize_conversation(byte_level, BUILTIN_TEMPLATES["chatml"], conversation)
    (cut,) = tokenize_conversation(byte_level, BUILTIN_TEMPLATES["chatml"], conversation, max_length=20)
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_end_of_turn_token(byte_level):
    assert byte_level.convert_ids_to_tokens(end_of_turn_token_id(byte_level, BUILTIN_TEMPLATES["chatml"])) \
        == "<|im_end|>"
    assert end_of_turn_token_id(byte_level, BUILTIN_TEMPLATES["llama2"]) == byte_level.eos_token_id


def test_auto_template_needs_one_on_the_tokenizer(sentencepiece_like, byte_level):
    assert resolve_template("auto", byte_level) == byte_level.chat_template
    with pytest.raises(TemplateError, match="--template"):
        resolve_template("auto", sentencepiece_like)
    with pytest.raises(TemplateError, match="unknown"):
        resolve_template("vicuna", byte_level)


def test_template_that_rewrites_history_trains_each_turn_in_its_own_context(byte_level):
    # Renders earlier assistant turns differently once a later turn exists (as some "thinking" templates do): each
    # turn becomes its own example, its history as the template renders it at that turn, only the reply trained.
    rewriting = (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}{{- '[old]<|im_end|>' -}}"
        "{%- else -%}{{- m['role'] + ':' + m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}"
    )
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    first, second = tokenize_conversation(byte_level, rewriting, conversation)
    assert byte_level.decode(first.input_ids) == "user:a<|im_end|>assistant:b<|im_end|>"
    assert byte_level.decode(second.input_ids) == "user:a<|im_end|>[old]<|im_end|>user:c<|im_end|>assistant:d<|im_end|>"
    assert _labelled_runs(byte_level, first.input_ids, first.labels) == ["b<|im_end|>"]
    assert _labelled_runs(byte_level, second.input_ids, second.labels) == ["d<|im_end|>"]
