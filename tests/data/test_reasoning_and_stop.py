"""Plain answers on reasoning templates (``--missing_reasoning``), and nothing trained after a reply's stop token."""

from __future__ import annotations

import pytest

from tests.data.test_published_templates import TURNS, _conversation, _tokenizer
from trainer.data.encode import ConversationEncoder
from trainer.data.templates import IGNORE_INDEX, ChatRenderer, TemplateError


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return ["<think></think> answer user assistant What is 2+2? 4. 6, surely. 7 is prime."] * 20


PLAIN = _conversation(3, system=True)


@pytest.mark.parametrize("name", ["deepseek_r1_distill", "qwq"])
def test_a_plain_answer_on_a_thinking_prompt_is_refused_naming_the_option(name, corpus):
    tokenizer = _tokenizer(name, corpus) if name != "qwq" else _qwq(corpus)
    with pytest.raises(TemplateError, match="--missing_reasoning empty"):
        ChatRenderer(tokenizer, tokenizer.chat_template).examples(PLAIN)


@pytest.mark.parametrize("name", ["deepseek_r1_distill", "qwq"])
def test_missing_reasoning_empty_trains_the_empty_block_then_the_answer(name, corpus):
    tokenizer = _tokenizer(name, corpus) if name != "qwq" else _qwq(corpus)
    examples = ChatRenderer(tokenizer, tokenizer.chat_template, missing_reasoning="empty").examples(PLAIN)
    turns = [i for i, m in enumerate(PLAIN) if m["role"] == "assistant"]
    assert len(examples) == len(turns)  # the template drops reasoning from history: one example per turn
    for example, i, (_, answer) in zip(examples, turns, TURNS):
        (start, end), = example.spans
        prompt = tokenizer.apply_chat_template(PLAIN[:i], add_generation_prompt=True, tokenize=False)
        assert example.text[:start] == prompt and prompt.endswith("<think>\n")  # the context inference gives
        # The prompt opened the block; the model closes it empty, answers, and stops.
        assert example.text[start:end] == "\n</think>\n\n" + answer + tokenizer.eos_token
        # Checked against the template's own rendering: with that block the turn renders as the answer.
        with_block = [*PLAIN[:i], {"role": "assistant", "content": "<think>\n\n</think>\n\n" + answer}]
        assert answer + tokenizer.eos_token in tokenizer.apply_chat_template(with_block, tokenize=False)
    # Reasoning in the data is trained as it is, whatever the option.
    reasoned = [*PLAIN[:2], {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4."}]
    (example,) = ChatRenderer(tokenizer, tokenizer.chat_template, missing_reasoning="empty").examples(reasoned)
    (start, end), = example.spans
    assert example.text[start:end] == "add them\n</think>\n\n4." + tokenizer.eos_token


def test_a_thinking_prompt_with_no_empty_form_is_refused(corpus):
    tokenizer = _tokenizer("qwen2_5", corpus)
    # The prompt opens a block inside the reasoning block: there is no empty form of both to train.
    prefilled = tokenizer.chat_template.replace("'<|im_start|>assistant\\n'",
                                                "'<|im_start|>assistant\\n<think>\\n<plan>\\n'")
    assert prefilled != tokenizer.chat_template
    with pytest.raises(TemplateError, match="no empty form"):
        ChatRenderer(tokenizer, prefilled, missing_reasoning="empty").examples(PLAIN[:3])


def _qwq(corpus):
    tokenizer = _tokenizer("qwen2_5", corpus)
    tokenizer.chat_template = (
        __import__("pathlib").Path(__file__).parent / "chat_templates" / "qwq.jinja").read_text(encoding="utf-8")
    return tokenizer


# A template in the pattern of some recent published ones: every turn ends with its stop token, then the header of
# the next turn is written whether a next turn comes or not.
NEXT_HEADER = (
    "{%- for m in messages -%}"
    "{{- m['content'] + ('<|im_end|>\\n<|im_start|>' + ('user' if m['role'] == 'assistant' else 'assistant') + '\\n'"
    " if m['role'] != 'system' else '<|im_end|>\\n<|im_start|>user\\n') -}}"
    "{%- endfor -%}"
)


def test_nothing_after_the_stop_token_is_trained(corpus):
    tokenizer = _tokenizer("qwen2_5", corpus)
    messages = _conversation(2, system=True)
    renderer = ChatRenderer(tokenizer, NEXT_HEADER)
    (example,) = renderer.examples(messages)
    trained = [example.text[a:b] for a, b in example.spans]
    assert trained == ["4.<|im_end|>", "6, surely.<|im_end|>"]  # not "\n<|im_start|>user\n" after them
    assert example.text.endswith("6, surely.<|im_end|>\n<|im_start|>user\n")  # still there, as context
    encoded = ConversationEncoder(tokenizer, NEXT_HEADER).encode([messages])
    labelled = [t for t, lab in zip(encoded.input_ids.tolist(), encoded.labels.tolist()) if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "".join(trained)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == labelled[-1]  # the last trained token is the stop
