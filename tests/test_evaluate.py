"""Evaluation: a model that memorised a few records scores near 1 after training and near 0 before, and the
tools around it (references files, label sets, batched generation) do what they say."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_RECIPE, run_sft
from trainer import evaluate
from trainer.data.formats import DataError
from trainer.data.prompts import read_references

QUESTIONS = ["登鸛雀樓", "靜夜思", "春曉", "相思", "江雪", "鹿柴"]
ANSWERS = ["白日依山盡", "床前明月光", "春眠不覺曉", "紅豆生南國", "千山鳥飛絕", "空山不見人"]


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memorise")
    records = [{"instruction": question, "output": answer} for question, answer in zip(QUESTIONS, ANSWERS)]
    data = folder / "six.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = folder / "out"
    run_sft(DEMO_RECIPE, "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data),
            "--output_dir", str(out), "--packing", "false", "--per_device_train_batch_size", "6",
            "--global_batch_size", "6", "--max_steps", "100", "--learning_rate", "3e-3", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--report_to", "none", "--sample_prompts", "none",
            "--save_strategy", "no", "--logging_steps", "20")
    return data, out


@pytest.mark.slow
def test_memorised_records_score_near_one_after_and_low_before(memorised, tiny_model_dir, tmp_path, capsys):
    data, out = memorised
    metrics_file = tmp_path / "eval" / "metrics.json"
    code = evaluate.main(["--model", str(out), "--input_file", str(data), "--metrics_file", str(metrics_file),
                          "--compare", str(tiny_model_dir), "--max_new_tokens", "12", "--batch_size", "4"])
    assert code == 0
    summary = json.loads(metrics_file.read_text())
    assert summary["count"] == 6
    assert summary["metrics"]["exact_match"] >= 5 / 6, summary
    assert summary["metrics"]["rouge_l"] >= 0.9
    assert summary["base"]["metrics"]["exact_match"] == 0 and summary["base"]["metrics"]["rouge_l"] < 0.2
    assert summary["delta"]["exact_match"] >= 5 / 6
    rows = [json.loads(line) for line in (metrics_file.parent / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ANSWERS
    assert {"prediction", "base_prediction", "scores", "base_scores", "prompt"} <= set(rows[0])
    table = (metrics_file.with_suffix(".md")).read_text()
    assert "| exact_match |" in table and "delta" in table
    assert "| exact_match |" in capsys.readouterr().out


@pytest.mark.slow
def test_batched_generation_gives_the_replies_of_one_at_a_time(memorised):
    from trainer.data.prompts import read_prompts
    from trainer.inference import load_for_inference
    from trainer.merge import stop_token_ids
    from trainer.sampling import default_generation_config, generate_replies

    data, out = memorised
    model, tokenizer = load_for_inference(out)
    prompts = read_prompts(data)
    config = default_generation_config(tokenizer, 12)
    one_by_one = generate_replies(model, tokenizer, prompts, config, stop_token_ids(tokenizer), batch_size=1)
    batched = generate_replies(model, tokenizer, prompts, config, stop_token_ids(tokenizer), batch_size=4)
    assert batched == one_by_one and batched[0] == ANSWERS[0]


@pytest.mark.slow
def test_accuracy_over_labels_with_a_confusion_matrix(memorised, tmp_path):
    data, out = memorised
    metrics_file = tmp_path / "m.json"
    labels = ",".join(ANSWERS)
    assert evaluate.main(["--model", str(out), "--input_file", str(data), "--metrics_file", str(metrics_file),
                          "--labels", labels, "--max_new_tokens", "12"]) == 0
    summary = json.loads(metrics_file.read_text())
    assert summary["metrics"]["accuracy"] >= 5 / 6 and "no_label_rate" in summary["metrics"]
    assert (tmp_path / "m_confusion.png").stat().st_size > 1000


def test_references_files_one_per_line_or_in_blocks(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("a\tb\nc\n", encoding="utf-8")
    assert read_references(lines, 2) == ["a\tb", "c"]
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("first line\nsecond line\n\nother poem\n", encoding="utf-8")
    assert read_references(blocks, 2) == ["first line\nsecond line", "other poem"]
    with pytest.raises(DataError, match="2 lines for 3 prompts"):
        read_references(lines, 3)
    with pytest.raises(DataError, match=r"lines\.txt:1: 6 bytes for 2 reference\(s\), more than 2 bytes each"):
        read_references(lines, 2, max_record_bytes=2)  # refused before it is read whole


def test_bad_arguments_fail_before_any_model_is_loaded(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "q"}\n', encoding="utf-8")
    assert evaluate.main(["--model", str(tmp_path), "--input_file", str(prompts), "--metrics", "bleu9"]) == 2
    assert "unknown metric(s) bleu9" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--input_file", str(prompts)]) == 2
    assert "no answer to score against; give --references" in capsys.readouterr().err


@pytest.mark.slow
def test_tang_test_set_with_its_ground_truth_file(memorised, tmp_path):
    from tests.conftest import DEMO_TEST, DEMO_TEST_GT

    _, out = memorised
    metrics_file = tmp_path / "tang.json"
    assert evaluate.main(["--model", str(out), "--input_file", str(DEMO_TEST), "--references", str(DEMO_TEST_GT),
                          "--metrics_file", str(metrics_file), "--max_new_tokens", "8"]) == 0
    assert json.loads(metrics_file.read_text())["count"] == 5


def test_evaluate_compare_base_and_the_runs_samples_give_the_same_replies_and_scores(tiny_model_dir, tmp_path):
    """The same model and prompts answered as the run's before/after samples and by ``evaluate.py --compare``,
    each with its defaults (the run's sample_max_new_tokens and system prompt from run_config.json): the same
    replies, the same scores. (They used to differ: the samples avoided repeated trigrams and evaluate.py did not,
    so an untrained model looped and scored 0.0000 there while samples.md scored it 0.0216.)"""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import DEMO_TEST, DEMO_TEST_GT
    from trainer.data.prompts import read_prompts, with_references
    from trainer.data.templates import end_of_turn_token_id
    from trainer.samples import SampleRecorder

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    system = "你是一個擅長寫唐詩的助手。"
    (run / "run_config.json").write_text(json.dumps({"data": {"sample_max_new_tokens": 24, "system": system}}),
                                         encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(run)
    stop_ids = sorted({tokenizer.eos_token_id, end_of_turn_token_id(tokenizer, tokenizer.chat_template)} - {None})
    samples = SampleRecorder(with_references(read_prompts(DEMO_TEST, system), DEMO_TEST_GT), tokenizer, stop_ids,
                             24, evaluate.DEFAULT_METRICS)
    samples.record("before", AutoModelForCausalLM.from_pretrained(run))

    metrics_file = tmp_path / "eval" / "metrics.json"
    assert evaluate.main(["--model", str(run), "--compare", str(run), "--input_file", str(DEMO_TEST),
                          "--references", str(DEMO_TEST_GT), "--metrics_file", str(metrics_file)]) == 0
    rows = [json.loads(line) for line in (metrics_file.parent / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads(metrics_file.read_text())
    assert [r["base_prediction"] for r in rows] == [r["prediction"] for r in rows] == samples.replies["before"]
    assert summary["base"]["metrics"] == summary["metrics"] == samples.scores["before"]
    assert any(v > 0 for v in samples.scores["before"].values()), samples.scores  # not a loop scoring 0 everywhere
