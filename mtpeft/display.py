"""Text shown on a terminal: names read from files (module names, task names, paths) may hold control
characters; they are shown escaped (``\\x1b``, ``\\n``) so they never reach the terminal raw."""
from __future__ import annotations


def printable(text, keep: str = "") -> str:
    """``text`` with every non-printable character (control, format, unassigned) written as Python writes it
    in a ``repr`` (``\\x1b``, ``\\n``, ``\\u200b``); characters in ``keep`` stay as they are."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in s)
