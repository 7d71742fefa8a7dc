"""A resume is the same run: each changed setting is named with both values; what the checkpoint restores cannot be
changed; named data changes can be accepted knowingly."""

from __future__ import annotations

import logging

import pytest

from trainer.run.settings import CONTENT, ResumeChangeError, check_resume, write_settings

OLD = {"dataset": "a.jsonl", CONTENT + "/d/a.jsonl": "1a2b3c4d5e6f7a8b9c0d", "tokenizer": "f" * 64,
       "template": "e" * 64, "max_length": 128, "packing": True, "seed": 7, "global_batch_size": 8,
       "learning_rate": 1e-3, "model_name_or_path": "builtin:tiny-llama"}


def test_each_change_is_named_with_both_values(tmp_path):
    write_settings(tmp_path, OLD)
    new = {**OLD, CONTENT + "/d/a.jsonl": "9999aaaabbbbccccdddd", "max_length": 256, "global_batch_size": 16}
    with pytest.raises(ResumeChangeError) as refused:
        check_resume(tmp_path, new, None)
    message = str(refused.value)
    assert f"cannot resume from {tmp_path}: it would change what the run trains on" in message
    assert "the content of /d/a.jsonl sha256 1a2b3c4d5e6f… → sha256 9999aaaabbbb…" in message
    assert "--max_length 128 → 256" in message and "--global_batch_size 8 → 16" in message
    assert "--allow_resume_changes dataset,max_length,global_batch_size" in message
    assert "\n" not in message


def test_restored_settings_cannot_change(tmp_path):
    """The Trainer restores the learning rate from the checkpoint's optimizer and scheduler: a new one is ignored."""
    write_settings(tmp_path, OLD)
    with pytest.raises(ResumeChangeError, match=r"restore --learning_rate 0.001, so 1e-05 would be ignored"):
        check_resume(tmp_path, {**OLD, "learning_rate": 1e-5}, "all")


def test_accepted_changes_are_returned_for_the_record(tmp_path, caplog):
    write_settings(tmp_path, OLD)
    with caplog.at_level(logging.WARNING):
        accepted = check_resume(tmp_path, {**OLD, "dataset": "a.jsonl,b.jsonl", CONTENT + "/d/b.jsonl": "00"},
                                "dataset")
    assert accepted == ['--dataset "a.jsonl" → "a.jsonl,b.jsonl"', "the content of /d/b.jsonl unset → 00"]
    assert "accepted by --allow_resume_changes" in caplog.text
    assert check_resume(tmp_path, dict(OLD), None) == []


def test_a_checkpoint_without_settings_is_resumed_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert check_resume(tmp_path, OLD, None) == []
    assert "records no run settings" in caplog.text


def test_every_setting_is_named_by_a_flag_the_user_can_pass(tmp_path, tiny_model_dir):
    """A refusal names each change by its flag, and --allow_resume_changes takes that name: the data options are
    recorded as the flags set them (``--max_record_mb`` in MiB, not the reader's byte count)."""
    from trainer.args import build_parser, parse_config
    from trainer.preparation import setup_data
    from trainer.run.settings import run_settings

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    cfg = parse_config(["--dataset", str(data), "--model_name_or_path", str(tiny_model_dir), "--max_record_mb", "2",
                        "--output_dir", str(tmp_path / "out")])
    settings = run_settings(cfg, setup_data(cfg), world_size=1)
    assert settings["max_record_mb"] == 2
    flags = {action.dest for action in build_parser()._actions}
    named = [n for n in settings if not n.startswith(CONTENT) and n not in ("tokenizer", "template")]
    assert [n for n in named if n not in flags] == []


def test_a_changed_sequence_parallel_size_is_refused_and_a_checkpoint_from_before_the_flag_means_1(tmp_path):
    write_settings(tmp_path, {**OLD, "sequence_parallel_size": 2})
    with pytest.raises(ResumeChangeError, match="--sequence_parallel_size 2 → 1"):
        check_resume(tmp_path, {**OLD, "sequence_parallel_size": 1}, None)
    write_settings(tmp_path, OLD)  # written before --sequence_parallel_size existed: trained without it
    assert check_resume(tmp_path, {**OLD, "sequence_parallel_size": 1}, None) == []
    with pytest.raises(ResumeChangeError, match="--sequence_parallel_size 1 → 2"):
        check_resume(tmp_path, {**OLD, "sequence_parallel_size": 2}, None)
