import json
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO_DATA, DEMO_TEST, needs_full_data, raised_and_peak_memory, shared_file
from trainer.data.formats import DataError, SkippedRecord, detect_format, read_conversations


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# (case id, record, detected format, expected conversation)
GOOD = [
    (
        "alpaca-with-input",
        {"instruction": "Finish the poem.", "input": "First line", "output": "Rest"},
        "alpaca",
        [U("Finish the poem.\nFirst line"), A("Rest")],
    ),
    ("alpaca-empty-input", {"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", [U("Hi"), A("Hello")]),
    ("alpaca-no-input", {"instruction": "Hi", "output": "Hello"}, "alpaca", [U("Hi"), A("Hello")]),
    (
        "alpaca-multi-turn",
        {"instruction": "q3", "output": "a3", "system": "sys", "history": [["q1", "a1"], ["q2", "a2"]]},
        "alpaca",
        [S("sys"), U("q1"), A("a1"), U("q2"), A("a2"), U("q3"), A("a3")],
    ),
    (
        "messages-single",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "messages",
        [U("Hi"), A("Hello")],
    ),
    (
        "messages-multi-turn",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "name": "bot"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        "messages",
        [S("be brief"), U("q1"), A("a1"), U("q2"), A("a2")],
    ),
    (
        "sharegpt-single",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        "sharegpt",
        [U("Hi"), A("Hello")],
    ),
    (
        "sharegpt-multi-turn",
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "user", "value": "q2"},
                {"from": "assistant", "value": "a2"},
            ]
        },
        "sharegpt",
        [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")],
    ),
    ("alternating-single", {"messages": ["riddle", "answer"]}, "alternating", [U("riddle"), A("answer")]),
    (
        "alternating-multi-turn",
        {"number": 286, "system": "sys", "messages": ["q1", "a1", "q2", "a2"]},
        "alternating",
        [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")],
    ),
]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize(("record", "fmt", "expected"), [case[1:] for case in GOOD], ids=[case[0] for case in GOOD])
def test_each_format_reads_into_the_expected_conversation(tmp_path, suffix, record, fmt, expected):
    writer = write_json if suffix == ".json" else write_jsonl
    path = writer(tmp_path / f"data{suffix}", [record, record])
    result = read_conversations(path)
    assert detect_format(record) == fmt
    assert result.format == fmt
    assert result.conversations == [expected, expected]
    assert result.skipped == []


def test_lines_point_at_where_each_record_starts(tmp_path):
    record = {"instruction": "q", "output": "a"}
    array = write_json(tmp_path / "a.json", [record] * 3)  # indent=2: "[", then 4 lines per record
    assert read_conversations(array).lines == [2, 6, 10]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(f"{json.dumps(record)}\n\n  \n{json.dumps(record)}\n", encoding="utf-8")
    assert read_conversations(jsonl).lines == [1, 4]  # blank lines skipped, not counted as records


def test_line_separators_inside_strings_do_not_split_jsonl_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "a\u2028b", "output": "c\u0085d"}\n', encoding="utf-8")
    assert read_conversations(path).conversations == [[U("a\u2028b"), A("c\u0085d")]]


def test_detect_format_returns_none_for_unknown_shapes():
    assert detect_format({"question": "x", "answer": "y"}) is None
    assert detect_format(["not", "a", "dict"]) is None


def _reads_completely(path: Path, count: int) -> None:
    start = time.perf_counter()
    result = read_conversations(path)
    elapsed = time.perf_counter() - start
    assert result.format == "alpaca"
    assert len(result.conversations) == count == len(result.lines)
    assert result.skipped == []
    assert all(len(c) == 2 and c[1]["content"].strip() for c in result.conversations)
    assert elapsed < 1.0, f"reading {path.name} took {elapsed:.2f}s"


def test_demo_set_reads_completely():
    _reads_completely(DEMO_DATA / "tang_train.json", 400)


@needs_full_data
def test_full_sets_read_completely_and_fast():
    """An extra: the full sets' sizes (and a 1 s bound on 5,001 records) need the files themselves."""
    _reads_completely(shared_file("tang", "Tang_training_data.json"), 5001)
    _reads_completely(shared_file("huanhuan", "huanhuan.json"), 3729)


def test_tang_first_record_matches_the_notebook_prompt_text():
    first = read_conversations(DEMO_DATA / "tang_train.json").conversations[0]  # the full set's first record too
    assert first[0] == U("以下是一首唐詩的第一句話，請用你的知識判斷並完成整首詩。\n秦川雄帝宅，函谷壯皇居。")
    assert first[1]["content"].startswith("綺殿千尋起")


GOOD_LINE = '{"instruction": "q", "output": "a"}'

# (case id, file name, file content, expected line, fragment the message must contain)
BAD = [
    ("malformed-jsonl-line", "d.jsonl", f'{GOOD_LINE}\n{{"instruction": "q", "output": }}\n', 2, "malformed JSON"),
    (
        "malformed-array-reports-json-error-line",
        "d.json",
        '[\n {"instruction": "q",\n  "output": "a"},\n {"instruction": "q"\n  "output": "a"}\n]\n',
        5,
        "malformed JSON",
    ),
    ("not-an-array", "d.json", '{"instruction": "q", "output": "a"}', 1, "top-level array"),
    ("unterminated-array", "d.json", '[\n {"instruction": "q", "output": "a"}\n', 3, "unterminated"),
    ("trailing-garbage", "d.json", '[{"instruction": "q", "output": "a"}]\n\n]', 3, "extra data"),
    ("missing-output", "d.jsonl", f'{GOOD_LINE}\n{GOOD_LINE}\n{{"instruction": "q"}}\n', 3, "missing field 'output'"),
    (
        "other-format-in-file",
        "d.jsonl",
        f'{GOOD_LINE}\n{{"messages": [{{"role": "user", "content": "q"}}]}}\n',
        2,
        "looks like messages",
    ),
    ("list-where-text", "d.jsonl", '{"instruction": ["q"], "output": "a"}\n', 1, "'instruction' must be a string"),
    ("null-content", "d.jsonl", '{"messages": [{"role": "user", "content": null}]}\n', 1, "must be a string"),
    ("empty-answer", "d.jsonl", f'{GOOD_LINE}\n\n{{"instruction": "q", "output": "  "}}\n', 3, "empty assistant"),
    (
        "not-alternating",
        "d.jsonl",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}\n',
        1,
        "alternating",
    ),
    (
        "starts-with-assistant",
        "d.jsonl",
        '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}\n',
        1,
        "'user' was expected",
    ),
    ("ends-on-user", "d.jsonl", '{"messages": ["q", "a", "q2"]}\n', 1, "ends on the user"),
    (
        "system-in-the-middle",
        "d.jsonl",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}\n',
        1,
        "role 'system'",
    ),
    ("unknown-role", "d.jsonl", '{"messages": [{"role": "robot", "content": "q"}]}\n', 1, "unsupported role"),
    ("unknown-format", "d.jsonl", '\n{"question": "q", "answer": "a"}\n', 2, "matches no known format"),
    ("record-not-object", "d.json", '[\n  "just text"\n]', 2, "expected an object"),
    ("empty-file", "d.jsonl", "", 1, "empty file"),
    ("blank-file", "d.json", "\n\n  \n", 1, "empty file"),
    ("empty-array", "d.json", "[ ]", 1, "no records"),
    ("unsupported-extension", "d.csv", "instruction,output\nq,a\n", 1, "unsupported extension"),
]


@pytest.mark.parametrize(("name", "content", "line", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_names_file_and_line(tmp_path, name, content, line, fragment):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_conversations(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message


def test_record_errors_name_index_and_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    with pytest.raises(DataError, match=r"\(record 1, format alpaca\)$"):
        read_conversations(path)


def test_non_utf8_gives_the_line_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b"\n" + GOOD_LINE.encode() + b"\n" + '{"instruction": "é"'.encode("latin-1"))
    with pytest.raises(DataError, match=r":3: not valid UTF-8") as caught:
        read_conversations(path, on_bad_record="skip")  # never skippable
    assert str(caught.value).startswith(f"{path}:3: ")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf[" + GOOD_LINE.encode() + b"]")
    assert read_conversations(path).conversations == [[U("q"), A("a")]]


def test_skip_collects_bad_records_with_their_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        '{"instruction": "q0", "output": "a0"}',
        '{"instruction": "q1", "output": ""}',  # empty answer
        "{broken",  # malformed JSON is skippable in .jsonl
        "",
        '{"instruction": "q4", "output": "a4"}',
        '{"messages": ["q", "a"]}',  # not the file's format
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_conversations(path, on_bad_record="skip")
    assert result.conversations == [[U("q0"), A("a0")], [U("q4"), A("a4")]]
    assert result.lines == [1, 5]
    assert [(s.line, s.index) for s in result.skipped] == [(2, 1), (3, 2), (6, 4)]
    assert all(isinstance(s, SkippedRecord) and s.path == str(path) for s in result.skipped)
    assert "empty assistant" in result.skipped[0].reason
    assert "malformed JSON" in result.skipped[1].reason


def test_skip_detects_format_from_the_first_usable_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x"}\n{"messages": ["q", "a"]}\n', encoding="utf-8")
    result = read_conversations(path, on_bad_record="skip")
    assert result.format == "alternating"
    assert [s.line for s in result.skipped] == [1]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("d.json", '[{"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}]', "malformed JSON"),
        ("d.jsonl", '{"instruction": "q"}\n{"instruction": "q", "output": " "}\n', "all 2 were skipped"),
    ],
    ids=["broken-array", "nothing-usable"],
)
def test_skip_still_fails_on_whole_file_problems(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=fragment):
        read_conversations(path, on_bad_record="skip")


def test_rejects_unknown_on_bad_record_value(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_conversations(path, on_bad_record="ignore")


def test_prompt_files_may_lack_answers_but_are_still_checked(tmp_path):
    from trainer.data.prompts import read_prompts

    with pytest.raises(DataError, match="tang_test.json:2: missing field 'output'"):
        read_conversations(DEMO_TEST)
    prompts = read_prompts(DEMO_TEST, system="poet")
    assert len(prompts) == 5 and all(p.reference is None for p in prompts)
    assert prompts[0].messages[0] == {"role": "system", "content": "poet"}
    assert prompts[0].messages[-1]["role"] == "user" and "\n" in prompts[0].text
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"messages": ["q", "a"]}\n{"messages": "not a list"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:2:"):
        read_prompts(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": ["q", "a"]}\n{"messages": ["q2"]}\n', encoding="utf-8")
    assert [(p.text, p.reference) for p in read_prompts(good)] == [("q", "a"), ("q2", None)]


# ------------------------------------------------------------------ records no reader can take as they are

DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep: Python's decoder recurses once per level


@pytest.mark.parametrize(
    ("name", "content", "line", "fragment"),
    [
        ("d.jsonl", f'{GOOD_LINE}\n{{"instruction": "q\\ud800", "output": "a"}}\n', 2, "lone surrogate U+D800"),
        ("d.json", f'[{GOOD_LINE},\n {{"instruction": "q", "output": "\\udc00 a"}}]', 2, "lone surrogate U+DC00"),
        ("d.jsonl", f'{GOOD_LINE}\n{{"instruction": {DEEP}, "output": "a"}}\n', 2, "nested too deeply"),
    ],
    ids=["surrogate-jsonl", "surrogate-json", "deep-jsonl"],
)
def test_unreadable_records_are_bad_records_with_their_line(tmp_path, name, content, line, fragment):
    """A lone surrogate (a broken \\uXXXX escape: valid JSON, not valid Unicode, and the tokenizer's TypeError
    had no file:line) and JSON nested 100,000 deep (a RecursionError) are bad records: named, and skippable."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_conversations(path)
    assert str(caught.value).startswith(f"{path}:{line}: ") and fragment in str(caught.value), caught.value
    skipped = read_conversations(path, on_bad_record="skip")
    assert skipped.conversations == [[U("q"), A("a")]] and [s.line for s in skipped.skipped] == [line]


def test_json_array_nested_too_deeply_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(f'[{GOOD_LINE},\n {DEEP}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:2: .*nested too deeply"):
        read_conversations(path, on_bad_record="skip")  # inside an array the record's end cannot be found


def _one_big_record(path: Path, text_bytes: int, records_after: int = 1) -> Path:
    big = json.dumps({"instruction": "q", "output": "詩" * (text_bytes // 3)}, ensure_ascii=False)
    path.write_text("\n".join([GOOD_LINE, big] + [GOOD_LINE] * records_after) + "\n", encoding="utf-8")
    return path


def test_a_record_over_the_size_limit_is_refused_without_being_read_whole(tmp_path):
    """One 68 MB record took 13.5 GB to become 64 tokens: the reader refuses a record over --max_record_mb by its
    file:line and size, and never holds more of it than the limit plus one read chunk."""
    path = _one_big_record(tmp_path / "d.jsonl", 24 << 20)
    error, peak = raised_and_peak_memory(DataError, read_conversations, path, max_record_bytes=1 << 20)
    message = str(error)
    assert message.startswith(f"{path}:2: record of 25,165,8") and "--max_record_mb" in message, message
    assert peak < 12 << 20, f"the reader held {peak / 2**20:.0f} MiB of a 24 MiB record"
    skipped = read_conversations(path, on_bad_record="skip", max_record_bytes=1 << 20)
    assert len(skipped.conversations) == 2 and [s.line for s in skipped.skipped] == [2]


def test_the_size_limit_holds_for_json_arrays_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "詩" * (3 << 20)}]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:6: record of more than 2,097,152 bytes"):
        read_conversations(array, max_record_bytes=2 << 20)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    with pytest.raises(DataError, match=r"d\.parquet:2: record holds 9,437,18\d bytes of text"):
        read_conversations(parquet, max_record_bytes=2 << 20)
    assert len(read_conversations(parquet, max_record_bytes=16 << 20).conversations) == 2


def test_a_json_array_defect_is_named_at_once_not_taken_for_a_large_record(tmp_path):
    """Reading on to find a record's end is for a record cut by the read window; a syntax error is named where it
    is, even in a file much larger than the record size limit."""
    path = tmp_path / "d.json"
    records = [json.dumps({"instruction": f"q{i}", "output": "a" * 50}) for i in range(400)]
    records[1] = records[1].replace('", "output"', '" "output"')  # a missing comma in the second record
    path.write_text("[\n" + ",\n".join(records) + "\n]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:3: malformed JSON: Expecting ',' delimiter"):
        read_conversations(path, max_record_bytes=1024)
