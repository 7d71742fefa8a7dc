"""Bad input and bad configuration: exit code 2 and one clear message naming the file and line, before any model
is loaded. The entry point's ``main`` runs in-process (the same code as the command line) to keep the table fast;
one case also runs as a real process to pin the exit code seen by shells and schedulers.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_sft
from trainer import sft

GOOD = {"instruction": "寫詩", "input": "床前明月光", "output": "疑是地上霜"}
LONG = "".join(chr(0x4E00 + i) for i in range(0, 4000, 10))  # 400 distinct characters: hundreds of tokens


def jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"


BAD_DATA = {
    # name: (file name, content (str or bytes), expected message fragment)
    "malformed json array": ("d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",,}\n]',
                             "d.json:3:"),
    "malformed jsonl line": ("d.jsonl", jsonl(GOOD, GOOD, '{"instruction": "x", "output": '), "d.jsonl:3:"),
    "missing field": ("d.jsonl", jsonl(GOOD, {"instruction": "no answer"}), "d.jsonl:2:"),
    "wrong type": ("d.jsonl", jsonl(GOOD, GOOD, {"instruction": ["a", "list"], "output": "x"}), "d.jsonl:3:"),
    "empty answer": ("d.jsonl", jsonl({"instruction": "q", "output": "   "}), "d.jsonl:1:"),
    "roles do not alternate": (
        "d.jsonl", jsonl(GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "assistant", "content": "c"}]}), "d.jsonl:2:"),
    "ends on the user": ("d.jsonl", jsonl({"messages": ["q", "a", "q2"]}), "d.jsonl:1:"),
    "not utf-8": ("d.jsonl", jsonl(GOOD).encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n', "d.jsonl:2:"),
    "empty file": ("d.jsonl", "", "d.jsonl"),
    "lone surrogate": ("d.jsonl", jsonl(GOOD, '{"instruction": "\\ud800", "output": "x"}'), "d.jsonl:2: field"),
    "nested 100,000 deep": ("d.json", "[\n" + "[" * 100_000 + "]" * 100_000 + "\n]", "d.json:2: JSON nested"),
    "lone surrogate in a document": ("d.jsonl", jsonl({"text": "fine"}, '{"text": "a\\udc00"}'),
                                     "d.jsonl:2: field 'text' holds a lone surrogate U+DC00"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_names_file_and_line(case, tmp_path, capsys):
    name, content, expected = BAD_DATA[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = sft.main(["--dataset", str(path), "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {tmp_path}/{expected}" in err or (expected in err and str(path) in err), err
    assert "attention" not in err  # failed before the model was loaded (that log line names the backend)


def test_skip_lists_every_bad_record_in_the_report(tmp_path, tang_slice):
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(GOOD, {"instruction": "q"}, GOOD, "{oops", GOOD), encoding="utf-8")
    out = tmp_path / "out"
    code = sft.main(["--dataset", str(data), "--on_bad_record", "skip", "--output_dir", str(out),
                     "--report_to", "none", "--max_steps", "1", "--sample_prompts", "none", "--max_length", "64"])
    assert code == 0
    report = json.loads((out / "data_report.json").read_text())
    assert [(s["line"], s["index"]) for s in report["skipped_records"]] == [(2, 1), (4, 3)]
    assert report["train_examples"] == 3


def test_a_record_over_max_record_mb_is_named_with_its_size(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(GOOD, {"instruction": "q", "output": "x" * 2000}), encoding="utf-8")
    code = sft.main(["--dataset", str(path), "--max_record_mb", "0.001", "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {path}:2: record of 2,034 bytes is over the limit of 1,048 bytes" in err, err


def test_a_txt_file_over_max_record_mb_is_named_with_its_size(tmp_path, capsys):
    path = tmp_path / "book.txt"
    path.write_text("x" * 2000, encoding="utf-8")
    code = sft.main(["--dataset", str(path), "--max_record_mb", "0.001", "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {path}:1: text file (one document) of 2,000 bytes is over the limit of 1,048" \
        in err, err


def test_overlong_examples_are_counted(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(GOOD, {"instruction": "q", "output": LONG}, GOOD), encoding="utf-8")
    for mode, field in (("truncate", "truncated"), ("drop", "dropped_overlong")):
        out = tmp_path / mode
        assert sft.main(["--dataset", str(data), "--model_name_or_path", str(tiny_model_dir),
                         "--on_overlong", mode, "--max_length", "192", "--max_steps", "1",
                         "--output_dir", str(out), "--report_to", "none", "--sample_prompts", "none"]) == 0
        report = json.loads((out / "data_report.json").read_text())
        assert report[field] == 1
        assert report["train_examples"] == (3 if mode == "truncate" else 2)


def _tampered_copy(tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "Tang_training_data.json").write_text(json.dumps([GOOD]), encoding="utf-8")
    return folder


BAD_CONFIG = {
    "unknown dataset": (["--dataset", "no_such_set"], "no_such_set"),
    "checksum mismatch": (["--dataset", "tang", "--data_dir", "{copies}"], "sha256"),
    "global batch does not divide": (["--global_batch_size", "10", "--per_device_train_batch_size", "4"],
                                     "--global_batch_size 10 is not a multiple"),
    "missing deepspeed config": (["--deepspeed", "ds_configs/zero9.json"], "--deepspeed ds_configs/zero9.json"),
    "resume path without checkpoint": (["--resume_from_checkpoint", "{tmp}"], "no checkpoint there"),
    "flash attention absent": (["--attn_implementation", "flash_attention_2"], "flash_attn"),
    "bad recipe key": (["{recipe}"], "unknown option(s) learnign_rate"),
    # Named by the recipe file and key, not as a command-line argument (argparse's "argument --learning_rate:").
    "bad recipe value": (["{recipe_value}"], "value.yaml: learning_rate: 'abc' is not a number"),
    "bad recipe number": (["{recipe_int}"], "int.yaml: max_length: 1.5 is not a whole number"),
    "bad recipe choice": (["{recipe_choice}"], "choice.yaml: finetuning_type 'foo': expected one of full, lora"),
    "bad recipe choice of transformers": (["{recipe_enum}"], "enum.yaml: lr_scheduler_type: 'cosin' is not one of"),
    "invalid deepspeed json": (["--deepspeed", "{ds}"], "ds.json:2:35: --deepspeed: not valid JSON: Expecting"),
    "invalid deepspeed json in a recipe": (["{recipe_ds}"], "ds.json:2:35: --deepspeed: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_configuration_is_explained(case, tmp_path, tang_slice, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"learnign_rate": 1}))
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": "auto",\n "zero_optimization": {"stage": 2,}\n}')
    fill = {"{copies}": str(_tampered_copy(tmp_path)), "{tmp}": str(tmp_path), "{recipe}": str(recipe),
            "{ds}": str(ds)}
    for name, values in (("value", {"learning_rate": "abc"}), ("int", {"max_length": 1.5}),
                         ("choice", {"finetuning_type": "foo"}), ("enum", {"lr_scheduler_type": "cosin"}),
                         ("ds", {"deepspeed": str(ds)})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"dataset": str(tang_slice), **values}))
        fill[f"{{recipe_{name}}}"] = str(path)
    argv, expected = BAD_CONFIG[case]
    argv = [fill.get(a, a) for a in argv]
    defaults = [] if argv[0].endswith(".yaml") else ["--dataset", str(tang_slice)]
    code = sft.main([*argv, *([] if "--dataset" in argv else defaults), "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none", "--sample_prompts", "none"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err


def test_exit_code_of_the_real_process(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(GOOD, "{broken"), encoding="utf-8")
    result = run_sft("--dataset", str(path), "--report_to", "none", "--output_dir", str(tmp_path / "o"),
                     expect_ok=False)
    assert result.returncode == 2
    assert f"{path}:2:" in result.stderr
    assert "Traceback" not in result.stderr


def test_deepspeed_json_given_to_the_launcher_is_checked_too(tmp_path, monkeypatch, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}\n "bf16": true}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))  # what `accelerate launch` passes its process
    assert sft.main(["--dataset", "x.jsonl", "--output_dir", str(tmp_path / "out")]) == 2
    assert f"error: {ds}:2:2: accelerate launch --deepspeed_config_file: not valid JSON" in capsys.readouterr().err


def test_recipe_values_of_the_right_kind_pass_as_yaml_wrote_them(tmp_path):
    from trainer.args import parse_config

    recipe = tmp_path / "ok.yaml"
    recipe.write_text(yaml.safe_dump({"max_length": 64.0, "learning_rate": 1, "report_to": ["none"],
                                      "lr_scheduler_type": "cosine", "packing": 1, "max_samples": None,
                                      "swanlab": {"project": "p"}}))
    cfg = parse_config([str(recipe)])
    assert cfg.data.max_length == 64 and isinstance(cfg.data.max_length, int)
    assert cfg.training.learning_rate == 1.0 and cfg.training.report_to == []  # transformers: "none" is no tracker
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.tracking.swanlab_project == "p"
    assert cfg.data.packing is True
