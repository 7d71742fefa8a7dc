"""Our own options as small documented dataclasses; everything else is ``transformers.TrainingArguments``.

One parser merges, in increasing precedence: project defaults, a YAML recipe, command-line flags. Every
TrainingArguments option keeps its own name, so Hugging Face docs and habits carry over. A recipe may group
SwanLab options under a ``swanlab:`` section (``swanlab: {project: p}`` is ``--swanlab_project p``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from trainer.config_files import ConfigError, check_json_file, check_recipe_values, option_name
from trainer.data.formats import DEFAULT_MAX_RECORD_MB
from trainer.metrics import resolve_metric_names

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny_tang.yaml"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="builtin:tiny-llama",
        metadata={
            "help": "Hub id or local folder of the base model. 'builtin:tiny-llama' is a ~2M-parameter Llama built "
            "locally (tokenizer trained on your data) that runs the whole pipeline on a CPU in minutes."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "auto | flash_attention_2 | sdpa | eager | flex_attention. auto = flash_attention_2 when the "
            "flash_attn package and a CUDA device are present, else sdpa."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the loaded weights: auto | float32 | bfloat16 | float16. auto = float32 for full "
            "fine-tuning (mixed precision comes from --bf16), bfloat16 for LoRA/QLoRA on CUDA, float32 on CPU."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (opt-in)."})
    add_special_tokens: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of tokens to add as special tokens (e.g. '<|im_start|>,<|im_end|>'); embeddings are "
            "resized to a multiple of 64 and trained/saved with the adapter."
        },
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="tang",
        metadata={
            "help": "Comma-separated sources: registered names (data/datasets.yaml), .json/.jsonl/.parquet/.txt files, "
            "folders of them, datasets.save_to_disk folders or hub names (owner/name). 'a.jsonl:0.7,tang:0.3' "
            "mixes by weight (see --mix_by)."
        },
    )
    mix_by: str = field(
        default="examples",
        metadata={
            "help": "examples | tokens: what mixing weights are shares of. The mixture is as large as possible "
            "without repeating an example; what is left out of each source is counted in the data report."
        },
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation data, same syntax as --dataset."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with local copies of registered datasets (or env SFT_DATA_DIR)."}
    )
    template: str = field(
        default="auto",
        metadata={
            "help": "Chat template: auto (the tokenizer's own) | chatml | llama2 ([INST] <<SYS>> format). Each "
            "reply is trained exactly as inference renders it; templates that re-render history (Qwen3, "
            "DeepSeek-R1, Mistral v0.3 with a system prompt, gpt-oss) get one example per assistant turn."
        },
    )
    enable_thinking: bool | None = field(
        default=None,
        metadata={"help": "true | false: passed to chat templates that read it (Qwen3, GLM-4.5, SmolLM3). Unset: "
                  "the template's own default."},
    )
    missing_reasoning: str = field(
        default="error",
        metadata={"help": "error | empty: a plain answer (no reasoning) where the chat template's generation prompt "
                  "opens a reasoning block (DeepSeek-R1 distills, QwQ): an error, or train the template's empty "
                  "block ('<think>\\n\\n</think>\\n\\n') before the answer."},
    )
    system: str | None = field(
        default=None, metadata={"help": "System prompt added to conversations that have none."}
    )
    max_length: int = field(default=1024, metadata={"help": "Longest example (and packed row) in tokens."})
    on_overlong: str = field(
        default="truncate",
        metadata={"help": "Examples longer than --max_length: truncate | drop (both counted). Text documents are "
                  "never cut short: truncate splits them into consecutive chunks, drop drops them."},
    )
    on_bad_record: str = field(
        default="error",
        metadata={"help": "error: stop at the first bad record (file:line named) | skip: skip and list in report."},
    )
    max_record_mb: float = field(
        default=DEFAULT_MAX_RECORD_MB,
        metadata={"help": "Largest record read, in MiB: a bigger one is a bad record (file:line and size named; "
                  "see --on_bad_record), refused before it is read whole or tokenised (tokenising takes ~75-200x "
                  "a record's size in memory). The default holds a million-token conversation."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack examples into rows of --max_length (best-fit-decreasing); examples never attend to each "
            "other (per-example attention from position_ids on every backend)."
        },
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Unpacked data: flatten each micro-batch into one row (no padding)."}
    )
    val_size: float = field(
        default=0.0, metadata={"help": "Held-out share (<1) or count (>=1) of the training data for evaluation."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Worker processes for tokenisation (default: for data over 20 MB on 4+ cores, one per core "
                  "but one, at most 8; else none)."},
    )
    prepared_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where prepared data (tokenised, packed, memory-mapped) is kept, one folder per content key "
            "(default: $SFT_CACHE_DIR/prepared). Put it on a shared filesystem for multi-node jobs; see "
            "trainer/prepare.py."
        },
    )
    preview: int = field(
        default=0,
        metadata={
            "help": "Show the first N training examples exactly as training sees them (trained text highlighted), "
            "write OUTPUT_DIR/preview.jsonl, and exit without loading the model or training."
        },
    )
    sample_prompts: str | None = field(
        default="auto",
        metadata={
            "help": "Prompts generated before/after training and at each evaluation: a .json/.jsonl file, 'auto' "
            "(the dataset's registered test split, if any) or 'none'."
        },
    )
    num_sample_prompts: int = field(default=3, metadata={"help": "How many sample prompts to generate for."})
    sample_references: str | None = field(
        default=None,
        metadata={
            "help": "References for the sample prompts (one per line, or blocks separated by blank lines), so "
            "the before/after samples are scored with --eval_metrics. 'auto': a registered test split's own."
        },
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per sample prompt."})
    eval_generate: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, generate for the first N evaluation prompts and score the replies with "
            "--eval_metrics (logged as eval_<metric>, and in SwanLab with the predictions)."
        },
    )
    eval_metrics: str = field(
        default="exact_match,rouge_l,bleu4,chrf",
        metadata={"help": "Comma list of exact_match, accuracy, rouge_l, bleu4, chrf (see trainer/metrics.py)."},
    )


@dataclass
class FinetuneArguments:
    finetuning_type: str = field(default="full", metadata={"help": "full | lora | qlora (4-bit NF4 base + LoRA)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target: str = field(
        default="all-linear", metadata={"help": "all-linear (every linear layer but the head) or a comma list."}
    )
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma list of modules trained in full and saved with the adapter."}
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    loss_impl: str = field(
        default="auto",
        metadata={
            "help": "auto | hf | chunked. chunked: the LM head and cross-entropy run over chunks of tokens and "
            "never materialise the full logits (exact to fp32 rounding; much less memory for large vocabularies "
            "x long rows). auto: chunked where vocabulary x tokens per micro-batch is large and the model allows."
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples (rows when packing) per optimizer step over all processes; gradient accumulation is "
            "computed as N / (per-device batch x world size). An explicit --gradient_accumulation_steps on the "
            "command line wins over a recipe's global_batch_size; both on the same level must agree."
        },
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split each row across N ranks (DeepSpeed Ulysses: sequence shards, heads shared out around "
                  "attention) for rows too long for one GPU's activations. Needs a DeepSpeed launch with a multiple "
                  "of N processes; data-parallel size = processes / N, and --global_batch_size still counts rows."},
    )
    tiled_mlp: bool = field(
        default=False,
        metadata={"help": "Run each decoder MLP over tiles of hidden-size tokens (DeepSpeed ALST TiledMLP): its large "
                  "intermediate activations exist one tile at a time, for one more MLP forward per step. Exact; "
                  "with or without --sequence_parallel_size, LoRA, gradient checkpointing. See docs/long_context.md."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output dir that holds a finished or unfinished run. The old run is moved "
                  "aside only once configuration, data and model are checked, deleted at the new run's first "
                  "checkpoint, and restored if the new run fails before it."},
    )
    allow_resume_changes: str | None = field(
        default=None,
        metadata={"help": "A resume is refused when it changes what the checkpoint was trained on or how it was "
                  "batched (data and its content, template, tokenizer, max_length, packing, seed, global batch, "
                  "model, LoRA shape); the error names each change. Comma list of those names (or 'all') to accept "
                  "them knowingly, recorded in run_config.json. --max_steps/--num_train_epochs may always change."},
    )


@dataclass
class TrackingArguments:
    swanlab_project: str = field(default="sft-trainer", metadata={"help": "SwanLab project."})
    swanlab_experiment_name: str | None = field(default=None, metadata={"help": "SwanLab run name."})
    swanlab_workspace: str | None = field(default=None, metadata={"help": "SwanLab workspace (organisation)."})
    swanlab_mode: str = field(
        default="local",
        metadata={"help": "cloud | local (dashboard: swanlab watch DIR) | offline (sync later) | disabled."},
    )
    swanlab_logdir: str | None = field(default=None, metadata={"help": "Local log folder (default OUTPUT/swanlog)."})
    swanlab_description: str | None = field(default=None, metadata={"help": "Run description."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, FinetuneArguments, TrackingArguments, TrainingArguments)

# Where our defaults differ from TrainingArguments' for a fine-tuning tool.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/run",
    "logging_steps": 10,
    "save_steps": 200,
    "save_total_limit": 3,
    "report_to": "swanlab",
    "ddp_timeout": 600,
    "remove_unused_columns": False,
    # Must be known before TrainingArguments sets up the distributed state: without it, CPU processes started by
    # `accelerate launch` each train alone (accelerate's multi-process launcher does not pass its `use_cpu` on).
    "use_cpu": not torch.cuda.is_available(),
}


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    finetune: FinetuneArguments
    tracking: TrackingArguments
    training: TrainingArguments
    recipe: Path | None
    # Where each explicitly set option came from: "command line" or "recipe <path>" (defaults are absent).
    sources: dict[str, str] = field(default_factory=dict)


def _read_recipe(path: Path, known: set[str]) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read recipe: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of option: value")
    values = {}
    for key, value in loaded.items():
        if key == "swanlab" and isinstance(value, dict):
            for sub, sub_value in value.items():
                values[f"swanlab_{sub}"] = sub_value
        else:
            values[key] = value
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; see --help for the names")
    return values


def build_parser(prog: str = "trainer/sft.py") -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.prog = prog
    parser.description = (
        "Supervised fine-tuning. Usage: accelerate launch trainer/sft.py [RECIPE.yaml] [--option value ...]. "
        "Options come from project defaults, then the recipe, then the command line (which always wins). With no "
        f"recipe and neither --model_name_or_path nor --dataset, the embedded demo "
        f"({DEFAULT_RECIPE.relative_to(REPO_ROOT)}: a tiny model learns Tang poems on a CPU) runs; otherwise "
        "project defaults apply. All transformers TrainingArguments options are accepted under their own names."
    )
    parser.allow_abbrev = False  # --learn is not --learning_rate: a flag means what it says
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def given_options(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """The options the command line sets explicitly (by destination name, ``--no_x`` counting as ``x``)."""
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        action = parser._option_string_actions.get(arg.split("=", 1)[0])
        if action is not None:
            given.add(action.dest)
    return given


def parse_config(argv: list[str] | None = None, prog: str = "trainer/sft.py") -> Config:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    cli = given_options(parser, argv)
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe = Path(argv.pop(0))
        if not recipe.is_file():
            raise ConfigError(f"{recipe}: recipe file not found")
    elif not ({"help", "model_name_or_path", "dataset"} & cli or any(a in ("-h", "--help") for a in argv)):
        recipe = DEFAULT_RECIPE  # the demo, when nothing says what to train on
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
    recipe_values = check_recipe_values(recipe, _read_recipe(recipe, known), parser) if recipe is not None else {}
    parser.set_defaults(**recipe_values)
    _check_deepspeed_file(argv, recipe_values.get("deepspeed"))
    try:
        model, data, finetune, tracking, training, extra = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ValueError as error:  # TrainingArguments' own validation: already a message for users
        raise ConfigError(str(error)) from error
    extra = [a for a in extra if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if extra:
        raise ConfigError(f"unrecognised argument(s): {' '.join(extra)}; see --help")
    sources = {name: "command line" for name in cli}
    sources.update({name: f"recipe {recipe}" for name in recipe_values if name not in cli})
    _check_choices(model, data, finetune, tracking, sources)
    return Config(model, data, finetune, tracking, training, recipe, sources)


def _check_deepspeed_file(argv: list[str], from_recipe: str | None) -> None:
    """A missing DeepSpeed config is named plainly, with the shipped ones, before anything starts."""
    value = from_recipe
    for i, arg in enumerate(argv):
        if arg == "--deepspeed" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--deepspeed="):
            value = arg.split("=", 1)[1]
    if isinstance(value, str) and value.endswith(".json") and not Path(value).is_file():
        shipped = ", ".join(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "ds_configs").glob("*.json")))
        raise ConfigError(f"--deepspeed {value}: file not found; the shipped configs are {shipped}")
    if isinstance(value, str) and value.endswith(".json"):
        check_json_file(value, "--deepspeed")
    launched_with = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")  # accelerate launch --deepspeed_config_file
    if launched_with.endswith(".json") and Path(launched_with).is_file():
        check_json_file(launched_with, "accelerate launch --deepspeed_config_file")


def _check_choices(model: ModelArguments, data: DataArguments, finetune: FinetuneArguments, tracking,
                   sources: dict[str, str]) -> None:
    choices = {
        "--finetuning_type": (finetune.finetuning_type, ("full", "lora", "qlora")),
        "--on_overlong": (data.on_overlong, ("truncate", "drop")),
        "--on_bad_record": (data.on_bad_record, ("error", "skip")),
        "--swanlab_mode": (tracking.swanlab_mode, ("cloud", "local", "offline", "disabled")),
        "--attn_implementation": (
            model.attn_implementation,
            ("auto", "flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention"),
        ),
        "--dtype": (model.dtype, ("auto", "float32", "bfloat16", "float16")),
        "--mix_by": (data.mix_by, ("examples", "tokens")),
        "--missing_reasoning": (data.missing_reasoning, ("error", "empty")),
        "--loss_impl": (finetune.loss_impl, ("auto", "hf", "chunked")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{option_name(flag, sources)} {value!r}: expected one of {', '.join(allowed)}")
    if data.max_length < 2:
        raise ConfigError(f"--max_length {data.max_length}: must be at least 2")
    if not data.max_record_mb > 0:
        raise ConfigError(f"--max_record_mb {data.max_record_mb}: a size in MiB, more than 0")
    if data.preview < 0:
        raise ConfigError(f"--preview {data.preview}: a number of examples, 0 or more")
    try:
        resolve_metric_names(data.eval_metrics)
    except ValueError as error:
        raise ConfigError(f"--eval_metrics: {error}") from None
