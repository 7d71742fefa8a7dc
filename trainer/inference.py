"""Loading a trained result for inference: a full model folder, an adapter folder, or a checkpoint of either.

An adapter folder (``adapter_config.json``) is loaded on top of its base model, with the tokenizer saved beside
the adapter (it may have added tokens and carries the training chat template), and the base embeddings resized
to match before the adapter is applied.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_for_inference(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a training output (or a plain model folder), ready for ``generate``."""
    path = Path(path)
    tokenizer_path = path if (path / "tokenizer_config.json").is_file() else path.parent
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model or adapter_base(path), dtype=dtype)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
