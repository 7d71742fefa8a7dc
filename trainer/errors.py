"""The one base class of faults a user can fix, so every entry point reports them the same way.

A :class:`UserError` carries one sentence that names the file (and line), the flag or the path at fault and what to
do about it. Entry points catch ``UserError`` — not a growing list of classes — print it once as ``error: …`` and
exit 2; anything else is a bug and keeps its traceback. Each module keeps its own subclass (``DataError``,
``ConfigError``…) for callers that need to tell them apart.
"""

from __future__ import annotations


class UserError(Exception):
    """A fault in the user's input, options or files; the message says what to change."""
