"""Using a trained result: merging an adapter into a standalone model, and generating (test file, before/after
table, stdin) from a run, one of its checkpoints, or a merged folder.

In-process checks build adapters directly on the tiny model; the slow ones share one LoRA run (added tokens,
gradient checkpointing, two checkpoints) and one full fine-tune made by the real entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import DEMO_RECIPE, DEMO_TEST, REPO, run_sft
from trainer import generate, merge
from trainer.args import FinetuneArguments
from trainer.checkpoints import mark_complete
from trainer.data.prompts import to_prompt
from trainer.generate import GenerateError, Item, comparison_table, resolve_model_path, write_results
from trainer.inference import load_for_inference
from trainer.lora import apply_lora
from trainer.model import add_special_tokens, load_model, load_tokenizer, resize_for_tokenizer
from trainer.sampling import default_generation_config

NEW_TOKENS = ["<|im_start|>", "<|im_end|>", "<PAD>"]


def prompt_ids(tokenizer, text: str = "床前明月光<PAD>") -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ in-process: merge


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with an added token and trained embeddings, weights randomised as if trained."""
    folder = tmp_path_factory.mktemp("adapter")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    add_special_tokens(tokenizer, NEW_TOKENS)
    model = load_model(str(tiny_model_dir), finetuning_type="lora")
    resize_for_tokenizer(model, tokenizer)
    model = apply_lora(model, FinetuneArguments("lora"), seed=0, gradient_checkpointing=False, train_embeddings=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_merged_model_equals_base_plus_adapter(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    assert merge.main(["--adapter", str(adapter_dir), "--output", str(out), "--max_shard_size", "200KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "chat_template.jinja").is_file() and not (out / "adapter_config.json").exists()

    with_adapter, tokenizer = load_for_inference(adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = prompt_ids(tokenizer)
    assert torch.equal(prompt_ids(merged_tokenizer), ids)
    assert (logits(merged, ids) - logits(with_adapter, ids)).abs().max() < 1e-4
    assert merged_tokenizer.convert_tokens_to_ids("<|im_end|>") in merged.generation_config.eos_token_id
    assert merged_tokenizer.pad_token == "<PAD>" and merged.config.use_cache


def test_merge_refuses_a_non_empty_folder_without_force(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old-model-00001-of-00009.safetensors").write_text("stale")
    assert merge.main(["--adapter", str(adapter_dir), "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert merge.main(["--adapter", str(adapter_dir), "--output", str(out), "--force"]) == 0
    assert not (out / "old-model-00001-of-00009.safetensors").exists()  # replaced, not mixed
    assert merge.main(["--adapter", str(adapter_dir), "--output", str(adapter_dir), "--force"]) == 2
    assert (adapter_dir / "adapter_config.json").is_file()


def test_merge_explains_a_full_model(tiny_model_dir, tmp_path, capsys):
    assert merge.main(["--adapter", str(tiny_model_dir), "--output", str(tmp_path / "m")]) == 2
    assert "standalone already" in capsys.readouterr().err


# ------------------------------------------------------------------ in-process: checkpoint picker, outputs


def fake_run(root: Path, steps: dict[int, bool], final: bool = False) -> Path:
    for step, complete in steps.items():
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        if complete:
            mark_complete(folder)
    if final:
        (root / "config.json").write_text("{}")
    return root


def test_checkpoint_picker(tmp_path):
    run = fake_run(tmp_path / "run", {2: True, 10: True, 12: False})
    assert resolve_model_path(run, "latest") == run / "checkpoint-10"  # numeric order; incomplete 12 skipped
    assert resolve_model_path(run, "2") == run / "checkpoint-2"
    assert resolve_model_path(run, "checkpoint-10") == run / "checkpoint-10"
    with pytest.raises(GenerateError) as error:
        resolve_model_path(run, "7")
    message = str(error.value)
    assert "checkpoint-2, checkpoint-10" in message and "incomplete, not used: checkpoint-12" in message
    with pytest.raises(GenerateError, match="--checkpoint latest"):
        resolve_model_path(run)  # unfinished run: no final model
    with pytest.raises(GenerateError, match="none"):
        resolve_model_path(fake_run(tmp_path / "empty", {}), "latest")
    finished = fake_run(tmp_path / "done", {3: True}, final=True)
    assert resolve_model_path(finished) == finished


def test_results_file_and_comparison_table(tmp_path):
    items = [Item(to_prompt([{"role": "user", "content": "續寫\n床前明月光"}]), "床前明月光"),
             Item(to_prompt([{"role": "user", "content": "a|b"}, {"role": "assistant", "content": "ref"}]), "a|b")]
    written = write_results(items, ["疑是地上霜", "two\nlines"], tmp_path / "results.txt", ["x", "y"])
    assert [p.name for p in written] == ["results.txt", "results.jsonl"]
    assert (tmp_path / "results.txt").read_text(encoding="utf-8").splitlines() == ["1. 床前明月光疑是地上霜",
                                                                                   "2. a|btwo lines"]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[1]["prediction"] == "two\nlines" and rows[1]["base"] == "y" and rows[1]["reference"] == "ref"
    table = comparison_table(items, ["x", "y"], ["疑是地上霜", "two\nlines"], "base", "tuned").splitlines()
    assert "| # | prompt | before (base) | after (fine-tuned) | reference |" in table
    assert "| 2 | a\\|b | y | two<br>lines | ref |" in table


def test_sampling_options_turn_sampling_on_unless_told_otherwise():
    class Tok:
        pad_token_id = 0

    assert not default_generation_config(Tok(), 8).do_sample
    assert default_generation_config(Tok(), 8, temperature=0.1, top_p=0.3).do_sample
    assert not default_generation_config(Tok(), 8, temperature=0.1, do_sample=False).do_sample
    config = default_generation_config(Tok(), 8, num_beams=2, no_repeat_ngram_size=3)
    assert config.num_beams == 2 and config.no_repeat_ngram_size == 3


# ------------------------------------------------------------------ real runs


TRAIN = ("--per_device_train_batch_size", "2", "--global_batch_size", "2", "--max_length", "128",
         "--warmup_steps", "0", "--logging_steps", "1", "--report_to", "none", "--sample_prompts", "none")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tang_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    run_sft(DEMO_RECIPE, "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tang_slice),
            "--output_dir", str(out), "--finetuning_type", "lora", "--add_special_tokens", ",".join(NEW_TOKENS),
            "--gradient_checkpointing", "true", "--learning_rate", "5e-3", "--max_steps", "4", "--save_steps", "2",
            *TRAIN)
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tang_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    run_sft(DEMO_RECIPE, "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tang_slice),
            "--output_dir", str(out), "--finetuning_type", "full", "--learning_rate", "3e-3", "--max_steps", "2",
            "--save_steps", "1", *TRAIN)
    return out


@pytest.mark.slow
def test_lora_run_saves_an_adapter_that_reloads(lora_run, tiny_model_dir):
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert "embed_tokens" in config["modules_to_save"]
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    model, tokenizer = load_for_inference(lora_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = prompt_ids(tokenizer, "床前明月光")
    vocab = base.config.vocab_size  # the run grew the vocabulary by <PAD>
    assert (logits(model, ids)[..., :vocab] - logits(base, ids)).abs().max() > 1e-3  # adapter there and trained


@pytest.mark.slow
def test_added_tokens_survive_training_saving_and_merging(lora_run, tiny_model_dir, tmp_path):
    trained_tokenizer = AutoTokenizer.from_pretrained(lora_run)
    ids = trained_tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    assert trained_tokenizer.pad_token == "<PAD>" and None not in ids

    out = tmp_path / "merged"
    assert merge.main(["--adapter", str(lora_run), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.convert_tokens_to_ids(NEW_TOKENS) == ids
    assert merged.get_input_embeddings().weight.shape[0] >= len(merged_tokenizer)

    with_adapter, tokenizer = load_for_inference(lora_run)
    prompt = prompt_ids(tokenizer)
    assert ids[2] in prompt[0].tolist() and torch.equal(prompt_ids(merged_tokenizer), prompt)
    assert (logits(merged, prompt) - logits(with_adapter, prompt)).abs().max() < 1e-4

    # The new tokens' embeddings were trained and saved: they moved between checkpoints, and the ChatML rows
    # moved away from the base model's.
    early, _ = load_for_inference(lora_run / "checkpoint-2")
    early_rows = early.merge_and_unload().get_input_embeddings().weight[ids]
    rows = merged.get_input_embeddings().weight[ids]
    assert ((rows - early_rows).abs().sum(dim=1) > 0).all()
    base_rows = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight[ids[:2]]
    assert ((rows[:2] - base_rows).abs().sum(dim=1) > 0).all()


@pytest.mark.slow
def test_generate_test_file_with_before_after_table(lora_run, tmp_path, capsys):
    records = json.loads(DEMO_TEST.read_text(encoding="utf-8"))
    results = tmp_path / "results.txt"
    assert resolve_model_path(lora_run, "latest") == lora_run / "checkpoint-4"
    code = generate.main(["--model", str(lora_run), "--checkpoint", "latest", "--compare", "base",
                          "--input_file", str(DEMO_TEST), "--output_file", str(results), "--max_new_tokens", "8",
                          "--no_repeat_ngram_size", "3"])
    assert code == 0
    lines = results.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records) == 5
    assert all(line.startswith(f"{i + 1}. {r['input']}") for i, (line, r) in enumerate(zip(lines, records)))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5 and all("prediction" in r and "base" in r for r in rows)
    assert any(r["prediction"] != r["base"] for r in rows)  # the fine-tune changed something
    table = (tmp_path / "results_compare.md").read_text(encoding="utf-8")
    assert "before (base)" in table and "after (fine-tuned)" in table and "checkpoint-4" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 6  # header + 5 prompts

    assert generate.main(["--model", str(lora_run), "--checkpoint", "9", "--prompt", "hi"]) == 2
    assert "checkpoint-2, checkpoint-4" in capsys.readouterr().err


@pytest.mark.slow
def test_full_finetune_checkpoints_reload_and_generate_from_a_pipe(full_run, tiny_model_dir, capsys):
    final, tokenizer = load_for_inference(full_run)
    latest, _ = load_for_inference(resolve_model_path(full_run, "latest"))
    ids = prompt_ids(tokenizer, "床前明月光")
    assert (logits(final, ids) - logits(latest, ids)).abs().max() < 1e-6  # checkpoint-2 is the final model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (logits(final, ids) - logits(base, ids)).abs().max() > 1e-3
    assert merge.main(["--adapter", str(full_run), "--output", str(full_run.parent / "m")]) == 2

    result = subprocess.run(
        [sys.executable, str(REPO / "trainer" / "generate.py"), "--model", str(full_run), "--max_new_tokens", "6"],
        input="床前明月光\n\n春眠不覺曉\n", capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2  # one reply per non-empty line, nothing else on stdout


def test_help_explains_the_options():
    help_text = generate.build_parser().format_help()
    for option in ("--checkpoint", "--compare", "--input_file", "--output_file", "--temperature", "--top_p",
                   "--top_k", "--no_repeat_ngram_size", "--do_sample", "--num_beams", "--seed", "--system"):
        assert option in help_text, option
    assert "--force" in merge.build_parser().format_help()

