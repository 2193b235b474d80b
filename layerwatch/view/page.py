"""``layerwatch view``: a page to scrub through a recording, every layer at one step.

The page is a folder that opens from disk, with no server and no network::

    view/index.html        the page (its script and style beside it)
    view/viewer.js, viewer.css
    view/data/manifest.js  steps, epochs, curves, each panel's geometry
    view/data/img_<panel>_<chunk>.js, val_<panel>_<chunk>.js   (see layerwatch.view.data)

Writing it again over the same folder rewrites only the chunks that changed
(a growing run adds its new snapshots; a layer whose colour range moved is
redrawn), so re-running it, or :func:`follow_view`, keeps up with training.
"""

from __future__ import annotations

import html
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from layerwatch.outputs import default_out_dir, write_text
from layerwatch.rendering.options import check_options
from layerwatch.rendering.selection import select_frames
from layerwatch.store import RecordingError, Run, open_run

from . import data as _data

_ASSETS = ("viewer.js", "viewer.css")
#: How often (ms) an open page looks for a newer manifest while the run records.
_POLL_MS = 5000


def default_view_dir(path: str | os.PathLike) -> Path:
    """``outputs/<run file stem>/view/``: where ``layerwatch view`` writes by default."""
    return default_out_dir(path) / "view"


def write_view(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
               layers: Sequence[str] | None = None, max_channels: int | None = 32,
               max_frames: int | None = None,
               notes: Callable[[str], None] | None = None) -> list[Path]:
    """Write the step-slider page of one recording into a folder.

    Parameters
    ----------
    path
        A layerwatch recording (complete, or still being written).
    out_dir
        The page's folder; default ``outputs/<file stem>/view/``. Chunks an
        earlier build wrote there are reused when still right.
    layers
        Layer keys or names to show (default all).
    max_channels
        Show at most this many channels per layer; None shows all.
    max_frames
        At most this many snapshots, evenly spaced (first and last kept);
        default every snapshot.
    notes
        Called with one line saying what was written and reused.

    Returns
    -------
    list of pathlib.Path
        ``index.html`` first, then every other file of the page.

    Raises
    ------
    layerwatch.store.RecordingError
        The file is missing, foreign, damaged or holds no snapshot.
    ValueError
        An unknown layer or a bad option.

    Examples
    --------
    >>> write_view("runs/mnist_tanh.h5")[0]          # doctest: +SKIP
    PosixPath('outputs/mnist_tanh/view/index.html')
    """
    check_options(max_frames=max_frames, max_channels=max_channels)
    out = default_view_dir(path) if out_dir is None else Path(out_dir)
    data_dir = out / "data"
    previous = _previous_manifest(data_dir / "manifest.json")
    written = 0
    with open_run(path) as run:
        manifest, panels, indices = _manifest(run, layers, max_channels, max_frames)
        # Only now, the run and the options checked: a mistake leaves no folder behind.
        data_dir.mkdir(parents=True, exist_ok=True)
        for panel in panels:
            keep = _reusable(previous, panel.meta, manifest["steps"], data_dir)
            for c, image, values in _data.panel_chunks(panel, indices, keep=keep):
                for kind, text in (("img", image), ("val", values)):
                    write_text(data_dir / _data.chunk_name(kind, panel.meta["index"], c), text)
                written += 1
    total = sum(_chunks(p, indices) for p in manifest["panels"])
    manifest["chunk_steps"] = [
        [manifest["steps"][c * p["chunk"]:(c + 1) * p["chunk"]]
         for c in range(_chunks(p, indices))] for p in manifest["panels"]]
    names = {_data.chunk_name(kind, p["index"], c) for p in manifest["panels"]
             for c in range(_chunks(p, indices)) for kind in ("img", "val")}
    for stale in data_dir.glob("*_*_*.js"):
        if stale.name not in names:
            stale.unlink()
    write_text(data_dir / "manifest.json", json.dumps(manifest))
    write_text(data_dir / "manifest.js", f"LW.manifest({_data.json_for_script(manifest)});\n")
    for name in _ASSETS:
        write_text(out / name, _asset(name))
    write_text(out / "index.html", _page(manifest, inline=None))
    if notes is not None:
        notes(f"{written} chunk(s) written, {total - written} reused, "
              f"{len(indices)} snapshot(s), {len(panels)} panel(s)")
    files = sorted(data_dir.iterdir())
    return [out / "index.html"] + [out / name for name in _ASSETS] + files


def follow_view(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                interval: float = 10.0, notes: Callable[[str], None] | None = None,
                **options: Any) -> str:
    """Rewrite the page whenever training has flushed new snapshots, until the run ends.

    An open page sees the new snapshots by itself (it reloads its manifest
    every few seconds while the run records). ``options`` are those of
    :func:`write_view`; the loop and its return value are those of
    :func:`layerwatch.rendering.watch.watch`.
    """
    from layerwatch.rendering.watch import watch

    return watch(path, out_dir, interval=interval, notes=notes, build=write_view, **options)


def view_html(path: str | os.PathLike, *, layers: Sequence[str] | None = None,
              max_channels: int | None = 32, max_frames: int | None = 200) -> str:
    """The same page as one self-contained HTML string, data and script inline.

    For notebooks (:func:`layerwatch.show`) and anywhere one file is wanted;
    ``max_frames`` (default 200 snapshots, evenly spaced) keeps it light.
    Parameters and errors are those of :func:`write_view`.
    """
    check_options(max_frames=max_frames, max_channels=max_channels)
    with open_run(path) as run:
        manifest, panels, indices = _manifest(run, layers, max_channels, max_frames)
        manifest["inline"] = True
        scripts = [text for panel in panels
                   for _, image, values in _data.panel_chunks(panel, indices)
                   for text in (image, values)]
    return _page(manifest, inline=scripts)


def _manifest(run: Run, layers: Sequence[str] | None, max_channels: int | None,
              max_frames: int | None) -> tuple[dict[str, Any], list[_data.PanelData], np.ndarray]:
    n = run.num_snapshots
    if n == 0:
        raise RecordingError(f"{run.path} holds no snapshot yet: nothing to view. Run it "
                             "again once training has recorded a step.")
    indices = select_frames(n, max_frames=max_frames)
    panels = _data.layer_panels(run, run.select_layers(layers), max_channels=max_channels, n=n)
    labels = run.probes_y()
    manifest = {
        "version": _data.DATA_VERSION, "rev": time.time_ns() // 1000,
        "title": str(run.attrs.get("model_name") or Path(run.path).stem),
        "source": os.path.basename(run.path),
        "live": run.writer_state == "live", "poll_ms": _POLL_MS,
        "steps": run.steps[indices].tolist(), "epochs": run.epochs[indices].tolist(),
        "labels": None if labels is None else [int(v) for v in labels],
        "curves": _data.curves(run),
        "panels": [p.meta for p in panels],
    }
    return manifest, panels, indices


def _chunks(meta: dict[str, Any], indices: np.ndarray) -> int:
    return -(-len(indices) // meta["chunk"])


def _previous_manifest(path: Path) -> dict[str, Any] | None:
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and previous.get(
        "version") == _data.DATA_VERSION else None


def _reusable(previous: dict[str, Any] | None, meta: dict[str, Any], steps: list[int],
              data_dir: Path) -> Callable[[int], bool]:
    """Which chunks of a panel an earlier build already wrote as they are now:
    the same panel signature, the same steps, and both files still there."""
    old = None
    if previous is not None:
        for p, chunk_steps in zip(previous.get("panels", []), previous.get("chunk_steps", [])):
            if isinstance(p, dict) and p.get("sig") == meta["sig"]:
                old = chunk_steps
    if old is None:
        return lambda c: False
    k = meta["chunk"]

    def keep(c: int) -> bool:
        return (c < len(old) and old[c] == steps[c * k:(c + 1) * k]
                and all((data_dir / _data.chunk_name(kind, meta["index"], c)).is_file()
                        for kind in ("img", "val")))
    return keep


def _asset(name: str) -> str:
    return resources.files("layerwatch.view").joinpath("assets", name).read_text("utf-8")


def _page(manifest: dict[str, Any], *, inline: list[str] | None) -> str:
    """``index.html``: scripts beside it (``inline=None``) or all inline."""
    title = html.escape(f"{manifest['title']} — layerwatch view")
    if inline is None:
        csp = ("default-src 'none'; script-src file: 'self'; style-src file: 'self'; "
               "img-src data:")
        head = '<link rel="stylesheet" href="viewer.css">'
        body = ('<script src="viewer.js"></script>\n'
                '<script src="data/manifest.js"></script>')
    else:
        csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; " \
              "img-src data:"
        head = f"<style>{_asset('viewer.css')}</style>"
        scripts = [_asset("viewer.js"),
                   f"LW.manifest({_data.json_for_script(manifest)});"] + inline
        body = "\n".join(f"<script>{s}</script>" for s in scripts)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n{head}</head>\n"
            '<body><noscript>The layerwatch viewer needs JavaScript.</noscript>\n'
            f"{body}\n</body></html>\n")
