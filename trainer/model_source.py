"""Check where a model comes from before anything loads it, so each wrong path is one sentence, at once.

Without these checks an empty folder fails deep in tokenizer loading ("install sentencepiece or tiktoken"), a
mistyped path becomes a hub id and fails with ``HFValidationError`` or a network error, and a hub id without
network retries for most of a minute before a traceback. Here: a path that looks local must be a folder with a
config, a tokenizer and weights; a hub id must be in the local cache, or the hub must answer a short probe
(``HF_HUB_OFFLINE`` set means it cannot).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from trainer.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.gguf")
PROBE_TIMEOUT_S = 5.0
WHAT_A_FOLDER_HOLDS = "config.json, tokenizer files and weights (*.safetensors), as save_pretrained writes them"


class ModelSourceError(UserError, ValueError):
    pass


def looks_local(name: str) -> bool:
    """A path rather than a hub id: it exists, or is spelled like a path (absolute, ./, ~, more than one /)."""
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.endswith("/")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def check_local_model(name: str, flag: str) -> None:
    """An existing, non-empty folder holding a config, a tokenizer and weights."""
    folder = Path(name).expanduser()
    where = f"{flag} {name}"  # as the user wrote it
    if not folder.exists():
        raise ModelSourceError(f"{where}: no such folder; give a model folder ({WHAT_A_FOLDER_HOLDS}) or a hub id "
                               "such as Qwen/Qwen2.5-0.5B-Instruct")
    if not folder.is_dir():
        raise ModelSourceError(f"{where}: is a file, not a model folder; give the folder that holds config.json")
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise ModelSourceError(f"{where}: the folder is empty; copy a model into it ({WHAT_A_FOLDER_HOLDS}) or give "
                               "another folder or a hub id")
    if "config.json" not in names:
        hint = "; it holds a LoRA adapter: give its base model" if "adapter_config.json" in names else ""
        raise ModelSourceError(f"{where}: no config.json in the folder{hint}; a model folder holds "
                               f"{WHAT_A_FOLDER_HOLDS}")
    missing = []
    if not names & set(TOKENIZER_FILES):
        missing.append("no tokenizer (tokenizer.json or tokenizer.model)")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("no weights (*.safetensors)")
    if missing:
        raise ModelSourceError(f"{where}: holds config.json but {' and '.join(missing)}; copy the whole model "
                               "(save_pretrained writes both) or give the hub id it came from")


def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub within ``timeout_s`` (name lookup included, which has no timeout of its own)."""
    host, port = _hub_endpoint()
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_hub_model(repo_id: str, flag: str, probe=hub_reachable) -> None:
    """A well-formed hub id that is cached, or a hub that answers; else one sentence instead of a minute of retries."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelSourceError(f"{flag} {repo_id}: neither an existing folder nor a hub id (owner/name); check "
                               "the spelling") from None
    if _cached(repo_id):
        return
    if _offline():
        raise ModelSourceError(f"{flag} {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                               f"download it where there is network (hf download {repo_id} --local-dir DIR) and "
                               "give DIR, or unset HF_HUB_OFFLINE")
    if not probe():
        host, _ = _hub_endpoint()
        raise ModelSourceError(f"{flag} {repo_id}: {host} cannot be reached (no answer in {PROBE_TIMEOUT_S:.0f} s) "
                               f"and the model is not in the local cache; download it where there is network "
                               f"(hf download {repo_id} --local-dir DIR) and give DIR, or set HF_ENDPOINT to a mirror")


def check_model_source(name: str, flag: str = "--model_name_or_path") -> None:
    """Raise :class:`ModelSourceError` with one sentence if ``name`` cannot be loaded as it stands."""
    if looks_local(name):
        check_local_model(name, flag)
    else:
        check_hub_model(name, flag)
