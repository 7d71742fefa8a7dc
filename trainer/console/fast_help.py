"""``--help`` in a fraction of a second: the rendered text, cached per installed versions and source.

Building the parser imports transformers' ``TrainingArguments`` (and through it torch, accelerate, peft…): several
seconds before a word of help. An entry point asked for plain ``--help`` (nothing else on the line: a recipe
changes the defaults shown) calls :func:`serve_help` before its heavy imports. The text is keyed by the versions
of the libraries that shape it, a digest of the package's sources and the terminal width, so a stale text is
never shown; on a miss it is rendered the slow way once and stored (``scripts/install.sh`` warms it).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
LIBRARIES = ("transformers", "accelerate", "torch", "peft", "deepspeed", "datasets", "trl")
HELP_FLAGS = ("-h", "--help")
_rendering: list[str] = []  # the entry point being rendered, whose module the builder may import again


def asks_for_help_only(argv: list[str]) -> bool:
    return len(argv) == 1 and argv[0] in HELP_FLAGS


def help_cache_dir() -> Path:
    root = os.environ.get("SFT_CACHE_DIR") or Path.home() / ".cache" / "sft-trainer"
    return Path(root) / "help"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def help_key(prog: str) -> str:
    digest = hashlib.sha256(prog.encode())
    digest.update(sys.version.encode())
    for name in LIBRARIES:
        digest.update(f"{name}={_version(name)};".encode())
    digest.update(str(shutil.get_terminal_size().columns).encode())
    digest.update(os.environ.get("COLUMNS", "").encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def rendered_help(prog: str, builder: str) -> str:
    """The help text, from the cache or rendered by ``builder`` ("module:function(prog) -> parser") and stored."""
    cached = help_cache_dir() / f"{prog.replace('/', '_')}-{help_key(prog)}.txt"
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    module, function = builder.split(":")
    _rendering.append(prog)
    try:
        build = getattr(importlib.import_module(module), function)
        text = (build(prog) if inspect.signature(build).parameters else build()).format_help()
    finally:
        _rendering.pop()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        partial.replace(cached)
    except OSError:
        pass  # a read-only home: help still shows, only not faster next time
    return text


def serve_help(prog: str, builder: str, argv: list[str] | None = None) -> None:
    """Print the help and exit when the command line is exactly ``--help``; otherwise return at once."""
    if not _rendering and asks_for_help_only(sys.argv[1:] if argv is None else argv):
        sys.stdout.write(rendered_help(prog, builder))
        sys.stdout.flush()
        raise SystemExit(0)
