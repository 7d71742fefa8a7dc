"""The real entry point, end to end, in a subprocess: what a user gets from one command."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import DEMO_TEST, REPO, run_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tang_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_sft(
        str(REPO / "recipes" / "tiny_tang.yaml"),
        "--dataset", str(tang_slice), "--output_dir", str(out), "--max_steps", "12", "--logging_steps", "1",
        "--report_to", "none", "--num_sample_prompts", "2", "--sample_max_new_tokens", "8",
        "--sample_prompts", str(DEMO_TEST),
        "--save_steps", "6",
    )
    return out, result


def test_loss_goes_down_and_outputs_are_complete(trained):
    out, result = trained
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert all(h["tokens_per_second"] > 0 and h["label_tokens_per_second"] > 0 for h in history if "loss" in h)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "loss.png",
                 "data_report.json", "samples.md", "samples.json", "train_results.json", "run_config.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_examples"] == 64 and report["packing"]["efficiency"] > 0.9
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and {"before", "after"} <= set(samples[0])
    assert "world size 1" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert all((p / "COMPLETE").is_file() for p in out.glob("checkpoint-*"))


def test_saved_model_reloads_and_generates(trained):
    out, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "床前明月光"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0, -1].item() != tokenizer.convert_tokens_to_ids("<|im_end|>")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert torch.isfinite(model(**prompt).logits).all()


def test_finished_run_is_not_overwritten(trained, tang_slice):
    out, _ = trained
    result = run_sft("--dataset", str(tang_slice), "--output_dir", str(out), "--max_steps", "1",
                     "--report_to", "none", expect_ok=False)
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr and "--overwrite_output_dir" in result.stderr


def test_help_explains_our_options_and_trainer_options():
    result = run_sft("--help")
    for option in ("--model_name_or_path", "--dataset", "--template", "--packing", "--finetuning_type",
                   "--global_batch_size", "--learning_rate", "--resume_from_checkpoint", "--swanlab_mode"):
        assert option in result.stdout, option
