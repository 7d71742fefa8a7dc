"""The data half of a run, shared by ``sft.py`` and ``prepare.py``: sources, tokenizer, template, prepared data.

``python trainer/prepare.py`` and ``sft.py`` call the same functions with the same parsed options, so they arrive at
the same content key and the same prepared folder: a preparation done ahead of a job (or by another rank, or an
earlier run) is found and memory-mapped, never redone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from trainer.args import Config
from trainer.data.build import DataOptions
from trainer.data.formats import RecordReader
from trainer.data.items import texts_of
from trainer.data.prepared import PreparedData, prepare_data
from trainer.data.registry import cache_root
from trainer.data.sources import Source, resolve_sources
from trainer.data.templates import resolve_template
from trainer.model import add_special_tokens, load_tokenizer
from trainer.model_source import check_model_source
from trainer.tiny import build_tiny_model, is_builtin

logger = logging.getLogger("sft")

AUTO_WORKERS_FROM_BYTES = 20 << 20  # below this much data, worker processes cost more than they save


@dataclass
class DataSetup:
    """What the data half needs and produces before any model is loaded."""

    train_sources: list[Source]
    eval_sources: list[Source]
    model_path: str
    tokenizer: PreTrainedTokenizerBase
    template: str
    added_tokens: list[str]
    options: DataOptions


def template_kwargs(cfg: Config) -> dict:
    """Options passed to the chat template (only those set: a template's own defaults otherwise apply)."""
    return {} if cfg.data.enable_thinking is None else {"enable_thinking": cfg.data.enable_thinking}


def data_options(cfg: Config) -> DataOptions:
    data = cfg.data
    return DataOptions(
        max_length=data.max_length, on_overlong=data.on_overlong, on_bad_record=data.on_bad_record,
        val_size=data.val_size, max_samples=data.max_samples, system=data.system, packing=data.packing,
        seed=cfg.training.seed, mix_by=data.mix_by, template_kwargs=template_kwargs(cfg),
        missing_reasoning=data.missing_reasoning, max_record_bytes=int(data.max_record_mb * 2**20),
    )


def _texts(sources: list[Source], options: DataOptions) -> Iterator[str]:
    """Every text of the training sources (what the built-in model's tokenizer learns from). Bad records are what
    ``--on_bad_record`` makes them: an error here is the one the data preparation would give (a source whose only
    record is bad, such as a .txt file over --max_record_mb, is named for its fault, not as "all 1 were skipped")."""
    seen = 0
    for source in sources:
        for stream in source.streams:
            limit = options.max_record_bytes
            reader = RecordReader(stream.where, stream.records(limit), options.on_bad_record, max_record_bytes=limit)
            for _, item in reader:
                if options.max_samples is not None and seen >= options.max_samples:
                    return
                seen += 1
                yield from texts_of(item)


def _sources_key(sources: list[Source], max_samples: int | None) -> str:
    digest = hashlib.sha256(str(max_samples).encode())
    for source in sources:
        for stream in source.streams:
            digest.update(stream.fingerprint().encode())
    return digest.hexdigest()


def setup_data(cfg: Config) -> DataSetup:
    """Sources found, tokenizer loaded (the built-in model built if asked for), template chosen."""
    data = cfg.data
    train_sources = resolve_sources(data.dataset, "train", data.data_dir)
    eval_sources = resolve_sources(data.eval_dataset, "train", data.data_dir) if data.eval_dataset else []
    model_path = cfg.model.model_name_or_path
    if is_builtin(model_path):
        texts = _texts(train_sources, data_options(cfg))
        model_path = str(build_tiny_model(model_path, texts,
                                          key=_sources_key(train_sources, data.max_samples)))
    check_model_source(model_path)  # one sentence for an empty, partial, missing or unreachable model
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    added = add_special_tokens(tokenizer, cfg.model.add_special_tokens.split(",")) \
        if cfg.model.add_special_tokens else []
    template = resolve_template(data.template, tokenizer, required=False)  # raw text needs none
    if template:
        tokenizer.chat_template = template  # saved with the model: inference renders prompts as training did
    return DataSetup(train_sources, eval_sources, model_path, tokenizer, template, added, data_options(cfg))


def prepared_root(cfg: Config) -> Path:
    return Path(cfg.data.prepared_data_dir) if cfg.data.prepared_data_dir else cache_root() / "prepared"


def workers_for(cfg: Config, setup: DataSetup) -> int:
    """``--preprocessing_num_workers``, or by size and machine: worker processes for large data when there are cores
    to spare for them beside the reading process (up to 8), else none.

    Measured on 2 cores: two workers beside the reader ran 1.3-1.8x slower than one process (they compete with it
    for the cores, and each starts its own interpreter); from 4 cores the workers win.
    """
    if cfg.data.preprocessing_num_workers is not None:
        return max(1, cfg.data.preprocessing_num_workers)
    size = sum(s.path.stat().st_size for src in setup.train_sources + setup.eval_sources for s in src.streams
               if s.path is not None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores - 1) if size >= AUTO_WORKERS_FROM_BYTES and cores >= 4 else 1


def prepare(cfg: Config, setup: DataSetup, show_progress: bool) -> PreparedData:
    """The prepared data of this run: found (memory-mapped), or made now, by this process or another one."""
    prepared = prepare_data(setup.train_sources, setup.eval_sources, setup.tokenizer, setup.template,
                            setup.options, prepared_root(cfg), num_proc=workers_for(cfg, setup),
                            show_progress=show_progress)
    how = "prepared here" if prepared.built_here else "found, memory-mapped, no re-tokenisation"
    # Every rank says where its data comes from: one "prepared here" per shared folder, the rest "found".
    print(f"[rank{os.environ.get('RANK', '0')}] prepared data: {prepared.folder} ({how})", file=sys.stderr,
          flush=True)
    return prepared
