"""The data half end to end: sources → examples → (mixed) → packed rows in a prepared, content-addressed folder."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.conftest import DEMO_DATA, SHARED_DATA, needs_full_data
from trainer.data.build import DataOptions
from trainer.data.formats import DataError, read_conversations
from trainer.data.packing import pack_examples
from trainer.data.prepared import data_key, prepare_data
from trainer.data.sources import resolve_sources
from trainer.data.templates import IGNORE_INDEX, tokenize_conversation


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _prepare(tokenizer, spec: str, root: Path, eval_spec: str | None = None, num_proc: int = 1, **options):
    options = DataOptions(**{"max_length": 256, **options})
    evaluation = resolve_sources(eval_spec) if eval_spec else []
    return prepare_data(resolve_sources(spec), evaluation, tokenizer, tokenizer.chat_template, options, root,
                        num_proc=num_proc, show_progress=False)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(("path", "count", "max_length", "efficiency"), [
    # The demo's 21,199 tokens at 512: 42 rows, the fewest they fit in (98.6%); best-fit-decreasing alone needs 43.
    pytest.param(DEMO_DATA / "tang_train.json", 400, 512, 0.98, id="demo"),
    pytest.param(SHARED_DATA / "tang" / "Tang_training_data.json", 5001, 1024, 0.99, marks=needs_full_data, id="full"),
])
def test_tang_set_packs_into_the_fewest_rows(tokenizer, tmp_path, path, count, max_length, efficiency):
    data = _prepare(tokenizer, str(path), tmp_path, max_length=max_length, packing=True, seed=0)
    print(f"\nTang, max_length {max_length}: {data.report.packing['summary']}")
    assert data.report.train_examples == count and data.report.truncated == 0
    tokens = sum(len(row) for row in data.train["input_ids"])
    assert len(data.train["input_ids"]) == -(-tokens // max_length)  # no packer can use fewer rows
    assert data.report.packing["efficiency"] >= efficiency
    # Every label survives packing except the first token of each example (never a prediction target there).
    packed_labels = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in data.train["labels"])
    assert packed_labels == data.report.label_tokens
    assert all(len(row) <= max_length for row in data.train["input_ids"])
    assert sum(p == 0 for row in data.train["position_ids"] for p in row) == count


def test_examples_are_those_of_the_template_and_rows_those_of_pack_examples(tokenizer, tmp_path, tang_slice):
    unpacked = _prepare(tokenizer, str(tang_slice), tmp_path, packing=False)
    packed = _prepare(tokenizer, str(tang_slice), tmp_path, packing=True, seed=3)
    expected = []
    for conversation in read_conversations(tang_slice).conversations:
        (example,) = tokenize_conversation(tokenizer, tokenizer.chat_template, conversation, 256)
        expected.append({"input_ids": example.input_ids, "labels": example.labels})
    assert unpacked.train["input_ids"] == [e["input_ids"] for e in expected]
    assert unpacked.train["labels"] == [e["labels"] for e in expected]
    rows = pack_examples(expected, 256, seed=3)
    for key in ("input_ids", "labels", "position_ids"):
        assert packed.train[key] == [r[key] for r in rows]


def test_val_size_holds_out_a_seeded_share(tokenizer, tmp_path, tang_slice):
    first = _prepare(tokenizer, str(tang_slice), tmp_path / "a", val_size=0.25, seed=1, system="Be a poet.")
    again = _prepare(tokenizer, str(tang_slice), tmp_path / "b", val_size=0.25, seed=1, system="Be a poet.")
    assert (first.report.train_examples, first.report.eval_examples) == (48, 16)
    assert first.eval["input_ids"] == again.eval["input_ids"]
    assert not set(map(tuple, first.eval["input_ids"])) & set(map(tuple, first.train["input_ids"]))
    assert "Be a poet." in tokenizer.decode(first.train[0]["input_ids"])


def test_prepared_folder_is_found_again_and_keyed_by_content(tokenizer, tmp_path, tang_records):
    data = _jsonl(tmp_path / "d.jsonl", tang_records[:40])
    first = _prepare(tokenizer, str(data), tmp_path / "root", packing=True)
    again = _prepare(tokenizer, str(data), tmp_path / "root", packing=True)
    assert first.built_here and not again.built_here and first.folder == again.folder
    assert (first.folder / "manifest.json").is_file() and not (first.folder / "examples.arrow").exists()
    assert _prepare(tokenizer, str(data), tmp_path / "root", packing=True, max_length=128).folder != first.folder
    _jsonl(data, tang_records[:39])  # same path, other content: another folder
    assert _prepare(tokenizer, str(data), tmp_path / "root", packing=True).folder != first.folder


def _prepare_in_process(args) -> tuple[str, bool]:
    model_dir, data, root = args
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = _prepare(tokenizer, data, Path(root), packing=True)
    return str(prepared.folder), prepared.built_here


def test_concurrent_preparations_build_once_and_agree(tiny_model_dir, tmp_path, tang_records):
    data = _jsonl(tmp_path / "d.jsonl", tang_records[:300])
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare_in_process, [(str(tiny_model_dir), str(data), str(tmp_path / "root"))] * 2)
    assert results[0][0] == results[1][0]
    assert sorted(built for _, built in results) == [False, True]
    assert [p.name for p in (tmp_path / "root").iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_mixing_by_weight_in_examples_and_tokens(tokenizer, tmp_path, tang_records):
    short = _jsonl(tmp_path / "short.jsonl", tang_records[:100])
    long_records = [{**r, "output": r["output"] * 3} for r in tang_records[100:400]]
    long = _jsonl(tmp_path / "long.jsonl", long_records)
    data = _prepare(tokenizer, f"{short}:0.5,{long}:0.5", tmp_path / "root")
    mixed = {s["name"]: s["mixed_examples"] for s in data.report.sources}
    assert mixed == {str(short): 100, str(long): 100}  # short runs out first: all of it, as many of long
    assert data.report.train_examples == 200
    by_tokens = _prepare(tokenizer, f"{short}:0.5,{long}:0.5", tmp_path / "root", mix_by="tokens")
    tokens = {s["name"]: s["mixed_tokens"] for s in by_tokens.report.sources}
    assert abs(tokens[str(long)] - tokens[str(short)]) <= max(len(x) for x in by_tokens.train["input_ids"])
    assert {s["name"]: s["left_out"] for s in by_tokens.report.sources}[str(long)] > 200
    assert "mixing: by examples" in data.report.summary()
    with pytest.raises(DataError, match="give every source a weight"):
        resolve_sources(f"{short}:0.5,{long}")


def test_eval_from_several_sources_gives_one_set_each(tokenizer, tmp_path, tang_records):
    a = _jsonl(tmp_path / "poems_a.jsonl", tang_records[:30])
    b = _jsonl(tmp_path / "poems_b.jsonl", tang_records[30:50])
    data = _prepare(tokenizer, str(tmp_path / "poems_a.jsonl"), tmp_path / "root", eval_spec=f"{a},{b}")
    assert set(data.eval) == {"poems_a", "poems_b"} and len(data.eval["poems_b"]) == 20
    single = _prepare(tokenizer, str(a), tmp_path / "root", val_size=5)
    assert len(single.eval) == 5


def test_parquet_and_saved_datasets_read_like_jsonl(tokenizer, tmp_path, tang_records):
    import datasets

    records = tang_records[:25]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    jsonl = _prepare(tokenizer, str(_jsonl(tmp_path / "d.jsonl", records)), tmp_path / "root")
    for spec in (str(tmp_path / "d.parquet"), str(tmp_path / "saved")):
        other = _prepare(tokenizer, spec, tmp_path / "root")
        assert other.train["input_ids"] == jsonl.train["input_ids"], spec


def test_multi_turn_expansion_and_template_errors_are_reported(tokenizer, tmp_path):
    rewriting = (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}{{- '[old]<|im_end|>' -}}"
        "{%- else -%}{{- m['role'] + ':' + m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}"
    )
    two_turns = {"messages": ["a", "b", "c", "d"]}
    data = _jsonl(tmp_path / "d.jsonl", [two_turns, {"messages": ["x", "y"]}, two_turns])
    options = DataOptions(max_length=64)
    prepared = prepare_data(resolve_sources(str(data)), [], tokenizer, rewriting, options, tmp_path / "root",
                            show_progress=False)
    assert (prepared.report.conversations, prepared.report.train_examples) == (3, 5)
    assert prepared.report.expanded_conversations == 2
    raising = "{{ raise_exception('no system prompts here') if messages[0]['content'] == 'x' else '' }}" + rewriting
    with pytest.raises(DataError, match=r"d\.jsonl:2: chat template: no system prompts here"):
        prepare_data(resolve_sources(str(data)), [], tokenizer, raising, options, tmp_path / "other",
                     show_progress=False)
    skipped = prepare_data(resolve_sources(str(data)), [], tokenizer, raising,
                           DataOptions(max_length=64, on_bad_record="skip"), tmp_path / "other", show_progress=False)
    assert skipped.report.skipped_count == 1 and skipped.report.skipped_records[0]["line"] == 2


def test_key_changes_with_what_changes_tokens(tokenizer, tang_slice):
    sources = resolve_sources(str(tang_slice))
    key = data_key(sources, [], tokenizer, tokenizer.chat_template, DataOptions(max_length=256))[0]
    assert key == data_key(sources, [], tokenizer, tokenizer.chat_template, DataOptions(max_length=256))[0]
    for changed in (DataOptions(max_length=256, system="s"), DataOptions(max_length=256, packing=True),
                    DataOptions(max_length=256, template_kwargs={"enable_thinking": False})):
        assert data_key(sources, [], tokenizer, tokenizer.chat_template, changed)[0] != key
    assert data_key(sources, [], tokenizer, "{{ messages }}", DataOptions(max_length=256))[0] != key


def test_file_digest_follows_an_edit_that_keeps_size_and_modification_time(tmp_path, monkeypatch):
    """The memo once trusted (path, size, mtime): an edit in place that restored the mtime (cp -p, rsync -t,
    touch -r) reused the old tokens while --preview showed the new text. The change time gives it away."""
    import hashlib
    import os
    import time

    from trainer.data import digests
    from trainer.data.sources import file_digest

    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "SETTLED_S", 0.02)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    assert file_digest(data) == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert not (tmp_path / "cache" / "digests").exists(), "a file changed this instant was remembered"
    time.sleep(0.05)
    assert file_digest(data) == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert list((tmp_path / "cache" / "digests").iterdir()), "the digest was not remembered"
    before = data.stat()
    with open(data, "r+b") as f:  # in place, as cp -p writes over an existing file
        f.write(b'{"a": 2}\n')
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and puts the old time back
    after = data.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert file_digest(data) == hashlib.sha256(b'{"a": 2}\n').hexdigest()


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` in place and put the modification time back, as a careless copy would."""
    import os

    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# damage → what the rebuild message names
DAMAGE = {
    "zeroed bytes": (lambda d: _overwrite(d / "train.arrow", (d / "train.arrow").stat().st_size // 2, bytes(4096)),
                     "train.arrow does not hold the bytes written"),
    "random bytes": (lambda d: _overwrite(d / "eval.arrow", 200, __import__("os").urandom(64)),
                     "eval.arrow does not hold the bytes written"),
    "truncated": (lambda d: _truncate(d / "train.arrow", 1000), "train.arrow has 1,000 bytes where"),
    "empty": (lambda d: _truncate(d / "train.arrow", 0), "train.arrow has 0 bytes where"),
    "missing file": (lambda d: (d / "report.json").unlink(), "report.json is missing"),
    "manifest not json": (lambda d: _truncate(d / "manifest.json", 100), "manifest.json is damaged (JSONDecodeError"),
    "manifest edited": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"train_examples": 36', '"train_examples": 37')),
        "manifest.json does not match its own digest"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_prepared_data_is_rebuilt_with_a_message_never_trained(case, tokenizer, tmp_path, tang_records,
                                                                      caplog):
    """Zeroed bytes in train.arrow once trained a quarter of the rows on labels 0 (exit 0); random bytes gave an
    IndexError mid-training; a truncated or empty file or a broken manifest, raw tracebacks. Each is now found
    before use and the folder rebuilt, with a message naming the file."""
    import gc
    import time

    data = _jsonl(tmp_path / "d.jsonl", tang_records[:40])
    first = _prepare(tokenizer, str(data), tmp_path / "root", packing=True, val_size=4)
    folder, expected = first.folder, (first.train.to_dict(), first.eval.to_dict())
    del first  # and its memory maps: reading a mapped file that was truncated is a SIGBUS
    gc.collect()
    time.sleep(0.05)  # filesystems stamp change times in ticks of a few milliseconds
    damage, named = DAMAGE[case]
    damage(folder)
    caplog.clear()
    again = _prepare(tokenizer, str(data), tmp_path / "root", packing=True, val_size=4)
    err = caplog.text
    assert again.built_here and again.folder == folder
    assert f"prepared data {folder}: {named}" in err and "rebuilding it" in err, err
    assert (again.train.to_dict(), again.eval.to_dict()) == expected
    assert _prepare(tokenizer, str(data), tmp_path / "root", packing=True, val_size=4).built_here is False


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_data_takes_the_umasks_modes(umask, tokenizer, tmp_path, tang_records):
    """A team-shared --prepared_data_dir: its folders were 0700 (mkdtemp) whatever the umask, and a second user got
    PermissionError. Under umask 022 all is 0755 / 0644; under 027, 0750 / 0640: the umask decides, not us."""
    import os
    import stat

    data = _jsonl(tmp_path / "d.jsonl", tang_records[:20])
    old = os.umask(umask)
    try:
        prepared = _prepare(tokenizer, str(data), tmp_path / "shared", val_size=2)
    finally:
        os.umask(old)
    found = [prepared.folder, *(tmp_path / "shared").rglob("*")]
    assert len(found) > 6
    wrong = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in found
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask]
    assert not wrong, wrong


def test_damaged_prepared_data_this_user_cannot_replace_is_refused_in_one_sentence(tokenizer, tmp_path,
                                                                                   tang_records, monkeypatch):
    import gc

    from trainer.data import prepared as prepared_module
    from trainer.data.prepared import PreparedDataError

    data = _jsonl(tmp_path / "d.jsonl", tang_records[:20])
    first = _prepare(tokenizer, str(data), tmp_path / "shared")
    folder = first.folder
    del first
    gc.collect()
    _truncate(folder / "train.arrow", 10)
    monkeypatch.setattr(prepared_module.os, "access", lambda path, mode: False)  # a teammate's read-only folder
    with pytest.raises(PreparedDataError) as caught:
        _prepare(tokenizer, str(data), tmp_path / "shared")
    message = str(caught.value)
    assert message.startswith(f"--prepared_data_dir {tmp_path / 'shared'}: {folder.name} is damaged (train.arrow "
                              "has 10 bytes where "), message
    assert message.endswith(" were written) and this user cannot write there; ask its owner to run "
                            "trainer/prepare.py with the same options, or pass a folder you can write to"), message
    assert (folder / "train.arrow").stat().st_size == 10  # left as it was, and not trained on
