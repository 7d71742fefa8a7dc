"""The resolved configuration of a run, written beside its results and sent to trackers, without secrets.

A run folder must say how it was made (recipe, every option, world size, global batch, library versions, what the
data turned out to be) — and must never carry a token or API key, since output folders get copied and shared. The
secrets of a run are the values of secret-named environment variables (``HF_TOKEN``, ``SWANLAB_API_KEY``,
``*_API_KEY``…) and of secret-named options, from a flag or a recipe (``hub_token``); :func:`scrub` removes them
from what is written (``run_config.json``, SwanLab's config and recorded command line), and
:func:`training_args_without_secrets` from the ``TrainingArguments`` that ``training_args.bin`` pickles.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from trainer.args import Config
    from trainer.data.build import DataReport

RUN_CONFIG = "run_config.json"

VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "peft", "deepspeed", "swanlab", "datasets")

# Environment variables whose values are secrets wherever they turn up in what is logged: these, and any named like
# one (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, ...; not TOKENIZERS_PARALLELISM).
SECRET_ENV_VARS = ("SWANLAB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY")
SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)")
# Option names that hold a secret (hub_token, api_key, ...), but not counts like max_new_tokens or pad_token_id.
SECRET_NAME = re.compile(r"(^|_)(token|api_?key|secret|password|passwd|credentials?)$", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "false") are settings, not secrets, and would scrub everything
REDACTED = "<redacted>"


def scrub(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A copy of ``value`` with secrets replaced: entries named like tokens/keys, and any known secret string.

    ``secrets`` are literal values (e.g. the API key from the environment) removed wherever they occur, so a key
    pasted into a description or a path cannot leak either.
    """
    if isinstance(value, dict):
        return {
            str(k): REDACTED if SECRET_NAME.search(str(k)) and isinstance(v, str) and v else scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return scrub(str(value), secrets)


def known_secrets(*configs: Any) -> tuple[str, ...]:
    """The secret values to remove wherever they occur: those of secret-named environment variables, and those of
    secret-named fields of ``configs`` (dataclasses such as ``TrainingArguments``: a token given by flag or recipe).
    Longest first, so that a secret holding another is removed whole."""
    found = {value for name, value in os.environ.items()
             if (name in SECRET_ENV_VARS or SECRET_ENV_NAME.search(name)) and len(value) >= MIN_SECRET_LENGTH}
    for config in configs:
        for item in dataclasses.fields(config):
            value = getattr(config, item.name, None)
            if SECRET_NAME.search(item.name) and isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
                found.add(value)
    return tuple(sorted(found, key=len, reverse=True))


def run_secrets(cfg: Config) -> tuple[str, ...]:
    """The secrets of a run: from the environment and from every option group of its configuration."""
    return known_secrets(cfg.model, cfg.data, cfg.finetune, cfg.tracking, cfg.training)


def training_args_without_secrets(args: TrainingArguments) -> TrainingArguments:
    """A shallow copy of ``args`` for ``training_args.bin``, which the Trainer pickles with every saved model and
    checkpoint: secret-named fields (``hub_token``) emptied, known secret values cut out of every text field."""
    secrets = known_secrets(args)
    clean = copy.copy(args)
    for item in dataclasses.fields(args):
        value = getattr(args, item.name, None)
        if isinstance(value, str) and SECRET_NAME.search(item.name) and value:
            setattr(clean, item.name, None)
        elif isinstance(value, (str, list, dict)) and scrub(value, secrets) != value:
            setattr(clean, item.name, scrub(value, secrets))
    return clean


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def resolved_config(cfg: Config, report: DataReport, world_size: int, base_model: str | None = None
                    ) -> dict[str, Any]:
    """Everything needed to reproduce the run, as one nested mapping (not yet scrubbed)."""
    args = cfg.training
    global_batch = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    data_report = {k: v for k, v in asdict(report).items() if k not in ("skipped_records", "packing")}
    data_report["skipped_records"] = len(report.skipped_records)
    data_report["summary"] = report.summary()
    if report.packing:
        data_report["packing"] = {k: v for k, v in report.packing.items()}
    return {
        "recipe": str(cfg.recipe) if cfg.recipe else None,
        "model": asdict(cfg.model),
        "data": asdict(cfg.data),
        "finetune": asdict(cfg.finetune),
        "tracking": asdict(cfg.tracking),
        "training": args.to_dict(),
        "base_model": base_model or cfg.model.model_name_or_path,  # the folder it resolved to (built-in models)
        "world_size": world_size,
        "global_batch_size": global_batch,
        "versions": versions(),
        "data_report": data_report,
    }


def write_run_config(cfg: Config, report: DataReport, world_size: int, base_model: str | None = None,
                     start: dict[str, Any] | None = None) -> Path:
    """Write ``run_config.json``. ``start`` describes this start of the run (time, host, job, what it resumed from,
    changes accepted); a resumed run keeps the configurations of its earlier starts under ``history``."""
    path = Path(cfg.training.output_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    config = resolved_config(cfg, report, world_size, base_model)
    history: list = []
    if start is not None:
        config["start"] = start
        if start.get("resumed_from") and path.is_file():
            try:
                earlier = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                earlier = {"unreadable": RUN_CONFIG}
            history = [*earlier.pop("history", []), earlier]
    if history:
        config["history"] = history
    # Scrubbed whole, the earlier starts too: a file written before a secret was known as one is cleaned now.
    config = scrub(config, run_secrets(cfg))
    tmp = path.with_name(f".{RUN_CONFIG}.tmp")
    tmp.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_config(folder: str | Path) -> dict | None:
    """The run configuration of a run folder or one of its checkpoints, if it has one."""
    for candidate in (Path(folder), Path(folder).parent):
        if (candidate / RUN_CONFIG).is_file():
            return json.loads((candidate / RUN_CONFIG).read_text(encoding="utf-8"))
    return None
