"""Config: project defaults < recipe < flags; every recipe in recipes/ parses; global-batch arithmetic."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from trainer.args import DEFAULT_RECIPE, ConfigError, parse_config
from trainer.batch import BatchSizeError, gradient_accumulation_for

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses(recipe):
    cfg = parse_config([str(recipe), "--use_cpu", "true", "--bf16", "false"])
    assert cfg.recipe == recipe
    assert cfg.training.output_dir.startswith("outputs/")
    assert cfg.model.model_name_or_path


def test_reference_hyperparameters_reach_the_config():
    cfg = parse_config([str(REPO / "recipes" / "tang_breeze_qlora.yaml"), "--use_cpu", "true", "--bf16", "false"])
    assert (cfg.finetune.finetuning_type, cfg.finetune.lora_r, cfg.finetune.lora_alpha) == ("qlora", 8, 16)
    assert cfg.finetune.lora_dropout == 0.05 and cfg.training.learning_rate == 3e-4
    assert cfg.data.template == "llama2" and cfg.data.max_length == 256 and cfg.finetune.global_batch_size == 16
    assert cfg.tracking.swanlab_project == "tang-poems"  # from the recipe's swanlab: section


def test_flags_override_the_recipe_and_no_recipe_means_the_default():
    cfg = parse_config(["--learning_rate", "0.5", "--max_length", "64", "--packing", "false"])
    assert cfg.recipe == DEFAULT_RECIPE
    assert cfg.training.learning_rate == 0.5 and cfg.data.max_length == 64 and cfg.data.packing is False
    assert cfg.model.model_name_or_path == "builtin:tiny-llama"
    assert cfg.sources["learning_rate"] == "command line" and cfg.sources["num_train_epochs"].startswith("recipe")


@pytest.mark.parametrize("flag", [["--dataset", "mine.jsonl"], ["--model_name_or_path", "some/model"]])
def test_the_demo_recipe_applies_only_when_nothing_says_what_to_train(flag):
    cfg = parse_config(flag)
    assert cfg.recipe is None
    # project defaults, not the demo's learning rate, packing, output folder or global batch
    assert cfg.training.learning_rate == 5e-5 and cfg.data.packing is False
    assert cfg.training.output_dir == "outputs/run" and cfg.finetune.global_batch_size is None


def test_abbreviated_flags_are_refused():
    with pytest.raises(ConfigError, match="unrecognised argument"):
        parse_config(["--learn", "0.1"])


def _accumulation(argv: list[str]) -> int:
    from trainer.sft import apply_global_batch

    cfg = parse_config(argv)
    apply_global_batch(cfg, 1)
    return cfg.training.gradient_accumulation_steps


def test_explicit_accumulation_wins_over_a_recipe_global_batch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("global_batch_size: 8\nper_device_train_batch_size: 4\n")
    assert _accumulation([str(recipe)]) == 2
    assert _accumulation([str(recipe), "--gradient_accumulation_steps", "1000"]) == 1000
    assert _accumulation([str(recipe), "--global_batch_size", "16"]) == 4  # a flag over the recipe: computed


def test_global_batch_and_accumulation_that_disagree_on_one_level_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--global_batch_size 8 and --gradient_accumulation_steps 3"):
        _accumulation(["--dataset", "x", "--per_device_train_batch_size", "4", "--global_batch_size", "8",
                       "--gradient_accumulation_steps", "3"])
    assert _accumulation(["--dataset", "x", "--per_device_train_batch_size", "4", "--global_batch_size", "8",
                          "--gradient_accumulation_steps", "2"]) == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text("global_batch_size: 8\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n")
    with pytest.raises(ConfigError, match=f"recipe {recipe}"):
        _accumulation([str(recipe)])


def test_bad_recipe_and_flags_say_what_is_wrong(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-4\nlearnign_rate: 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown option\(s\) learnign_rate"):
        parse_config([str(recipe)])
    with pytest.raises(ConfigError, match="recipe file not found"):
        parse_config([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="--finetuning_type 'qlra'"):
        parse_config(["--finetuning_type", "qlra"])
    with pytest.raises(ConfigError, match="unrecognised argument"):
        parse_config(["--no_such_flag", "1"])


@pytest.mark.parametrize(("global_batch", "per_device", "world", "expected"),
                         [(16, 4, 1, 4), (16, 4, 2, 2), (16, 4, 4, 1), (16, 2, 8, 1), (48, 2, 3, 8)])
def test_gradient_accumulation_keeps_the_global_batch(global_batch, per_device, world, expected):
    accumulation = gradient_accumulation_for(global_batch, per_device, world)
    assert accumulation == expected and accumulation * per_device * world == global_batch


@pytest.mark.parametrize(("global_batch", "per_device", "world"), [(16, 4, 3), (10, 4, 1), (0, 1, 1), (4, 4, 2)])
def test_global_batch_that_does_not_divide_is_an_error(global_batch, per_device, world):
    with pytest.raises(BatchSizeError, match=f"--global_batch_size {global_batch} is not a multiple"):
        gradient_accumulation_for(global_batch, per_device, world)
