"""Loading a trained result for inference: a full model folder, an adapter folder, or a checkpoint of either.

An adapter folder (``adapter_config.json``) is loaded on top of its base model, with the tokenizer saved beside
the adapter (it may have added tokens and carries the training chat template), and the base embeddings resized
to match before the adapter is applied. A QLoRA adapter is applied to the base in ordinary precision: that is
what merging needs, and what gives the adapter's intended outputs without 4-bit rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainer.errors import UserError
from trainer.model import resize_for_tokenizer


class InferenceLoadError(UserError, ValueError):
    """A folder that holds neither a model nor an adapter, or an adapter whose base cannot be found."""


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_model(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_adapter(path)


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def tokenizer_folder(path: str | Path) -> Path:
    """The tokenizer of a result: its own folder, else the run folder around a checkpoint."""
    path = Path(path)
    return path if (path / "tokenizer_config.json").is_file() else path.parent


def load_for_inference(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a training output (or a plain model folder), ready for ``generate``.

    ``dtype`` None keeps the dtype the weights were saved in; ``base_model`` replaces the base recorded in an
    adapter (the base was moved, or lives under another name on this machine).
    """
    path = Path(path)
    if not (is_adapter(path) or is_model(path)):
        raise InferenceLoadError(f"{path}: neither a model (config.json) nor an adapter (adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path))
    load_dtype = "auto" if dtype is None else dtype
    if is_adapter(path):
        from peft import PeftModel

        base_path = base_model or adapter_base(path)
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=load_dtype)
        except OSError as error:
            raise InferenceLoadError(
                f"{path}: cannot load the adapter's base model {base_path!r} ({error}); pass the base with "
                f"--base_model"
            ) from error
        # The adapter saved the trained embedding rows, so the new rows' initial values do not matter.
        resize_for_tokenizer(base, tokenizer, mean_resizing=False)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
