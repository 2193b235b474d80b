"""Where layerwatch writes pictures unless told otherwise: ``outputs/<run name>/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def default_out_dir(run: str | os.PathLike) -> Path:
    """``outputs/<run file stem>/``: the folder of one run's pictures, report and figures."""
    return Path("outputs") / Path(run).stem


def compare_out_dir(labels: Sequence[str]) -> Path:
    """``outputs/compare_<label>_<label>.../``: the folder of a comparison of runs."""
    return Path("outputs") / ("compare_" + "_".join(label.replace("/", "_") for label in labels))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically: readers see the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
