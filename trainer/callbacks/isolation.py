"""Prove packing isolation on the model as the Trainer holds it, right before the first step.

At ``on_train_begin`` the model is placed, wrapped (LoRA/QLoRA) and, under DeepSpeed, partitioned with the engine's
hooks in place: what is checked is exactly what trains, on every rank alike. The check picks the packing mechanism
(:mod:`trainer.isolation`) and sets it on the run's collator before any batch is made; a model that no mechanism
isolates stops the run with :class:`~trainer.isolation.IsolationError`.
"""

from __future__ import annotations

from transformers import TrainerCallback

from trainer.isolation import Measurement, check_isolation, probe_batch_makers

# Backends that take a 4-D mask as it is (flash attention needs position ids at batch size 1; flex a BlockMask).
MASK4D_BACKENDS = {"sdpa": None, "eager": "model"}


class PackingIsolationCallback(TrainerCallback):
    def __init__(self, collator, packing: bool, vocab_size: int) -> None:
        self.collator = collator
        self.packing = packing
        self.vocab_size = vocab_size
        self.result: Measurement | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        attn = base.config._attn_implementation
        mechanisms = ["position_ids"]
        if attn in MASK4D_BACKENDS:
            mechanisms.append("mask4d")
            self.collator.mask_dtype = base.dtype if MASK4D_BACKENDS[attn] == "model" else None
        self.result = check_isolation(model, probe_batch_makers(self.collator, self.packing, mechanisms),
                                      self.vocab_size)
        self.collator.mechanism = self.result.mechanism
        return control
