"""Every record format through the real entry point: ``--preview`` shows it as trained, a run trains it, and a
2-process run on a mixture of text, tool trajectories and completions ends with the weights of a 1-process run.

The model is the built-in tiny Llama with its tokenizer trained on the generated data and Qwen2.5's published
chat template (it renders tools, calls and results); the data is generated (``tests/generated_data.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import REPO, run_sft
from tests.e2e.test_distributed import relative_difference, weights
from tests.generated_data import all_texts, write_all
from trainer import sft
from trainer.data.templates import IGNORE_INDEX

TEMPLATE = REPO / "tests" / "data" / "chat_templates" / "qwen2_5.jinja"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("kinds"), n=12)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    from trainer.tiny import build_tiny_model

    built = build_tiny_model("builtin:tiny-llama", all_texts(), seed=0)
    folder = tmp_path_factory.mktemp("model") / "tiny-tools"
    shutil.copytree(built, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE.read_text(encoding="utf-8")
    tokenizer.save_pretrained(folder)
    return folder


def _preview(model: Path, data: Path, out: Path, capsys, *extra: str) -> tuple[list[dict], str]:
    code = sft.main(["--model_name_or_path", str(model), "--dataset", str(data), "--preview", "40",
                     "--max_length", "1024", "--output_dir", str(out), *extra])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, printed


def _trained(row: dict, tokenizer) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def test_preview_shows_each_format_as_it_is_trained(files, tool_model, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    rows, printed = _preview(tool_model, files["tools"], tmp_path / "tools", capsys)
    assert len(rows) == 12 and "<tool_call>" in _trained(rows[0], tokenizer)
    assert printed.count("<tool_response>") >= 12 * 3
    for line in printed.split("<tool_response>")[1:]:  # tool results shown, never inside the trained marks
        assert "«" not in line.split("</tool_response>")[0] and "»" not in line.split("</tool_response>")[0]
    rows, printed = _preview(tool_model, files["sharegpt"], tmp_path / "sharegpt", capsys)
    assert '"name": "get_weather"' in _trained(rows[0], tokenizer)
    rows, printed = _preview(tool_model, files["corpus"], tmp_path / "corpus", capsys, "--max_length", "256")
    assert "document chunk 1/" in printed and len(rows) > 12  # long documents split, the chunks said
    assert all(r["labels"][1:] == r["input_ids"][1:] for r in rows)  # every token trained
    rows, printed = _preview(tool_model, files["book"], tmp_path / "book", capsys)
    assert len(rows) > 1 and _trained(rows[-1], tokenizer).endswith("</s>")  # EOS ends the last chunk
    rows, printed = _preview(tool_model, files["completions"], tmp_path / "completions", capsys)
    assert _trained(rows[1], tokenizer) == " 2</s>" and "A:« 2</s>»" in printed
    rows, printed = _preview(tool_model, files["chat_completions"], tmp_path / "chat", capsys)
    assert _trained(rows[0], tokenizer) == "City0<|im_end|>"  # not the prompt's own assistant turn
    assert "Which list?<|im_end|>" in printed and "«Which list?" not in printed


def _run_args(files: dict[str, Path], model: Path, out: Path) -> list[str]:
    spec = ",".join(f"{files[k]}:{w}" for k, w in [("corpus", 0.25), ("book", 0.05), ("tools", 0.3),
                                                   ("sharegpt", 0.15), ("completions", 0.1),
                                                   ("chat_completions", 0.15)])
    return ["--model_name_or_path", str(model), "--dataset", spec, "--output_dir", str(out), "--report_to", "none",
            "--sample_prompts", "none", "--max_length", "1024", "--packing", "true",
            "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--max_steps", "2",
            "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3", "--seed", "5"]


@pytest.mark.slow
def test_a_mixture_of_every_kind_trains_and_two_processes_match_one(files, tool_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_sft(*_run_args(files, tool_model, one))
    result = run_sft(*_run_args(files, tool_model, two), nproc=2)
    assert "world size 2" in result.stderr
    assert relative_difference(weights(one), weights(two)) < 1e-5
    report = json.loads((two / "data_report.json").read_text(encoding="utf-8"))
    by_name = {Path(s["name"]).stem: s for s in report["sources"]}
    assert {Path(f["path"]).name: f["format"] for f in report["files"]} == {
        "corpus.jsonl": "text", "book.txt": "text", "tools.jsonl": "messages", "sharegpt_tools.json": "sharegpt",
        "completions.jsonl": "prompt_completion", "chat_completions.jsonl": "conversational_prompt_completion"}
    assert by_name["corpus"]["documents"] == 12 and by_name["book"]["documents"] == 1
    assert by_name["tools"]["tool_call_turns"] == 24 and by_name["sharegpt_tools"]["tool_call_turns"] == 12
    assert by_name["tools"]["tool_result_tokens"] > 0 and report["truncated"] == 0
    assert all(s["mixed_examples"] > 0 for s in report["sources"])  # every kind in the trained mixture
    history = json.loads((two / "trainer_state.json").read_text())["log_history"]
    assert all(h["loss"] == h["loss"] for h in history if "loss" in h)  # finite, not NaN
    lines = [line.split("sft: ", 1)[-1] for line in result.stderr.splitlines()]  # the summary is one log message
    start = lines.index(next(line for line in lines if line.startswith("data: ") and "file(s)" in line))
    summary = [line for line in lines[start:start + 6] if line.startswith(("data: ", "mixing: ", "packing: "))]
    assert any("tool-call turn(s) trained" in line for line in summary)
    print("\n" + "\n".join(summary))  # the data report of a mixed run, for the record (pytest -s)


def test_a_base_model_without_chat_template_trains_text_and_refuses_chats_by_line(files, tool_model, tmp_path,
                                                                                 capsys):
    base = tmp_path / "base"
    shutil.copytree(tool_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    rows, _ = _preview(base, files["corpus"], tmp_path / "text", capsys)  # continued pretraining needs no template
    assert rows and all(r["labels"][1:] == r["input_ids"][1:] for r in rows)
    code = sft.main(["--model_name_or_path", str(base), "--dataset", str(files["tools"]), "--preview", "1",
                     "--output_dir", str(tmp_path / "chat")])
    assert code == 2 and f"{files['tools']}:1: chat template: --template auto: the tokenizer has no chat template" \
        in capsys.readouterr().err
    from trainer.args import ConfigError
    from trainer.data.prompts import to_prompt
    from trainer.samples import SampleRecorder

    with pytest.raises(ConfigError, match="--sample_prompts none"):  # said before training, not a crash after it
        SampleRecorder([to_prompt([{"role": "user", "content": "hi"}])], AutoTokenizer.from_pretrained(base), [2], 4)
