"""Loading the base model and tokenizer: attention backend, dtype, 4-bit quantisation, special tokens.

Shared by training, generation and merging so that all three see the same model the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainer.errors import UserError

logger = logging.getLogger(__name__)

FLASH_ATTN_INSTALL = "pip install 'sft-trainer[flash]' (or: pip install flash-attn --no-build-isolation)"


class ModelSetupError(UserError, ValueError):
    pass


# Flash attention packages by backend name: FA3 (Hopper) ships as flash_attn_interface, FA2 as flash_attn.
FLASH_PACKAGES = {"flash_attention_3": "flash_attn_interface", "flash_attention_2": "flash_attn"}


def choose_attention(requested: str) -> str:
    """``auto`` → flash_attention_3 on a Hopper GPU where FA3 is installed, else flash_attention_2 where flash_attn is,
    else sdpa. An explicit flash backend that cannot run here is an error, not a silent fallback."""
    installed = {name: importlib.util.find_spec(package) is not None for name, package in FLASH_PACKAGES.items()}
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda and installed["flash_attention_3"] and torch.cuda.get_device_capability()[0] == 9:
            return "flash_attention_3"
        return "flash_attention_2" if cuda and installed["flash_attention_2"] else "sdpa"
    if requested in FLASH_PACKAGES and not installed[requested]:
        raise ModelSetupError(f"--attn_implementation {requested}: the {FLASH_PACKAGES[requested]} package is missing; "
                              f"install it ({FLASH_ATTN_INSTALL} for flash_attention_2), or use sdpa")
    if requested in FLASH_PACKAGES and not cuda:
        raise ModelSetupError(f"--attn_implementation {requested} needs a CUDA device; use sdpa on CPU")
    return requested


def choose_dtype(requested: str, finetuning_type: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if finetuning_type in ("lora", "qlora") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Labels are built from assistant spans, never from "ids equal to pad", so reusing an existing token as
        # padding cannot erase the EOS labels (the classic pad == eos bug of DataCollatorForLanguageModeling).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("tokenizer has no pad token; padding with %r (padding is never labelled)", tokenizer.pad_token)
    return tokenizer


PAD_NAMES = {"<pad>", "[pad]", "<|pad|>"}


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[str]:
    """Add the tokens the tokenizer lacks as special tokens; returns those added (embeddings must then be resized).

    Special, not plain, tokens: they are never split by the tokenizer and are skipped when decoding replies. A
    padding token among them (``<PAD>``, ``[PAD]``, ``<|pad|>``, any case) becomes the pad token, as in the Phi-2
    ChatML recipe, so padding stops borrowing EOS/UNK.
    """
    tokens = [t.strip() for t in tokens if t.strip()]
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        # transformers 5 names the list ``extra_special_tokens`` (``additional_special_tokens`` is a legacy alias);
        # extend it rather than replace it, or the model's own extra special tokens stop being special.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    pad = next((t for t in tokens if t.lower() in PAD_NAMES), None)
    if pad is not None and tokenizer.pad_token != pad:
        tokenizer.pad_token = pad
        logger.info("padding with the added token %r", pad)
    return missing


def quantization_config(compute_dtype: torch.dtype):
    """The QLoRA recipe: 4-bit NF4 with double quantisation, as in the Tang-poem notebook."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSetupError("--finetuning_type qlora needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def qlora_compute_dtype(weights_dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 as in the notebook, fp16 on GPUs without bf16 (e.g. T4, V100)."""
    if weights_dtype != torch.float32:
        return weights_dtype
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_model(
    path: str,
    *,
    finetuning_type: str = "full",
    attn_implementation: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """The base model for training; ``qlora`` loads it 4-bit (NF4) on this process's device, CPU included.

    A quantised model cannot be moved after loading, so QLoRA places it at load time: on the GPU of this
    process's ``LOCAL_RANK`` (each DDP rank its own copy), or on the CPU, where bitsandbytes also quantises.
    """
    torch_dtype = choose_dtype(dtype, finetuning_type)
    kwargs = {}
    if finetuning_type == "qlora":
        kwargs["quantization_config"] = quantization_config(qlora_compute_dtype(torch_dtype))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = device_map or ({"": local_rank} if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        attn_implementation=choose_attention(attn_implementation),
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    # A KV cache during training both wastes memory and, with packed rows, silently drops the per-example mask.
    model.config.use_cache = False
    return model


def resize_for_tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mean_resizing: bool = True
) -> bool:
    """Grow the embeddings to hold every tokenizer id (padded to a multiple of 64 for fast matmuls).

    New rows start at the mean of the old ones (``mean_resizing``), which keeps the first steps' loss sane. When the
    rows are about to be overwritten anyway (loading a trained adapter that saved the embeddings), pass False: it
    skips a covariance over the whole vocabulary.
    """
    # config.vocab_size, not the weight's shape: under ZeRO-3 the weight is a partitioned, empty placeholder.
    if len(tokenizer) <= model.config.get_text_config().vocab_size:
        return False
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=mean_resizing)
    return True
