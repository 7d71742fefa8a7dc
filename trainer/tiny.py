"""The built-in tiny model: a few-million-parameter Llama with a tokenizer trained on the user's own data.

It exists so that the whole product — data, packing, distributed training, checkpoints, SwanLab, Slurm — runs
for real on a laptop CPU in minutes, with no download. It is built once into the cache as an ordinary
Hugging Face folder (config, random-initialised safetensors, tokenizer with a chat template) and then loaded
through exactly the same ``from_pretrained`` code as any hub model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from trainer.data.registry import cache_root
from trainer.data.templates import CHATML
from trainer.file_modes import readable_weights
from trainer.once import build_once

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


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save, each shared tensor once under its first name, as ``save_pretrained`` writes them.

    safetensors' own ``save_model`` keeps the alphabetically first name of a tied pair (``lm_head.weight``, not
    ``model.embed_tokens.weight``), so the built folder would not hold the names a trained model saves.
    """
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().clone()
    return state


FOLDER_FORMAT = "2"  # part of the cache key: folders built by an older builder are rebuilt, not reused
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(folder: Path) -> bool:
    """A built model folder: every file loading needs (an older, interrupted build may hold only some)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def build_tiny_model(name: str, texts: Iterable[str], seed: int = 0, key: str | None = None) -> Path:
    """The folder of built-in model ``name`` with a tokenizer trained on ``texts``, built on first use.

    ``key`` names the training texts (e.g. a digest of the data files); without it the texts are hashed. Any
    process may build it, on any node: one builds under a file lock (:func:`trainer.once.build_once`), the others
    wait for the complete folder.
    """
    config_file = CONFIGS_DIR / f"{name.removeprefix(BUILTIN_PREFIX)}.json"
    if not config_file.is_file():
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    config_text = config_file.read_text()
    digest = hashlib.sha256(config_text.encode())
    digest.update(FOLDER_FORMAT.encode())
    digest.update(str(seed).encode())
    if key is None:
        texts = list(texts)
        for text in texts:
            digest.update(text.encode())
    else:
        digest.update(key.encode())
    folder = cache_root() / "models" / f"{config_file.stem}-{digest.hexdigest()[:12]}"

    def build(tmp: Path, progress) -> None:
        progress.update(force=True, stage="training the tokenizer")
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
        # Written directly, not with model.save_pretrained: once torch.distributed is up, transformers saves
        # nothing on a process whose global rank is not 0, and the builder may be any rank of any node.
        model.config.to_json_file(tmp / "config.json")
        model.generation_config.to_json_file(tmp / "generation_config.json")
        save_file(untied_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        readable_weights(tmp)  # safetensors writes 0600: other users of a shared cache could not load it
        tokenizer.save_pretrained(tmp)

    with torch.random.fork_rng(devices=[]):  # building must not move the run's random numbers
        return build_once(folder, build, is_complete, what=f"the built-in model {name}")[0]
