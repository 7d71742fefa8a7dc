"""``--preview N``: what is trained, shown and written, without loading a model or training."""

from __future__ import annotations

import json

from tests.conftest import run_sft
from trainer import sft
from trainer.data.templates import IGNORE_INDEX


def test_preview_writes_exactly_what_is_trained_and_exits(tmp_path, tang_slice, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code = sft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset", str(tang_slice), "--preview", "3",
                     "--max_length", "64", "--output_dir", str(out), "--system", "Be a poet."])
    printed = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["example"] for r in rows] == [1, 2, 3]
    assert {"input_ids", "labels", "text", "source", "line"} <= set(rows[0])
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= 64
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert trained and all(label in (IGNORE_INDEX, t) for t, label in zip(row["input_ids"], row["labels"]))
        assert row["text"].startswith("<|im_start|>system\nBe a poet.")
    assert rows[0]["truncated"]  # Tang poems are longer than 64 tokens: said, and the labels kept as cut
    # Not a terminal: the trained text between markers, and nothing but the preview happened.
    assert printed.out.count("── example") == 3 and "«" in printed.out and "»" in printed.out
    assert "<|im_start|>assistant\n«" in printed.out
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert "attention" not in printed.err  # the model was never loaded (that log line names the backend)


def test_preview_from_the_command_line(tmp_path, tang_slice, tiny_model_dir):
    result = run_sft("--model_name_or_path", str(tiny_model_dir), "--dataset", str(tang_slice), "--preview", "1",
                     "--output_dir", str(tmp_path / "o"))
    assert "── 1 example(s)" in result.stdout
    assert (tmp_path / "o" / "preview.jsonl").is_file()
