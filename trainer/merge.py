"""Merge a LoRA/QLoRA adapter into its base model: one standalone folder that loads anywhere without peft.

``python trainer/merge.py --adapter OUTPUT_DIR_OR_CHECKPOINT --output MERGED_DIR``

The base model (recorded in the adapter, or ``--base_model``) is loaded in ordinary precision, grown to the
tokenizer saved beside the adapter (added special tokens), the adapter applied and folded into the weights. The
folder gets sharded safetensors, the tokenizer with the training chat template, and a generation config that
stops at the end-of-turn token training taught, so plain ``transformers`` code reproduces the fine-tuned model.
A QLoRA adapter is merged into the unquantised base: merging into 4-bit weights would round the update away.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not from trainer/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if sys.argv[1:] in (["-h"], ["--help"]):  # the rendered help, before the heavy imports (trainer/console/fast_help.py)
    from trainer.console.fast_help import serve_help

    serve_help("trainer/merge.py", "trainer.merge:build_parser")

import argparse
import logging
import shutil

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.console.errors import report_user_error
from trainer.errors import UserError
from trainer.file_modes import readable_weights, staging_dir
from trainer.inference import is_adapter, is_model, load_for_inference

logger = logging.getLogger("merge")

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeError(UserError, ValueError):
    pass


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the token that closes an assistant turn in the tokenizer's chat template (``<|im_end|>``…)."""
    from trainer.data.templates import TemplateError, end_of_turn_token_id

    ids = {tokenizer.eos_token_id}
    if tokenizer.chat_template:
        try:
            ids.add(end_of_turn_token_id(tokenizer, tokenizer.chat_template))
        except (TemplateError, IndexError, ValueError):  # a template we cannot probe: EOS alone
            pass
    return sorted(ids - {None})


def prepare_for_serving(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Settings a standalone model needs that training switched off or never wrote."""
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def check_output(output: Path, adapter: Path, force: bool) -> None:
    """Refuse a non-empty output folder without ``force``, and never one that holds the adapter itself."""
    resolved, source = output.resolve(), adapter.resolve()
    if resolved == source or resolved in source.parents:
        raise MergeError(f"--output {output}: holds the adapter being merged; choose another folder")
    if output.exists() and not output.is_dir():
        raise MergeError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise MergeError(f"--output {output}: folder is not empty; pass --force to replace its contents")


def merge_adapter(
    adapter: str | Path,
    output: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "2GB",
    force: bool = False,
) -> Path:
    """Merge ``adapter`` into its base and save the standalone model to ``output``; returns ``output``."""
    adapter, output = Path(adapter), Path(output)
    if is_model(adapter):
        raise MergeError(f"--adapter {adapter}: a full model (config.json, no adapter_config.json) is standalone "
                         "already; load it directly")
    if not is_adapter(adapter):
        raise MergeError(f"--adapter {adapter}: no adapter_config.json there")
    check_output(output, adapter, force)

    model, tokenizer = load_for_inference(adapter, dtype=dtype, base_model=base_model)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse to write NaN/inf weights
    prepare_for_serving(merged, tokenizer)

    # Written beside the target and renamed into place: an interrupted merge never leaves a half-written model,
    # and --force never mixes old shards with new ones.
    output.parent.mkdir(parents=True, exist_ok=True)
    # The staging folder and the weights take the umask's modes (mkdtemp's 0700 and safetensors' 0600 would leave a
    # merged model that only its maker can load).
    staging = staging_dir(output.parent, f".{output.name}.")
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        readable_weights(staging)
        tokenizer.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged %s into %s → %s", adapter, base_model or "its base model", output)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/merge.py",
        description="Merge a LoRA/QLoRA adapter (a training output folder or one of its checkpoints) into its base "
        "model and save a standalone model: sharded safetensors, tokenizer with the training chat template, and a "
        "generation config that stops at the end-of-turn token. Load the result with plain transformers "
        "(AutoModelForCausalLM.from_pretrained), vLLM, TGI, or convert it to GGUF.",
    )
    parser.add_argument("--adapter", required=True,
                        help="Adapter folder (holds adapter_config.json): a run's output_dir or a checkpoint-N in it.")
    parser.add_argument("--output", required=True, help="Folder for the merged model (created).")
    parser.add_argument("--base_model", default=None,
                        help="Base model to merge into, instead of the one recorded in adapter_config.json (use when "
                        "the base was moved or is known under another name here).")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="Dtype of the merged weights. auto = the base model's saved dtype.")
    parser.add_argument("--max_shard_size", default="2GB",
                        help="Largest safetensors shard (e.g. 2GB, 500MB); bigger models are split into several.")
    parser.add_argument("--force", action="store_true",
                        help="Replace the contents of a non-empty --output folder.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    try:
        output = merge_adapter(args.adapter, args.output, base_model=args.base_model, dtype=DTYPES[args.dtype],
                               max_shard_size=args.max_shard_size, force=args.force)
    except UserError as error:
        return report_user_error(error)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
