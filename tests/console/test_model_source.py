"""Each wrong model path is one sentence naming the flag and the path, before anything loads (no network used)."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import DEMO_RECIPE, run_sft
from trainer.model_source import ModelSourceError, check_hub_model, check_model_source


def _sentence(name: str) -> str:
    with pytest.raises(ModelSourceError) as caught:
        check_model_source(name)
    message = str(caught.value)
    assert message.startswith(f"--model_name_or_path {name}") and "\n" not in message, message
    return message


def test_an_empty_folder(tmp_path):
    assert "the folder is empty" in _sentence(str(tmp_path))


def test_a_config_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    message = _sentence(str(tmp_path))
    assert "no tokenizer" in message and "no weights" in message


def test_a_folder_with_an_adapter_names_its_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert "LoRA adapter" in _sentence(str(tmp_path))


def test_a_path_that_does_not_exist(tmp_path):
    assert "no such folder" in _sentence(str(tmp_path / "nope"))
    assert "no such folder" in _sentence("./models/my-llama")


def test_a_malformed_hub_id_is_not_an_hfvalidationerror():
    assert "neither an existing folder nor a hub id" in _sentence("Qwen/Qwen2.5 0.5B")


def test_a_hub_id_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in _sentence("owner/not-cached")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        check_hub_model("owner/not-cached", "--model_name_or_path", probe=lambda: False)


def test_a_complete_folder_passes(tiny_model_dir):
    check_model_source(str(tiny_model_dir))


@pytest.mark.slow
def test_the_entry_point_says_it_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    start = time.monotonic()
    result = run_sft(DEMO_RECIPE, "--model_name_or_path", str(tmp_path / "empty"), "--output_dir",
                     str(tmp_path / "out"), "--report_to", "none", expect_ok=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model_name_or_path {tmp_path / 'empty'}: the folder is empty; copy a model into it (config.json, "
        "tokenizer files and weights (*.safetensors), as save_pretrained writes them) or give another folder or a "
        "hub id")
    assert "Traceback" not in result.stderr and time.monotonic() - start < 120
