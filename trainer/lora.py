"""LoRA / QLoRA adapters with peft, set up so that the usual pitfalls cannot happen.

- The adapter init is seeded here: the Trainer seeds only later, so without it two "identical" runs (or two
  ranks) start from different adapters.
- Gradient checkpointing needs inputs that require grad when the embeddings are frozen, or no gradient flows.
- Tokens added to the vocabulary have untrained embeddings: the embedding and output layers are then trained
  and saved in full with the adapter, or the adapter is useless once reloaded.
- A model whose output layer shares the input embedding's weights (``tie_word_embeddings``) keeps sharing them:
  one trained copy instead of two that drift apart, and the merged model stays tied like its base.
- QLoRA: ``prepare_model_for_kbit_training`` casts the few unquantised weights (norms, embeddings) to float32
  and freezes the 4-bit base; checkpointing is non-reentrant, which needs no grad-requiring inputs.
"""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from trainer.args import FinetuneArguments

logger = logging.getLogger(__name__)


def _module_name(model: PreTrainedModel, module: torch.nn.Module | None) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def embedding_module_names(model: PreTrainedModel) -> list[str]:
    """Short names (as peft matches them) of the input embedding and the output head."""
    names = [_module_name(model, model.get_input_embeddings()), _module_name(model, model.get_output_embeddings())]
    return [n for n in names if n]


def embeddings_tied(model: PreTrainedModel) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def apply_lora(
    model: PreTrainedModel,
    args: FinetuneArguments,
    *,
    seed: int,
    gradient_checkpointing: bool,
    train_embeddings: bool = False,
) -> PeftModel:
    if args.finetuning_type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.enable_input_require_grads()

    target = "all-linear" if args.lora_target == "all-linear" else [t.strip() for t in args.lora_target.split(",")]
    modules_to_save = [m.strip() for m in args.modules_to_save.split(",")] if args.modules_to_save else []
    if train_embeddings:
        modules_to_save += [m for m in embedding_module_names(model) if m not in modules_to_save]
    tie = embeddings_tied(model) and any(m in modules_to_save for m in embedding_module_names(model))
    if tie and "ensure_weight_tying" in LoraConfig.__dataclass_fields__:
        # One shared trained copy (peft ties the output layer to it); listing the head too would untie them.
        extra = {"ensure_weight_tying": True}
        modules_to_save = [m for m in modules_to_save if m != _module_name(model, model.get_output_embeddings())]
    else:
        extra = {}
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        modules_to_save=modules_to_save or None,
        use_dora=args.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %s trainable of %s parameters (%.2f%%); targets %s; saved in full: %s",
                f"{trainable:,}", f"{total:,}", 100 * trainable / total, target, modules_to_save or "none")
    return peft_model
