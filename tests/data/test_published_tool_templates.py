"""Agent trajectories are trained exactly as each published template renders them at inference, with the same tools.

For each assistant turn ``i`` (tool-call turns included) the oracle is the tokenizer's own ``apply_chat_template``
with the record's tools: the example's text before the trained span is ``apply_chat_template(messages[:i],
tools=..., add_generation_prompt=True)``, and the trained text is what ``apply_chat_template(messages[:i + 1],
tools=...)`` adds to it, up to the reply's stop token. Tool specs, tool results and everything else are never
trained. Where a template renders a turn so that its prompt is not a prefix of it, the expected reply is written
out below with the reason. The trajectories have the shapes of real agent data (``tests/generated_data.py``):
several steps, parallel calls, calls with null or empty content, arguments stored as JSON text, tool results in
Chinese and long ones, with and without a system prompt.

A template that cannot render a trajectory must refuse it with a message naming what it does — never train a
turn the data does not hold.
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.data.test_published_templates import MODELS, _tokenizer
from tests.generated_data import trajectory
from trainer.data.encode import ConversationEncoder
from trainer.data.formats import _from_messages, _validate
from trainer.data.items import Chat
from trainer.data.templates import IGNORE_INDEX, ChatRenderer, TemplateError

# Templates added for tools (sources in chat_templates/SOURCES.md): bos, eos, special tokens they write.
TOOL_MODELS = {
    **MODELS,
    "hermes3_tool_use": ("<|begin_of_text|>", "<|im_end|>", ["<|im_start|>"]),
    "deepseek_v3_1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                      ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                       "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>",
                       "<｜tool▁output▁end｜>"]),
    "mistral_nemo": ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "mistral_small_3_2": ("<s>", "</s>", ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                          "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                          "[/TOOL_RESULTS]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]"]),
    "granite3_3": (None, "<|end_of_text|>", ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]),
    "qwq": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "kimi_k2": ("[BOS]", "[EOS]", ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>",
                                   "<|im_end|>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                                   "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"]),
    "qwen3_5": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
}
# Templates that render a call turn without its text: their trajectories have none (else: refused, see below).
CALLS_ONLY = {"mistral_v0_3", "mistral_nemo", "mistral_small_3_2", "hermes3_tool_use", "llama3_1", "llama3_2"}
# Templates that render tools, calls and results. Value: what the renderer is given.
PARALLEL = {
    "qwen2_5": {}, "qwen3": {}, "qwen3_rev2": {}, "mistral_v0_3": {}, "glm4_5": {}, "lfm2_5": {},
    "hermes3_tool_use": {}, "mistral_nemo": {}, "mistral_small_3_2": {}, "kimi_k2": {}, "qwen3_5": {},
    "qwq": {"missing_reasoning": "empty"},  # its prompt opens <think>: plain answers get the empty block
}
SINGLE = {"llama3_1": {}, "llama3_2": {}, "gpt_oss": {}}  # one call per turn: parallel calls are refused
# DeepSeek-V3.1 renders no tool specs (they go into the system message) and concatenates arguments as text.
NO_TOOLS = {"deepseek_v3_1": {}}


def _chat(record: dict) -> Chat:
    chat = _from_messages(record)
    _validate(chat)
    return chat


def _single_call(record: dict) -> dict:
    """The trajectory with its parallel calls cut to one (and one result)."""
    record = copy.deepcopy(record)
    messages = record["messages"]
    step = next(i for i, m in enumerate(messages) if len(m.get("tool_calls") or []) > 1)
    messages[step]["tool_calls"] = messages[step]["tool_calls"][:1]
    del messages[step + 2]
    return record


def _corpus() -> list[str]:
    texts = [json.dumps(trajectory(k), ensure_ascii=False) for k in range(4)]
    return texts * 5 + ["<think></think> assistant user system tool get_weather search_docs"] * 5


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


def _tokenizer_for(name: str, corpus: list[str]):
    saved = dict(MODELS)
    MODELS.update(TOOL_MODELS)
    try:
        return _tokenizer(name, corpus)
    finally:
        MODELS.clear()
        MODELS.update(saved)


def _stop_cut(reply: str, stops: tuple[str, ...]) -> str:
    end = max((reply.rfind(t) + len(t) for t in stops if t in reply), default=len(reply))
    return reply[:end].rstrip()


def _expected(name: str, tokenizer, messages: list[dict], i: int, prompt: str, rendered: str, kwargs: dict,
              stops: tuple[str, ...]) -> str:
    """The reply inference needs after ``prompt``: the oracle's difference, or the documented exceptions."""
    if rendered.startswith(prompt):
        reply = _stop_cut(rendered[len(prompt):], stops)
        if name == "glm4_5":  # no end-of-turn marker: EOS is what teaches stopping (see test_published_templates)
            reply += tokenizer.eos_token
        return reply
    if name == "hermes3_tool_use":
        # A tool result that is the last message ends without the newline it has otherwise: the reply is the
        # turn as the template writes it after its header, the generation prompt.
        return _stop_cut(rendered.rsplit("<|im_start|>assistant\n", 1)[1], stops)
    if name == "gpt_oss":
        # The text of a tool-call turn is rendered as its analysis only until a final answer follows: the prompt
        # has it, the rendering of the final turn does not. The reply is the final turn after its header.
        return _stop_cut(rendered.rsplit("<|start|>assistant", 1)[1], stops)
    if name.startswith("mistral"):
        # The system prompt (v0.3, Nemo) sits in the last user message only while it is last: the reply is the turn
        # as the template writes it after that message.
        return _stop_cut(rendered.rsplit("[/INST]", 1)[1], stops)
    if name == "qwq":
        # The prompt opens "<think>\n"; a plain answer gets the empty block, the rendered turn drops it.
        content = messages[i]["content"]
        return "\n</think>\n\n" + content + tokenizer.eos_token if not messages[i].get("tool_calls") else None
    raise AssertionError(f"{name}: unexpected non-prefix rendering at turn {i}")


def _check(name: str, tokenizer, chat: Chat, kwargs: dict, renderer_kwargs: dict, arguments_as_text: bool = False
           ) -> int:
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template, kwargs, **renderer_kwargs)
    examples = renderer.examples(chat.messages, chat.tools)
    assert renderer.arguments_as_text == arguments_as_text
    oracle = copy.deepcopy(chat.messages)
    if arguments_as_text:
        for message in oracle:
            for call in message.get("tool_calls") or []:
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    trained = [(e, span) for e in examples for span in e.spans]
    turns = [i for i, m in enumerate(chat.messages) if m["role"] == "assistant"]
    assert len(trained) == len(turns), "every assistant turn trained exactly once"
    for i in turns:
        prompt = tokenizer.apply_chat_template(oracle[:i], tools=chat.tools, add_generation_prompt=True,
                                               tokenize=False, **kwargs)
        rendered = tokenizer.apply_chat_template(oracle[: i + 1], tools=chat.tools, tokenize=False, **kwargs)
        found = [(e, (a, b)) for e, (a, b) in trained if e.text[:a] == prompt]
        assert len(found) == 1, f"{name} turn {i}: trained {len(found)} times in the inference prompt's context"
        ((example, (start, end)),) = found
        expected = _expected(name, tokenizer, oracle, i, prompt, rendered, kwargs, renderer.stop_tokens())
        if expected is not None:
            assert example.text[start:end] == expected, f"{name} turn {i}"
        for message in oracle[:i]:  # tool results are context: in the text, never in a trained span
            if message["role"] == "tool":
                assert not any(message["content"].strip() in example.text[a:b] for a, b in example.spans)
    encoded = ConversationEncoder(tokenizer, tokenizer.chat_template, kwargs, **renderer_kwargs).encode([chat])
    offset = 0
    for k, (example, length) in enumerate(zip(examples, encoded.lengths)):
        ids = encoded.input_ids[offset : offset + length].tolist()
        labels = encoded.labels[offset : offset + length].tolist()
        offset += length
        assert ids == tokenizer(example.text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == \
            "".join(example.text[a:b] for a, b in example.spans)
        results = [m for m in chat.messages[: max(i for i in turns)] if m["role"] == "tool"]
        if results and k == len(examples) - 1:  # every tool result of the trajectory is in the last example
            assert encoded.tool_tokens[k] >= len(results)
    return len(examples)


CASES = [(name, "parallel") for name in PARALLEL] + [(name, "single") for name in SINGLE] + \
        [(name, "no tools field") for name in NO_TOOLS]


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_each_turn_of_a_trajectory_is_trained_as_inference_renders_it(name, shape, corpus):
    tokenizer = _tokenizer_for(name, corpus)
    renderer_kwargs = {**PARALLEL, **SINGLE, **NO_TOOLS}[name]
    for k, system in ((1, True), (2, False)):
        record = trajectory(k, system=system, say_before_calls=name not in CALLS_ONLY)
        if shape == "single":
            record = _single_call(record)
        if shape == "no tools field":
            del record["tools"]
            record["messages"][0:0] = [] if system else [{"role": "system", "content": "Tools: get_weather."}]
        try:
            _check(name, tokenizer, _chat(record), {}, renderer_kwargs, arguments_as_text=shape == "no tools field")
        except AssertionError as error:
            raise AssertionError(f"{name} k={k} system={system}: {error}") from error


REFUSALS = {
    # name: (shape, what the message must say)
    "gemma3": ("parallel", "never renders them"),
    "phi4": ("parallel", "never renders them"),
    "deepseek_r1": ("parallel", "never renders them"),
    "deepseek_r1_distill": ("parallel", "never renders them"),
    "glm4": ("parallel", "never renders them"),
    "mistral_v0_3": ("parallel", "renders a turn that calls tools without its content"),
    "hermes3_tool_use": ("parallel", "renders a turn that calls tools without its content"),
    "smollm3": ("parallel", "renders that turn with 0"),  # tools in its system prompt, calls only inside content
    "granite3_3": ("parallel", "renders that turn with 0"),
    "llama3_1": ("parallel", "only supports single tool-calls"),  # the template's own raise_exception
    "gpt_oss": ("parallel", "makes 2 calls to 'search_docs', but the chat template renders that turn with 1"),
    "deepseek_v3_1": ("parallel", "never renders them"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_template_that_cannot_render_a_trajectory_refuses_it_by_name(name, corpus):
    import jinja2

    tokenizer = _tokenizer_for(name, corpus)
    shape, fragment = REFUSALS[name]
    chat = _chat(trajectory(1))
    with pytest.raises((TemplateError, jinja2.TemplateError), match=fragment):
        ChatRenderer(tokenizer, tokenizer.chat_template).examples(chat.messages, chat.tools)
    encoded = ConversationEncoder(tokenizer, tokenizer.chat_template).encode([chat])
    assert len(encoded.lengths) == 0 and fragment in encoded.errors[0][1]  # never a wrong target


def test_arguments_stored_as_json_text_are_not_encoded_twice(corpus):
    """The trap: a template that ``tojson``-s arguments writes a JSON string of JSON when given text. Arguments as
    text and as an object give the same ids and labels, and the trained call holds the object."""
    tokenizer = _tokenizer_for("qwen2_5", corpus)
    as_object, as_text = trajectory(2), trajectory(2)
    for message in as_text["messages"]:
        for call in message.get("tool_calls") or []:
            if isinstance(call["function"]["arguments"], dict):
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    encoder = ConversationEncoder(tokenizer, tokenizer.chat_template)
    a, b = encoder.encode([_chat(as_object)]), encoder.encode([_chat(as_text)])
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    trained = tokenizer.decode([t for t in a.labels.tolist() if t != IGNORE_INDEX])
    assert '"arguments": {"city": ' in trained and '\\"city\\"' not in trained


def test_conversational_completion_trains_only_the_completion(corpus):
    tokenizer = _tokenizer_for("qwen2_5", corpus)
    record = trajectory(1)
    prompt = record["messages"][:6]  # through the second question: its earlier answers are context
    chat = _chat({"messages": record["messages"], "tools": record["tools"]})
    completion = Chat(chat.messages, chat.tools, first_trained=len(prompt))
    (example,) = ChatRenderer(tokenizer, tokenizer.chat_template).examples(completion.messages, completion.tools,
                                                                          completion.first_trained)
    assert len(example.spans) == 2  # the parallel-call turn and the final answer, not the first two turns
    head = tokenizer.apply_chat_template(chat.messages[:6], tools=chat.tools, add_generation_prompt=True,
                                         tokenize=False)
    assert example.text.startswith(head) and example.spans[0][0] == len(head)


def test_a_template_that_drops_tool_results_is_refused(corpus):
    tokenizer = _tokenizer_for("qwen2_5", corpus)
    blind = tokenizer.chat_template.replace('message.role == "tool"', "false")
    assert blind != tokenizer.chat_template
    chat = _chat(trajectory(1))
    with pytest.raises(TemplateError, match="tool result at message 3 is missing from the chat template's prompt"):
        ChatRenderer(tokenizer, blind).examples(chat.messages, chat.tools)
