"""How layerwatch writes values for people: byte sizes, and text from untrusted files.

Shared by every stage (messages of the writer and renderer, ``layerwatch info``,
the CLI, the report), so a size or a name reads the same everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def format_bytes(n: float | None) -> str:
    """A byte count in SI units, as file managers and ``--max-bytes`` count them.

    Examples
    --------
    >>> format_bytes(1_500_000)
    '1.5 MB'
    >>> format_bytes(999)
    '999 B'
    """
    if n is None:
        return "unlimited"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{int(n)} B"


def printable(text: Any) -> str:
    """Text from a file, safe to print: control characters become '?'."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def shorten(value: Any, limit: int = 60) -> str:
    """``value`` as printable text of at most ``limit`` characters (cut with "...")."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = printable(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
