"""A resume is the same run: the settings that decide what the run trains on, and how, travel with each checkpoint.

Resuming skips the batches already trained by counting them, so a resume that changes the data (a file edited, a
source added), the tokens (template, tokenizer, ``--max_length``, packing), the order (seed) or the batches
(``--global_batch_size``) silently trains on other data than the count assumes. And the HF Trainer restores the
optimizer and its schedule from the checkpoint, so a new ``--learning_rate`` or weight decay would simply be ignored.

Each checkpoint therefore carries ``run_settings.json``: the flat mapping of those settings (with the content digest
of every data file). A resume compares it with the new run's and refuses any difference, naming each setting with
both values. ``--allow_resume_changes NAMES`` (or ``all``) accepts named data and batching changes knowingly (they are
recorded in ``run_config.json``); what the checkpoint restores cannot be overridden, since the new value would not
apply. ``--max_steps`` and ``--num_train_epochs`` are not part of it: extending a run is what resuming is for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.args import Config
    from trainer.preparation import DataSetup

logger = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
CONTENT = "content of "
# Restored from the checkpoint (optimizer param groups and the scheduler's base rates): a changed value is ignored.
RESTORED = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim")
MODEL = ("model_name_or_path", "add_special_tokens", "finetuning_type", "lora_r", "lora_alpha", "lora_target",
         "modules_to_save", "use_dora")
BATCHING = ("data_seed", "dataloader_drop_last", "padding_free")
# Settings added after checkpoints were first written, and the value a checkpoint that lacks them was trained with.
ABSENT_MEANS = {"sequence_parallel_size": 1}


class ResumeChangeError(UserError, ValueError):
    """A resume that would change what the run trains on, or how."""


def run_settings(cfg: Config, setup: DataSetup, world_size: int) -> dict[str, Any]:
    """The settings of this run that a resume must keep, as a flat mapping of option name to value."""
    from trainer.data.prepared import data_key

    _, inputs = data_key(setup.train_sources, [], setup.tokenizer, setup.template, setup.options)
    settings: dict[str, Any] = {
        "dataset": ",".join(s["name"] + (f":{s['weight']:g}" if s["weight"] is not None else "")
                            for s in inputs["train"]),
    }
    for source in inputs["train"]:
        for where, fingerprint in source["content"]:
            settings[CONTENT + str(where)] = fingerprint
    settings["tokenizer"] = inputs["tokenizer"]
    settings["template"] = inputs["template"]
    options = dict(inputs["options"])
    for name, value in (options.pop("template_kwargs") or {}).items():
        settings[name] = value
    # named as its flag is (--max_record_mb), so that a refusal names an option the user can pass
    options["max_record_mb"] = options.pop("max_record_bytes") / 2**20
    settings.update(options)  # max_length, packing, seed, val_size, max_samples, system, on_overlong, ...
    args = cfg.training
    settings["global_batch_size"] = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    settings["sequence_parallel_size"] = cfg.finetune.sequence_parallel_size
    for name in BATCHING:
        settings[name] = getattr(cfg.data, name) if hasattr(cfg.data, name) else getattr(args, name)
    for name in MODEL:
        settings[name] = getattr(cfg.model, name) if hasattr(cfg.model, name) else getattr(cfg.finetune, name)
    for name in RESTORED:
        value = getattr(args, name)
        settings[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return settings


def write_settings(checkpoint: str | Path, settings: dict[str, Any]) -> None:
    (Path(checkpoint) / SETTINGS_FILE).write_text(json.dumps(settings, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")


def read_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    path = Path(checkpoint) / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def group(name: str) -> str:
    """The name ``--allow_resume_changes`` takes for a setting (a file's content is part of ``dataset``)."""
    return "dataset" if name.startswith(CONTENT) else name


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "unset"
    if name.startswith(CONTENT) or name in ("tokenizer", "template"):
        text = str(value)
        return f"sha256 {text[:12]}…" if len(text) > 16 else text
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def _label(name: str) -> str:
    if name.startswith(CONTENT):
        return f"the content of {name[len(CONTENT):]}"
    if name in ("tokenizer", "template"):
        return f"the {name}"
    return f"--{name}"


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Each setting whose value differs, as (name, old, new); a setting one side lacks counts as unset there."""
    old, new = {**ABSENT_MEANS, **old}, {**ABSENT_MEANS, **new}
    return [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new), key=_order(old, new))
            if old.get(name) != new.get(name)]


def _order(old: dict, new: dict):
    names = list(dict.fromkeys([*old, *new]))
    return names.index


def check_resume(checkpoint: str | Path, new: dict[str, Any], allow: str | None) -> list[str]:
    """Refuse a resume that changes the run; return the changes accepted through ``allow`` (for the run record)."""
    old = read_settings(checkpoint)
    if old is None:
        logger.warning("%s records no run settings (written by an earlier version): the resume is not checked "
                       "against them", checkpoint)
        return []
    allowed = {a.strip() for a in (allow or "").split(",") if a.strip()}
    found = changes(old, new)
    restored = [c for c in found if c[0] in RESTORED]
    accepted = [c for c in found if c[0] not in RESTORED and ("all" in allowed or group(c[0]) in allowed)]
    refused = [c for c in found if c not in restored and c not in accepted]
    described = [f"{_label(n)} {_shown(n, a)} → {_shown(n, b)}" for n, a, b in accepted]
    if accepted:
        logger.warning("resuming from %s with changes accepted by --allow_resume_changes: %s", checkpoint,
                       "; ".join(described))
    if refused or restored:
        parts = []
        if refused:
            names = ",".join(dict.fromkeys(group(n) for n, _, _ in refused))
            parts.append(
                "it would change what the run trains on or how it is batched: "
                + "; ".join(f"{_label(n)} {_shown(n, a)} → {_shown(n, b)}" for n, a, b in refused)
                + f" (resume with the checkpoint's values, start over with --overwrite_output_dir, or accept the "
                f"change knowingly with --allow_resume_changes {names})"
            )
        if restored:
            parts.append(
                "the checkpoint's optimizer and schedule restore "
                + "; ".join(f"--{n} {_shown(n, a)}" for n, a, _ in restored)
                + ", so " + ", ".join(f"{_shown(n, b)}" for n, _, b in restored)
                + " would be ignored (keep the checkpoint's value, or start over with --overwrite_output_dir)"
            )
        raise ResumeChangeError(f"cannot resume from {checkpoint}: " + "; and ".join(parts))
    return described
