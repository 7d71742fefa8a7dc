"""The data half end to end on the real Tang set: read → tokenise with the template → pack, with its report."""

from __future__ import annotations

from tests.conftest import shared_file
from trainer.data.build import build_datasets, read_records
from trainer.data.templates import IGNORE_INDEX


def test_full_tang_set_packs_at_least_99_percent_at_1024(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = read_records(str(shared_file("tang", "Tang_training_data.json")), data_dir=None,
                           on_bad_record="error", system=None)
    data = build_datasets(records, None, tokenizer, tokenizer.chat_template, max_length=1024, on_overlong="truncate",
                          val_size=0, packing=True, seed=0, show_progress=False)
    print(f"\nTang, max_length 1024: {data.packing}")
    assert data.report.train_examples == 5001 and data.report.truncated == 0
    assert data.packing.examples == 5001 and data.packing.efficiency >= 0.99
    # Every label survives packing except the first token of each example (never a prediction target there).
    packed_labels = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in data.train["labels"])
    assert packed_labels == data.report.label_tokens
    assert all(len(row) <= 1024 for row in data.train["input_ids"])


def test_val_size_holds_out_a_seeded_share(tiny_model_dir, tang_slice):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = read_records(str(tang_slice), data_dir=None, on_bad_record="error", system="Be a poet.")
    first = build_datasets(records, None, tokenizer, tokenizer.chat_template, max_length=256, on_overlong="truncate",
                           val_size=0.25, packing=False, seed=1, show_progress=False)
    again = build_datasets(records, None, tokenizer, tokenizer.chat_template, max_length=256, on_overlong="truncate",
                           val_size=0.25, packing=False, seed=1, show_progress=False)
    assert (first.report.train_examples, first.report.eval_examples) == (48, 16)
    assert first.eval["input_ids"] == again.eval["input_ids"]
    assert "Be a poet." in tokenizer.decode(first.train[0]["input_ids"])
