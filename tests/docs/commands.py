"""The shell commands of README.md and docs/, as a user pastes them: extracted, joined, and split into words.

The convention the docs follow: a ```bash block holds commands to run from the repository root, after the README's
set-up, in the order shown. A command is one line, or several joined by trailing backslashes; a trailing comment
``# needs GPU, network[: why]`` names what beyond a CPU machine it needs, from :data:`NEEDS`. Only words are
handled here (no project imports): what a command means is checked in ``test_commands.py``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

NEEDS = ("GPU", "network", "Slurm", "root", "Chromium", "data")  # data: a copy of a data set the user supplies
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
CONTROL = {"&&", "||", "|", ";", "&"}
# Values for the variables the docs use, so that their commands parse as they would on a real machine.
EXAMPLE_VARIABLES = {"NODE_RANK": "0", "MAIN_ADDR": "10.0.0.1", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                     "SLURM_JOB_NODELIST": "n[1-2]", "HOME": "/home/user", "SFT_DATA_DIR": "/data/sft", "JOB": "1234",
                     "USER": "user"}
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_NEEDS = re.compile(r"\bneeds\s+(\w+(?:\s*,\s*\w+)*)")
_SUBSTITUTION = "SUBSTITUTION"


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, its text without the comment, and what it says it needs."""

    file: str
    line: int
    text: str
    comment: str
    needs: frozenset[str]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SimpleCommand:
    """One program call of a command line: ``env`` holds the ``NAME=value`` words before it."""

    argv: list[str]
    env: dict[str, str]


def documented_files(repo: Path) -> list[Path]:
    """README.md first (its set-up comes first), then docs/*.md by name, then the data guide."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md")), repo / "data" / "README.md"]


def commands_in(name: str, markdown: str) -> list[Command]:
    """Every command of every shell block of one markdown text, in order."""
    found: list[Command] = []
    for block in _FENCE.finditer(markdown):
        if block.group(1) not in SHELL_LANGUAGES:
            continue
        first_line = markdown.count("\n", 0, block.start(2)) + 1
        pending: list[str] = []
        start = first_line
        for offset, raw in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first_line + offset
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
            if raw.rstrip().endswith("\\"):
                pending.append(raw.rstrip()[:-1])
                continue
            text, comment = split_comment(" ".join(part.strip() for part in [*pending, raw] if part.strip()))
            pending = []
            found.append(Command(name, start, text.strip(), comment, frozenset(needs_of(comment))))
    return found


def split_comment(line: str) -> tuple[str, str]:
    """A line's code and its trailing ``#`` comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def needs_of(comment: str) -> list[str]:
    """The words of a ``needs A, B`` comment (unknown ones too, so that a typo can be reported)."""
    match = _NEEDS.search(comment)
    return [word.strip() for word in match.group(1).split(",")] if match else []


def simple_commands(text: str) -> list[SimpleCommand]:
    """The program calls of a command line: split at ``|``, ``&&``, ``||``, ``;``; ``$( )`` bodies come first.

    Variables take the values of :data:`EXAMPLE_VARIABLES` (others stay as written) and ``$(( ))`` is computed.
    """
    text = _expand_variables(text)
    inner: list[str] = []
    text = _take_substitutions(text, inner)
    calls = [call for body in inner for call in simple_commands(body)]
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words: list[str] = []
    for word in [*lexer, ";"]:
        if word not in CONTROL:
            words.append(word)
            continue
        env = {}
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            calls.append(SimpleCommand(words, env))
        words = []
    return calls


def _expand_variables(text: str) -> str:
    def variable(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return EXAMPLE_VARIABLES.get(name, match.group(0))

    text = re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", variable, text)

    def arithmetic(match: re.Match) -> str:
        expression = re.sub(r"[A-Za-z_]\w*", lambda m: EXAMPLE_VARIABLES.get(m.group(0), m.group(0)), match.group(1))
        if not re.fullmatch(r"[\d\s+*/()-]+", expression):
            return match.group(0)
        return str(int(eval(expression)))  # digits and operators only (checked above)

    return re.sub(r"\$\(\((.*?)\)\)", arithmetic, text)


def _take_substitutions(text: str, inner: list[str]) -> str:
    """Replace each ``$( … )`` by a placeholder word, collecting the bodies (nested parentheses balanced)."""
    out = []
    i = 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            inner.append(text[i + 2:j - 1])
            out.append(_SUBSTITUTION)
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def inline_spans(markdown: str) -> list[tuple[int, str]]:
    """The inline code spans outside fenced blocks, with their line numbers."""
    spans = []
    outside = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), markdown)
    for match in re.finditer(r"`([^`\n]+)`", outside):
        spans.append((outside.count("\n", 0, match.start()) + 1, match.group(1)))
    return spans
