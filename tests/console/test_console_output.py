"""The console during training: compact numeric lines, no known library noise, no warning on a tied head."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import DEMO_RECIPE, run_sft
from trainer.callbacks.console_log import other_line, train_line
from trainer.console.noise import KNOWN_NOISE, silence_known_noise
from trainer.console.tied_keys import tied_missing_keys, without_tied_keys

NOISE = ("gemm_4bit_forward", "Setting accelerator to CPU", "Do not forget to share", "There were missing keys")


def test_the_compact_line():
    logs = {"loss": 7.00812, "grad_norm": 0.68377, "learning_rate": 0.002984, "tokens_per_second": 3619.2,
            "label_tokens_per_second": 1301.4, "peak_memory_gib": 0.8512, "epoch": 0.1}
    assert train_line(logs, 20, 176, 87.2) == (
        "step 20/176 · loss 7.0081 · lr 2.98e-03 · grad norm 0.6838 · 3,619 tok/s (1,301 labelled) · 0.85 GiB · "
        "ETA 1m27s")
    assert other_line({"eval_loss": 6.91234, "eval_rouge_l": 0.0216, "eval_runtime": 3.2, "epoch": 1.0}, 40) == \
        "eval at step 40 · loss 6.9123 · rouge_l 0.0216 · runtime 3s"
    assert other_line({"train_runtime": 3725.0, "train_loss": 8.78741, "total_flos": 5e10}, 176) == \
        "done at step 176 in 1h02m · train_loss 8.7874"


def test_known_noise_is_dropped_and_the_rest_of_the_logger_kept(caplog):
    silence_known_noise()
    bnb = next(n for n in KNOWN_NOISE if n.logger.startswith("bitsandbytes"))
    with caplog.at_level(logging.WARNING):
        logging.getLogger(bnb.logger).warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. "
                                              "Please make sure you already `pip install kernels`", "x")
        logging.getLogger(bnb.logger).warning("a real warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "a real warning" in messages
    assert any("gemm_4bit" in m for m in messages) != bnb.harmless_when()


def _tiny(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_a_missing_head_is_only_excused_when_it_is_tied(tied):
    model = _tiny(tied)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    result = model.load_state_dict(state, strict=False)
    assert "lm_head.weight" in result.missing_keys
    assert tied_missing_keys(model, result.missing_keys) == ({"lm_head.weight"} if tied else set())
    assert without_tied_keys(model, result).missing_keys == ([] if tied else ["lm_head.weight"])
    partial = {k: v for k, v in state.items() if "embed_tokens" not in k}  # the shared matrix itself missing
    result = model.load_state_dict(partial, strict=False)
    assert not tied_missing_keys(model, result.missing_keys)


@pytest.mark.slow
def test_a_short_run_shows_compact_lines_and_no_noise(tang_slice, tmp_path):
    out = tmp_path / "out"
    common = [DEMO_RECIPE, "--dataset", str(tang_slice), "--output_dir", str(out), "--report_to", "none",
              "--sample_prompts", "none", "--logging_steps", "1", "--save_steps", "2"]
    first = run_sft(*common, "--max_steps", "2")
    resumed = run_sft(*common, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    for result in (first, resumed):
        output = result.stdout + result.stderr
        assert not [n for n in NOISE if n in output], output
        assert "{'loss'" not in output
    assert "step 2/2 · loss " in first.stdout and " tok/s (" in first.stdout and "ETA " in first.stdout
    assert "step 3/3 · loss " in resumed.stdout
