"""Following a recording while training writes it (what ``layerwatch watch`` runs)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from layerwatch.store import open_run

Notes = Callable[[str], None]


def watch(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
          interval: float = 10.0, notes: Notes | None = None,
          sleep: Callable[[float], Any] = time.sleep,
          build: Callable[..., list] | None = None, **render_options: Any) -> str:
    """Re-render a recording whenever new snapshots are flushed, until the run ends.

    Checks the file every ``interval`` seconds; when it holds more snapshots
    than at the last render, renders it again with ``build`` (default
    :func:`layerwatch.render`; ``out_dir`` and ``render_options`` are
    passed on). Returns when the run is over — closed normally, stopped, or
    its writer gone — after a last render of everything it holds.

    Parameters
    ----------
    path
        The recording, usually one being written by :class:`layerwatch.LayerWatch`.
    out_dir
        Where the pictures go (default ``outputs/<file stem>/``).
    interval
        Seconds between checks.
    notes
        Called with one line after each render and when the run ends.
    sleep
        Waits between checks (tests pass a fake one).
    build
        What writes the outputs, called as ``build(path, out_dir, **render_options)``
        and returning the paths written (:func:`layerwatch.view.write_view` for the
        viewer page).

    Returns
    -------
    str
        How the run ended: ``"closed"`` (complete or stopped), ``"gone"``
        (the writer died without closing the file) or ``"stalled"``.

    Raises
    ------
    RecordingError
        The file is missing, not a recording or damaged.
    ValueError
        ``interval`` is not positive, or a render option is invalid.
    """
    if build is None:
        from layerwatch.rendering.run import render as build

    if not interval > 0:
        raise ValueError(f"interval must be > 0 seconds. Received: interval={interval!r}")
    say = notes or (lambda line: None)
    rendered = 0
    while True:
        with open_run(path) as run:
            state = run.writer_state  # read before counting: a closed run is final
            run.refresh()
            n, steps = run.num_snapshots, run.steps
        if n > rendered:
            written = build(path, out_dir, **render_options)
            rendered = n
            where = Path(written[0]).parent if written else out_dir
            say(f"rendered {n} snapshot(s), up to step {steps[-1]}, into {where}")
        if state not in ("live", "unknown"):
            say({"closed": "the run is over: its file was closed.",
                 "gone": "the run ended without closing its file (writer killed or crashed).",
                 "stalled": "the writer has stopped writing; not waiting any longer."}[state])
            return state
        sleep(interval)
