"""The built-in tiny model: a few-million-parameter Llama with a tokenizer trained on the user's own data.

It exists so that the whole product — data, packing, distributed training, checkpoints, SwanLab, Slurm — runs
for real on a laptop CPU in minutes, with no download. It is built once into the cache as an ordinary
Hugging Face folder (config, random-initialised safetensors, tokenizer with a chat template) and then loaded
through exactly the same ``from_pretrained`` code as any hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from trainer.data.registry import cache_root
from trainer.data.templates import CHATML

BUILTIN_PREFIX = "builtin:"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return sorted(BUILTIN_PREFIX + p.stem for p in CONFIGS_DIR.glob("*.json"))


def _train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/Qwen use): any text encodes, and frequent characters get their own token."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(name: str, texts: list[str], seed: int = 0) -> Path:
    """The folder of built-in model ``name`` with a tokenizer trained on ``texts``, built on first use."""
    config_file = CONFIGS_DIR / f"{name.removeprefix(BUILTIN_PREFIX)}.json"
    if not config_file.is_file():
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    config_text = config_file.read_text()
    digest = hashlib.sha256(config_text.encode())
    digest.update(str(seed).encode())
    for text in texts:
        digest.update(text.encode())
    folder = cache_root() / "models" / f"{config_file.stem}-{digest.hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file():
        return folder

    config_dict = json.loads(config_text)
    tokenizer = _train_tokenizer(texts, config_dict["vocab_size"])
    config_dict["vocab_size"] = len(tokenizer)
    config = AutoConfig.for_model(**config_dict)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    # The class itself, not AutoModelForCausalLM.from_config: under a ZeRO-3 launch from_config partitions the
    # weights with collectives, which would deadlock while only one process builds the model.
    model = getattr(transformers, config.architectures[0])(config)

    # Build in a temporary folder and rename: concurrent ranks or an interrupted build never leave half a model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: its copy is identical
            pass
        else:
            os.makedirs(tmp)  # let TemporaryDirectory's cleanup find its folder
    return folder
