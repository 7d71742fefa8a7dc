"""Raw text and plain completions: every document token trained once, EOS appended, long documents in chunks that
cover them; mixed with tool data in one preparation, each source keeping its own loss rule and its counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import processors

from tests.data.test_published_templates import _tokenizer
from tests.generated_data import all_texts, write_all
from trainer.data.build import DataOptions
from trainer.data.documents import adds_bos, chunk_bounds
from trainer.data.encode import ConversationEncoder
from trainer.data.items import Completion, Document
from trainer.data.prepared import prepare_data
from trainer.data.sources import resolve_sources
from trainer.data.templates import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer("qwen2_5", all_texts())


@pytest.mark.parametrize(("length", "max_length"), [(1, 4), (4, 4), (5, 4), (10, 4), (11, 4), (1000, 64), (9, 2)])
def test_chunks_cover_a_document_and_overlap_by_one_token(length, max_length):
    bounds = chunk_bounds(length, max_length)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(0 < end - start <= max_length for start, end in bounds)
    assert all(b[0] == a[1] - 1 for a, b in zip(bounds, bounds[1:]))  # the first token of a chunk: context
    targets = [t for k, (start, end) in enumerate(bounds) for t in range(start + 1, end)]
    assert sorted(targets) == list(range(1, length))  # every token but the very first is a target exactly once


def test_a_long_document_is_trained_whole_in_chunks_with_eos(tokenizer):
    text = " ".join(f"word{i % 37} 字{i % 11}" for i in range(300))
    encoder = ConversationEncoder(tokenizer, tokenizer.chat_template, max_length=64)
    encoded = encoder.encode([Document(text)])
    whole = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert encoded.document.all() and len(encoded.lengths) == len(chunk_bounds(len(whole), 64)) > 3
    assert not encoded.truncated.any() and (encoded.lengths <= 64).all()
    ends = np.cumsum(encoded.lengths)
    chunks = [encoded.input_ids[e - n : e].tolist() for e, n in zip(ends, encoded.lengths)]
    assert chunks[0] + [t for c in chunks[1:] for t in c[1:]] == whole  # consecutive, nothing lost
    labels = [encoded.labels[e - n : e].tolist() for e, n in zip(ends, encoded.lengths)]
    # Every token trained (the first of a chunk is the previous chunk's last), EOS last.
    assert all(lab[1:] == c[1:] for lab, c in zip(labels, chunks))
    assert all(lab[0] == IGNORE_INDEX for lab in labels[1:])
    assert int(encoded.label_counts.sum()) == len(whole) - 1 + 1  # label 0 of the first chunk is counted too
    assert chunks[-1][-1] == tokenizer.eos_token_id == labels[-1][-1]
    truncating = ConversationEncoder(tokenizer, tokenizer.chat_template, max_length=64, split_documents=False)
    assert truncating.encode([Document(text)]).truncated.tolist() == [True]  # --on_overlong drop then drops it


def test_bos_where_the_tokenizer_puts_it_before_plain_text_never_trained(tokenizer):
    encoder = ConversationEncoder(tokenizer, tokenizer.chat_template)
    assert not adds_bos(tokenizer) and encoder.encode([Document("abc")]).input_ids[0] != tokenizer.bos_token_id
    bos_tokenizer = _tokenizer("llama3_1", all_texts())
    bos_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_tokenizer.bos_token_id)])
    assert adds_bos(bos_tokenizer)
    encoded = ConversationEncoder(bos_tokenizer, bos_tokenizer.chat_template).encode(
        [Document("the river"), Completion("Q: 1+1?\nA:", " 2")])
    first, second = np.split(encoded.input_ids, [encoded.lengths[0]])
    labels_first, labels_second = np.split(encoded.labels, [encoded.lengths[0]])
    assert first[0] == second[0] == bos_tokenizer.bos_token_id
    assert labels_first[0] == labels_second[0] == IGNORE_INDEX
    trained = bos_tokenizer.decode([t for t in labels_second.tolist() if t != IGNORE_INDEX])
    assert trained == " 2" + bos_tokenizer.eos_token  # the completion and EOS; the prompt is context


def test_text_and_tool_sources_mix_each_with_its_own_rule_and_counts(tokenizer, tmp_path):
    files = write_all(tmp_path / "data", n=12)
    spec = f"{files['corpus']}:0.3,{files['tools']}:0.7"
    options = DataOptions(max_length=2048, packing=True)
    data = prepare_data(resolve_sources(spec), [], tokenizer, tokenizer.chat_template, options, tmp_path / "root",
                        show_progress=False)
    report = data.report
    corpus, tools = report.sources
    assert corpus["documents"] == 12 and corpus["chunks"] == 12 + 3 and corpus["chats"] == 0  # 3 long ones split
    assert tools["chats"] == 12 and tools["tool_call_turns"] == 24 and tools["tool_result_tokens"] > 12 * 3
    assert report.documents == 12 and report.chunks == corpus["chunks"] and report.tool_call_turns == 24
    assert report.truncated == 0 and report.mixing and "tool-call turn" in report.summary()
    assert "split into consecutive chunks" in report.summary()
    assert sum(p == 0 for row in data.train["position_ids"] for p in row) == report.train_examples  # isolated
    dropped = prepare_data(resolve_sources(str(files["corpus"])), [], tokenizer, tokenizer.chat_template,
                           DataOptions(max_length=2048, on_overlong="drop"), tmp_path / "root", show_progress=False)
    assert dropped.report.dropped_overlong == 3 and dropped.report.chunks == dropped.report.train_examples == 9
    written = json.loads((data.folder / "report.json").read_text(encoding="utf-8"))
    assert written["sources"][1]["tool_call_turns"] == 24
