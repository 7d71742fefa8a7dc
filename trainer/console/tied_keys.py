"""A tied head is not a missing key: tell a correct resume from a checkpoint that really lacks weights.

A checkpoint of a model whose output head shares the embedding matrix stores the matrix once, so loading it lists
``lm_head.weight`` as missing although the head is loaded (it *is* the embedding). The Trainer then warns
"There were missing keys …" on every correct resume. A missing key is dropped from that list only when its
parameter is the very same object as a parameter that was loaded.
"""

from __future__ import annotations

from typing import Any

import torch


def tied_missing_keys(model: torch.nn.Module, missing: list[str]) -> set[str]:
    """The missing keys whose parameter is shared with a parameter that is not missing."""
    missing_set = set(missing)
    by_object: dict[int, list[str]] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, param in params.items():
        by_object.setdefault(id(param), []).append(name)
    return {key for key in missing if key in params
            and any(other not in missing_set for other in by_object[id(params[key])] if other != key)}


def without_tied_keys(model: torch.nn.Module, load_result: Any) -> Any:
    """``load_result`` (missing_keys, unexpected_keys) less the missing keys that are tied to loaded ones."""
    missing = list(getattr(load_result, "missing_keys", []) or [])
    tied = tied_missing_keys(model, missing)
    if not tied:
        return load_result
    kept = [key for key in missing if key not in tied]
    if hasattr(load_result, "_replace"):
        return load_result._replace(missing_keys=kept)
    load_result.missing_keys = kept
    return load_result
