"""Records of every kind read into the normal form, and bad tool records named by file and line (or skipped)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import raised_and_peak_memory
from tests.generated_data import TOOLS, sharegpt_trajectory, trajectory, write_all, write_jsonl
from trainer.data.formats import DataError, RecordReader, detect_format, read_records
from trainer.data.items import Chat, Completion, Document


def test_tool_trajectories_are_normalised_once(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [trajectory(1), trajectory(2, system=False), trajectory(3)])
    result = read_records(path)
    assert result.format == "messages"
    first = result.items[0]
    assert isinstance(first, Chat) and first.tools == TOOLS  # a JSON-string tools field (k=3) decodes the same
    assert result.items[2].tools == TOOLS
    call = first.messages[2]
    # null content with a call becomes "", arguments stored as JSON text become the object they encode
    assert call["content"] == "" and call["tool_calls"][0] == {
        "type": "function", "function": {"name": "get_weather", "arguments": {"city": call["tool_calls"][0][
            "function"]["arguments"]["city"], "unit": "c"}}, "id": "call00001"}
    assert isinstance(call["tool_calls"][0]["function"]["arguments"], dict)
    assert first.messages[3] == {"role": "tool", "content": first.messages[3]["content"], "tool_call_id": "call00001",
                                 "name": "get_weather"}
    parallel = first.messages[6]
    assert [c["function"]["arguments"]["top_k"] for c in parallel["tool_calls"]] == [3, 3]
    assert "tool_calls" not in first.messages[4]  # a plain answer has no tool_calls key (Llama's template checks)
    assert first.tool_call_turns() == 2


def test_sharegpt_function_call_and_observation(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([sharegpt_trajectory(0)], ensure_ascii=False), encoding="utf-8")
    (chat,) = read_records(path).items
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chat.tools == TOOLS  # flat specs in a JSON string, wrapped as apply_chat_template takes them


def test_prompt_completion_text_and_txt_files(tmp_path):
    files = write_all(tmp_path, n=3)
    formats = {name: read_records(path) for name, path in files.items()}
    assert {name: r.format for name, r in formats.items()} == {
        "tools": "messages", "sharegpt": "sharegpt", "corpus": "text", "book": "text",
        "completions": "prompt_completion", "chat_completions": "conversational_prompt_completion"}
    assert formats["completions"].items[1] == Completion("Q: what is 1 + 1?\nA:", " 2")
    (book,) = formats["book"].items
    assert isinstance(book, Document) and book.text == files["book"].read_text(encoding="utf-8")  # as it is
    chat = formats["chat_completions"].items[0]
    assert chat.first_trained == 4 and [m["role"] for m in chat.messages][3:] == ["user", "assistant"]
    assert detect_format({"prompt": [], "completion": []}) == "conversational_prompt_completion"


BAD = [
    ("arguments-not-json", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}],
     "tools": TOOLS}, "neither an object nor valid JSON"),
    ("arguments-a-list", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": "[1, 2]"}}]}], "tools": TOOLS},
     "must decode to a JSON object"),
    ("result-without-call", {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                          {"role": "assistant", "content": "a"}]}, "no tool call before it"),
    ("more-results-than-calls", {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}, {"role": "assistant", "content": "a"}],
        "tools": TOOLS}, "tool result 2 of message 1, which made 1 call"),
    ("unknown-function", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "book_flight", "arguments": {}}}]}], "tools": TOOLS},
     "calls 'book_flight', which is not among the record's tools (get_weather, search_docs)"),
    ("wrong-call-id", {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "get_weather"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "r"}, {"role": "assistant", "content": "x"}],
        "tools": TOOLS}, "answers tool call id 'b'"),
    ("tools-not-json", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "tools": "[{oops"}, "field 'tools' is a string but not valid JSON"),
    ("empty-document", {"text": "  \n"}, "empty document"),
    ("empty-completion", {"prompt": "q", "completion": ""}, "nothing to train"),
    ("user-in-completion", {"prompt": [{"role": "user", "content": "q"}],
                            "completion": [{"role": "user", "content": "x"}]}, "holds the assistant's turns"),
]


@pytest.mark.parametrize(("record", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_tool_records_name_file_and_line_or_are_skipped(tmp_path, record, fragment):
    good = trajectory(0) if "messages" in record else ({"text": "fine"} if "text" in record else
                                                        {"prompt": record["prompt"], "completion": "ok"}
                                                        if isinstance(record.get("prompt"), str) else
                                                        {"prompt": [{"role": "user", "content": "q"}],
                                                         "completion": [{"role": "assistant", "content": "a"}]})
    path = write_jsonl(tmp_path / "d.jsonl", [good, record, good])
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert str(caught.value).startswith(f"{path}:2: ") and fragment in str(caught.value)
    skipped = read_records(path, on_bad_record="skip")
    assert len(skipped.items) == 2 and [(s.line, s.index) for s in skipped.skipped] == [(2, 1)]
    assert fragment in skipped.skipped[0].reason


def test_a_record_without_tools_may_call_functions_its_system_prompt_describes(tmp_path):
    record = trajectory(0)
    del record["tools"]
    (chat,) = read_records(write_jsonl(tmp_path / "d.jsonl", [record])).items
    assert chat.tools is None and chat.tool_call_turns() == 2


# ------------------------------------------------------------------ the reader's guards hold for every kind


def test_a_txt_file_over_the_size_limit_is_refused_by_name_without_being_read_whole(tmp_path):
    """A .txt file is one record (one document): over --max_record_mb it is refused by file and size, and never
    read further than the limit plus one read chunk, as a .jsonl line over it is."""
    book = tmp_path / "book.txt"
    book.write_text("詩" * (8 << 20), encoding="utf-8")  # 24 MiB of text
    error, peak = raised_and_peak_memory(DataError, read_records, book, max_record_bytes=1 << 20)
    assert str(error).startswith(f"{book}:1: text file (one document) of 25,165,824 bytes is over the limit "
                                 "of 1,048,576 bytes set by --max_record_mb"), error
    assert peak < 8 << 20, f"the reader held {peak / 2**20:.0f} MiB of a 24 MiB file"
    with pytest.raises(DataError, match=r"book\.txt:1: no usable records: .* text file \(one document\) of 25,165"):
        read_records(book, on_bad_record="skip", max_record_bytes=1 << 20)  # the file is its only record
    exact = tmp_path / "exact.txt"
    exact.write_text("ab\n" * 1000, encoding="utf-8")  # 3,000 bytes: at the limit is within it
    assert read_records(exact, max_record_bytes=3000).items == [Document("ab\n" * 1000)]
    with pytest.raises(DataError, match=r"exact\.txt:1: text file \(one document\) of 3,000 bytes"):
        read_records(exact, max_record_bytes=2999)


def _tool_chat(arguments: dict, description: str = "Weather.") -> dict:
    return {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "a"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": description,
                                                         "parameters": {"type": "object"}}}]}


SURROGATES = [
    ("document", {"text": "fine"}, {"text": "half \ud800 pair"}, "field 'text' holds a lone surrogate U+D800"),
    ("completion", {"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a\udfff"},
     "field 'completion' holds a lone surrogate U+DFFF"),
    ("tool-arguments", _tool_chat({"city": "Paris"}), _tool_chat({"city": "Par\udc00is"}),
     "message 1's tool calls (as JSON) holds a lone surrogate U+DC00"),
    ("tool-spec", _tool_chat({"city": "Paris"}), _tool_chat({"city": "Paris"}, "Wea\ud83dther."),
     "field 'tools' (as JSON) holds a lone surrogate U+D83D"),
]


@pytest.mark.parametrize(("good", "bad", "fragment"), [c[1:] for c in SURROGATES], ids=[c[0] for c in SURROGATES])
def test_a_lone_surrogate_in_any_kind_is_a_bad_record_with_its_line(tmp_path, good, bad, fragment):
    """A broken \\uXXXX escape is valid JSON but no text a tokenizer can encode: in a document, a completion, a tool
    call's arguments or a tool spec (objects no field check sees) it is a bad record named by file:line."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)), encoding="utf-8")  # escaped \ud800
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert str(caught.value).startswith(f"{path}:2: ") and fragment in str(caught.value), caught.value
    skipped = read_records(path, on_bad_record="skip")
    assert len(skipped.items) == 2 and [s.line for s in skipped.skipped] == [2]


SIZES = [
    ("document", {"text": "fine"}, {"text": "x" * 5000}),
    ("completion", {"prompt": "q", "completion": "a"}, {"prompt": "p" * 2500, "completion": "c" * 2500}),
    ("tool-arguments", _tool_chat({"city": "Paris"}), _tool_chat({"city": "x" * 5000})),
    ("tool-spec", _tool_chat({"city": "Paris"}), _tool_chat({"city": "Paris"}, "x" * 5000)),
]


@pytest.mark.parametrize(("good", "big"), [c[1:] for c in SIZES], ids=[c[0] for c in SIZES])
def test_an_item_of_any_kind_over_the_size_limit_is_a_bad_record(good, big):
    """Rows that come decoded (parquet, ``datasets``) are measured by their texts: a document's, a completion's two,
    a chat's tool calls and tools as the template writes them (JSON)."""
    reader = RecordReader("rows", [(1, good), (2, big), (3, good)], "skip", max_record_bytes=4096)
    assert len([item for _, item in reader]) == 2
    (skipped,) = reader.skipped
    assert skipped.line == 2 and "over the limit of 4,096 bytes set by --max_record_mb" in skipped.reason
    assert len(list(RecordReader("rows", [(2, big)], max_record_bytes=8192))) == 1
