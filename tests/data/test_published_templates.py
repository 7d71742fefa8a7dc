"""Every published chat template is trained as inference renders it.

The templates in ``tests/data/chat_templates/`` are the published ones of popular instruct models, byte for byte
(sources in its SOURCES.md). For each assistant turn ``i`` of multi-turn conversations, with and without a system
prompt, the oracle is the tokenizer's own ``apply_chat_template``:

    prompt = apply_chat_template(messages[:i], add_generation_prompt=True)
    reply  = apply_chat_template(messages[:i + 1])[len(prompt):]      (trailing whitespace not trained)

and exactly one training example must train turn ``i``: its text up to the trained span is ``prompt``, the trained
text is ``reply``, and nothing else in any example is trained. Where a template's prompt is not a prefix of its own
rendering of the turn, the expected reply is written out below with the reason. Token level: the ids are those of
tokenising the example text as ``apply_chat_template(..., tokenize=True)`` does, and the labelled tokens are exactly
the tokens of the trained span.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trainer.data.encode import ConversationEncoder
from trainer.data.templates import IGNORE_INDEX, ChatRenderer, TemplateError, end_of_turn_token_id

TEMPLATES = Path(__file__).parent / "chat_templates"

# name: (bos, eos, special tokens the template writes) -- from SOURCES.md
MODELS = {
    "qwen2_5": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "qwen3_rev2": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral_v0_3": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi4": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>", "<|im_sep|>"]),
    "deepseek_r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>"]),
    "deepseek_r1_distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>"]),
    "glm4": (None, "<|endoftext|>", ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]),
    "glm4_5": (None, "<|endoftext|>", ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]),
    "gpt_oss": ("<|startoftext|>", "<|return|>",
                ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|call|>"]),
    "smollm3": (None, "<|im_end|>", ["<|im_start|>"]),
    "lfm2_5": ("<|startoftext|>", "<|im_end|>", ["<|im_start|>"]),
}
# The template options each is checked with.
KWARGS = {"qwen3": [{}, {"enable_thinking": False}], "glm4_5": [{}, {"enable_thinking": False}],
          "smollm3": [{}, {"enable_thinking": False}]}

SYSTEM = "You are a terse assistant."
TURNS = [("What is 2+2?", "4."), ("And 3+3?", "6, surely."), ("Name a prime.", "7 is prime.")]
REASONING = ["add 2 and 2", "add 3 and 3", "seven has no divisors"]


def _conversation(turns: int, system: bool, reasoning: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for k, (question, answer) in enumerate(TURNS[:turns]):
        reply = {"role": "assistant", "content": answer}
        if reasoning == "inline":
            reply["content"] = f"<think>\n{REASONING[k]}\n</think>\n\n{answer}"
        elif reasoning == "field":
            reply["reasoning_content"] = REASONING[k]
        messages += [{"role": "user", "content": question}, reply]
    return messages


CONVERSATIONS = {
    "single": _conversation(1, False),
    "single+system": _conversation(1, True),
    "3 turns": _conversation(3, False),
    "3 turns+system": _conversation(3, True),
}
REASONING_CONVERSATIONS = {
    "3 turns, inline reasoning": _conversation(3, False, "inline"),
    "3 turns+system, reasoning_content": _conversation(3, True, "field"),
}
# Templates that keep reasoning in the reply they are trained on (with thinking left on).
KEEPS_REASONING = {"qwen3", "qwen3_rev2", "glm4_5", "gpt_oss", "deepseek_r1_distill"}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = [SYSTEM, *REASONING, "<think></think>\n", "analysis final user assistant system model"]
    texts += [f"{q} {a}" for q, a in TURNS]
    return texts * 20


def _tokenizer(name: str, corpus: list[str]) -> PreTrainedTokenizerFast:
    bos, eos, specials = MODELS[name]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=False)
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer


def _expected_reply(name: str, messages: list[dict], i: int, prompt: str, rendered: str, eos: str) -> str:
    """The reply inference needs after ``prompt``: the oracle's difference, or the documented exceptions."""
    content = messages[i]["content"]
    if name == "deepseek_r1_distill":
        # The prompt opens "<think>\n" and the template renders a turn without its reasoning: the model writes the
        # reasoning (minus the opener it was given), closes it, answers and ends the sentence.
        return content.removeprefix("<think>\n") + eos
    if name == "mistral_v0_3" and not rendered.startswith(prompt):
        # The system prompt sits in the last user message only while that message is last: the prompt has it,
        # the rendering of the turn does not. The reply is the turn as the template writes it.
        return " " + content.strip() + eos
    assert rendered.startswith(prompt), f"{name}: unexpected non-prefix rendering at turn {i}"
    reply = rendered[len(prompt):].rstrip()
    if name in ("glm4", "glm4_5"):  # no end-of-turn marker in the template: EOS is what teaches stopping
        reply += eos
    return reply


def _check(name: str, tokenizer, messages: list[dict], kwargs: dict) -> int:
    """Check every turn of one conversation; returns the number of examples."""
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template, kwargs)
    examples = renderer.examples(messages)
    trained = [(e, span) for e in examples for span in e.spans]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(trained) == len(turns), "every assistant turn trained exactly once"
    for (example, (start, end)), i in zip(trained, turns):
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False, **kwargs)
        rendered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kwargs)
        assert example.text[:start] == prompt, f"{name} turn {i}: context differs from the inference prompt"
        assert example.text[start:end] == _expected_reply(name, messages, i, prompt, rendered, tokenizer.eos_token)

    encoded = ConversationEncoder(tokenizer, tokenizer.chat_template, kwargs).encode([messages])
    offset = 0
    for example, length in zip(examples, encoded.lengths):
        ids = encoded.input_ids[offset : offset + length].tolist()
        labels = encoded.labels[offset : offset + length].tolist()
        offset += length
        assert ids == tokenizer(example.text, add_special_tokens=False)["input_ids"]
        trained_ids = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tokenizer.decode(trained_ids) == "".join(example.text[a:b] for a, b in example.spans)
    return len(examples)


CASES = [(name, kwargs) for name in MODELS for kwargs in KWARGS.get(name, [{}])]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{'-' + str(k) if k else ''}" for n, k in CASES])
def test_each_turn_is_trained_as_inference_renders_it(name, kwargs, corpus):
    tokenizer = _tokenizer(name, corpus)
    for label, messages in CONVERSATIONS.items():
        if name == "deepseek_r1_distill":  # its prompt opens a reasoning block: the data must have reasoning
            messages = _conversation(len(messages) // 2, messages[0]["role"] == "system", "inline")
        try:
            count = _check(name, tokenizer, messages, kwargs)
        except AssertionError as error:
            raise AssertionError(f"{name} {kwargs} {label}: {error}") from error
        if label == "3 turns" and name in ("qwen3", "qwen3_rev2", "gpt_oss", "glm4", "glm4_5",
                                            "deepseek_r1_distill"):
            assert count == 3, f"{name}: history re-rendered, so one example per turn"
        elif label == "3 turns" and not (name == "smollm3" and kwargs):
            assert count == 1, f"{name}: prefix-consistent, so one example for the conversation"


@pytest.mark.parametrize("name", sorted(KEEPS_REASONING))
def test_reasoning_is_trained_where_the_template_keeps_it(name, corpus):
    tokenizer = _tokenizer(name, corpus)
    for label, messages in REASONING_CONVERSATIONS.items():
        if name == "deepseek_r1_distill" and "reasoning_content" in label:
            with pytest.raises(TemplateError, match="never renders"):  # dropped by the template: said, not lost
                ChatRenderer(tokenizer, tokenizer.chat_template).examples(messages)
            continue
        _check(name, tokenizer, messages, {})
        for example in ChatRenderer(tokenizer, tokenizer.chat_template).examples(messages):
            trained = "".join(example.text[a:b] for a, b in example.spans)
            assert any(r in trained for r in REASONING), f"{name} {label}: reasoning not trained"


@pytest.mark.parametrize(("name", "kwargs"), [("qwen3", {"enable_thinking": False}), ("deepseek_r1", {}),
                                              ("glm4_5", {"enable_thinking": False})])
def test_reasoning_a_template_would_drop_is_an_error(name, kwargs, corpus):
    tokenizer = _tokenizer(name, corpus)
    with pytest.raises(TemplateError, match="reasoning"):
        ChatRenderer(tokenizer, tokenizer.chat_template, kwargs).examples(REASONING_CONVERSATIONS[
            "3 turns, inline reasoning"])


def test_a_forced_thinking_prompt_needs_reasoning_in_the_data(corpus):
    tokenizer = _tokenizer("deepseek_r1_distill", corpus)
    with pytest.raises(TemplateError, match="<think>"):
        ChatRenderer(tokenizer, tokenizer.chat_template).examples(CONVERSATIONS["single"])


@pytest.mark.parametrize(("name", "stop"), [("qwen3", "<|im_end|>"), ("llama3_1", "<|eot_id|>"),
                                            ("gemma3", "<end_of_turn>"), ("gpt_oss", "<|return|>"),
                                            ("glm4", "<|endoftext|>"), ("mistral_v0_3", "</s>")])
def test_generation_stops_at_the_trained_end_of_turn(name, stop, corpus):
    tokenizer = _tokenizer(name, corpus)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer, tokenizer.chat_template)) == stop


def test_generation_marks_are_used_and_checked_against_inference(corpus):
    # SmolLM3's marks also cover the assistant header (prompt at inference): tolerated, the header is not trained.
    # Marks around anything else than the reply are refused, never trained silently.
    for name in ("smollm3", "lfm2_5"):
        tokenizer = _tokenizer(name, corpus)
        assert ChatRenderer(tokenizer, tokenizer.chat_template).marks_generation
        _check(name, tokenizer, CONVERSATIONS["3 turns+system"], {})
    broken = "{% generation %}x{% endgeneration %}" + tokenizer.chat_template
    with pytest.raises(TemplateError, match="generation"):
        ChatRenderer(tokenizer, broken).examples(CONVERSATIONS["single"])
