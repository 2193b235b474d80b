"""Names of the pictures a render writes: safe, distinct, and inside their folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str) -> str:
    """A file name stem for a layer name that cannot leave its directory.

    Examples
    --------
    >>> safe_stem("../../etc/passwd")
    'etc_passwd'
    >>> safe_stem("encoder/conv 1")
    'encoder_conv_1'
    """
    stem = _UNSAFE.sub("_", name).strip("._")
    stem = re.sub(r"\.{2,}", ".", stem)[:100]
    return stem or "layer"


def file_stems(names: Sequence[str], *, reserved: Sequence[str] = ("curves",)) -> list[str]:
    """Safe, distinct stems; none is a ``reserved`` one, so no layer overwrites curves.png."""
    taken = {r.lower() for r in reserved}
    stems = []
    for name in names:
        stem = base = safe_stem(name)
        k = 2
        while stem.lower() in taken:
            stem = f"{base}_{k}"
            k += 1
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def inside(out: Path, name: str) -> Path:
    """``out / name``, refused if it would land outside ``out`` (belt and braces over safe_stem)."""
    path = out / name
    if path.resolve().parent != out.resolve():
        raise ValueError(f"Refusing to write {name!r} outside {out}.")
    return path
