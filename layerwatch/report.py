"""``layerwatch report``: everything about one run on one page.

Writes into a directory:

- ``report.html`` — one self-contained page (every image embedded as a
  ``data:`` URI, no script, no external resource) that opens offline in any
  browser: run metadata, model summary, training curves, drift (plot and
  settled table), health, and every layer's GIF with its final still;
- ``report.md`` — the same in Markdown with relative image paths, for GitHub
  READMEs and wikis;
- ``view/``, the step-slider page (:func:`layerwatch.view.write_view`), which
  both link to (it needs its script, so it is not inside the report);
- the images both refer to: ``<layer>.gif``/``<layer>.png`` and
  ``curves.png`` (from :func:`layerwatch.render`), ``drift.png`` and
  ``health.png``.

Everything taken from the recording (names, metadata, the model summary) is
untrusted: the HTML escapes it and forbids scripts with a Content Security
Policy; the Markdown escapes it and fences the summary.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np

from layerwatch.analysis.drift import DriftResult, drift_of_run, plot_drift
from layerwatch.analysis.health import HealthResult, health_of_run, plot_health
from layerwatch.outputs import default_out_dir, write_text
from layerwatch.store.schema import (ATTR_FLUSH_SECONDS, ATTR_FLUSH_SNAPSHOTS, ATTR_WRITER_HOST,
                                     ATTR_WRITER_PID)
from layerwatch.store import RecordingError, open_run
from layerwatch.view import write_view

_VIEW = "view"  # the step viewer's folder, beside the report
_VIEWER_LINK = "Scrub through training: every layer at one step, hover for values"
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_MAX_META_VALUE = 300  # characters of one metadata value shown
#: Root attributes about the writing process, not the run: `layerwatch info` shows
#: them (is the writer alive?); a page meant to be shared does not.
_WRITER_ONLY = frozenset({ATTR_WRITER_PID, ATTR_WRITER_HOST, ATTR_FLUSH_SECONDS,
                          ATTR_FLUSH_SNAPSHOTS})
_MIN_LAYER_WIDTH = 360  # CSS pixels a layer image is zoomed up to (by whole factors)


@dataclass
class _LayerImages:
    key: str
    info: str
    gif: Path | None
    still: Path | None


@dataclass
class _Report:
    title: str
    source: str
    meta: list[tuple[str, str]]
    summary: str
    probes: str
    curves: Path | None
    drift_png: Path | None
    drift: DriftResult | None
    drift_error: str | None
    health_png: Path
    health: HealthResult
    layers: list[_LayerImages]
    render_notes: list[str] = field(default_factory=list)


def report(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           max_frames: int | None = None, max_bytes: int | None = None,
           fps: float = 10.0, scale: int = 1, max_channels: int | None = 32,
           notes: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` for one recording.

    Parameters
    ----------
    path
        A layerwatch recording.
    out_dir
        Output directory; default ``outputs/<file stem>/``.
    max_frames
        At most this many frames per GIF (first and last kept).
    max_bytes
        Byte budget per GIF (see :func:`layerwatch.render`); keeps the
        self-contained page small.
    fps, scale, max_channels
        As in :func:`layerwatch.render`.
    notes
        Called with one line per thing worth telling (what render adjusted,
        how many probes drift rests on).

    Returns
    -------
    list of pathlib.Path
        ``report.html``, ``report.md``, the images they show and, last, the
        step viewer's ``view/index.html``.

    Raises
    ------
    layerwatch.store.RecordingError
        The file is missing, foreign, damaged or holds no snapshot.
    ValueError
        A bad option.

    Examples
    --------
    >>> report("runs/mnist.h5", "outputs/mnist")     # doctest: +SKIP
    [PosixPath('outputs/mnist/report.html'), PosixPath('outputs/mnist/report.md'), ...]
    """
    from layerwatch.rendering.run import render

    out = default_out_dir(path) if out_dir is None else Path(out_dir)
    say = notes or (lambda text: None)
    render_notes: list[str] = []

    def collect(text: str) -> None:
        render_notes.append(text)
        say(text)

    rendered = render(path, out, max_frames=max_frames, max_bytes=max_bytes, fps=fps,
                      scale=scale, max_channels=max_channels, notes=collect)
    viewer = write_view(path, out / _VIEW, max_channels=max_channels)[0]
    with open_run(path) as run:
        if run.num_snapshots == 0:
            raise RecordingError(f"{run.path} holds no snapshot yet: nothing to report.")
        layer_files = _layer_files(rendered, len(run.layers))
        layers = []
        for layer, (gif, still) in zip(run.layers, layer_files):
            info = (f"{layer.layer_class} · output {layer.shape} · {layer.activation} · "
                    f"recorded: {layer.tensor}")
            layers.append(_LayerImages(layer.key, info, gif, still))
        drift_result, drift_png, drift_error = None, None, None
        try:
            drift_result = drift_of_run(run)
            drift_png = Path(plot_drift(drift_result, out / "drift.png"))
            say(drift_result.probes_note())
        except ValueError as exc:  # e.g. a single probe: CKA undefined
            drift_error = str(exc)
            say(f"drift skipped: {exc}")
        health_result = health_of_run(run)
        health_png = Path(plot_health(health_result, out / "health.png"))
        attrs = run.attrs
        title = str(attrs.get("model_name") or Path(run.path).stem)
        steps = run.steps
        probes_y = run.probes_y()
        probes = (f"{run.probes_x().shape[0]} probes of shape {run.probes_x().shape[1:]}"
                  + (f", labels {probes_y.tolist()}" if probes_y is not None else "")
                  + f"; {len(steps)} snapshots, steps {steps[0]}..{steps[-1]}")
        data = _Report(
            title=title, source=os.path.basename(run.path),
            meta=[(str(k), _short(v)) for k, v in sorted(attrs.items())
                  if k not in _WRITER_ONLY],
            summary=run.text("summary") or "", probes=probes,
            curves=next((p for p in rendered if p.name == "curves.png"), None),
            drift_png=drift_png, drift=drift_result, drift_error=drift_error,
            health_png=health_png, health=health_result, layers=layers,
            render_notes=render_notes)
    html_path = out / "report.html"
    md_path = out / "report.md"
    write_text(html_path, _html(data))
    write_text(md_path, _markdown(data))
    images = [p for p in rendered] + [p for p in (drift_png, health_png) if p is not None]
    return [html_path, md_path] + images + [viewer]


def _layer_files(rendered: list[Path], n_layers: int) -> list[tuple[Path | None, Path | None]]:
    """Pair render's outputs per layer: it writes ``[stem.gif], stem.png`` per layer, in order."""
    pairs: list[tuple[Path | None, Path | None]] = []
    files = [p for p in rendered if p.name != "curves.png"]
    i = 0
    while i < len(files) and len(pairs) < n_layers:
        gif = still = None
        if files[i].suffix == ".gif":
            gif = files[i]
            i += 1
        if i < len(files) and files[i].suffix == ".png":
            still = files[i]
            i += 1
        pairs.append((gif, still))
    pairs += [(None, None)] * (n_layers - len(pairs))
    return pairs


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = str(value)
    return text if len(text) <= _MAX_META_VALUE else text[:_MAX_META_VALUE] + "…"


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px;
      line-height: 1.2; }
img { max-width: 100%; height: auto; }
img.px { image-rendering: pixelated; }
.layer { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.layer figure { margin: 0; }
figcaption { color: #555; font-size: 0.85em; }
.note { color: #555; }
"""


def _img_data(path: Path) -> str:
    mime = "image/gif" if path.suffix.lower() == ".gif" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _img(path: Path | None, alt: str, *, pixelated: bool = False) -> str:
    if path is None:
        return f'<p class="note">{html.escape(alt)}: not available.</p>'
    size = ""
    if pixelated:
        # Small frames (8×8 probes) are drawn at a whole-number zoom, crisp.
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        zoom = max(1, min(4, _MIN_LAYER_WIDTH // max(width, 1)))
        size = f' class="px" width="{width * zoom}" height="{height * zoom}"'
    return f'<img{size} src="{_img_data(path)}" alt="{html.escape(alt, quote=True)}">'


def _html(r: _Report) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(r.title)} — layerwatch report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{e(r.title)}</h1>",
        f'<p class="sub">layerwatch report of <code>{e(r.source)}</code> · {e(r.probes)}</p>',
        f'<p><a href="{_VIEW}/index.html">{_VIEWER_LINK}</a> (opens the page beside '
        "this report).</p>",
        "<h2>Run</h2><table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in r.meta]
    parts.append("</table>")
    if r.summary.strip():
        parts.append(f"<h2>Model</h2><pre>{e(r.summary)}</pre>")
    parts.append("<h2>Training curves</h2>")
    parts.append(_img(r.curves, "training curves"))
    parts.append("<h2>Representation drift</h2>")
    if r.drift is not None:
        d = r.drift
        parts.append(f'<p class="note">{e(d.probes_note())} Linear CKA (Kornblith et al., '
                     "2019) of each snapshot with the final one; settled: the first step from "
                     f"which it stays ≥ {d.threshold:g}.</p>")
        parts.append(_img(r.drift_png, "representation drift"))
        parts.append(_drift_table_html(d))
    else:
        parts.append(f'<p class="note">Not measured: {e(r.drift_error or "")}</p>')
    parts.append("<h2>Health</h2>")
    parts.append(_img(r.health_png, "saturation and dead channels"))
    findings = r.health.findings()
    if findings:
        parts.append("<p>At the final step:</p><ul>")
        parts += [f"<li>{e(line)}</li>" for line in findings]
        parts.append("</ul>")
    else:
        parts.append('<p class="note">No layer ends with dead or saturated channels.</p>')
    parts.append("<h2>Layers</h2>")
    if r.render_notes:
        parts.append('<ul class="note">' + "".join(f"<li>{e(n)}</li>" for n in r.render_notes)
                     + "</ul>")
    for layer in r.layers:
        parts.append(f"<h3>{e(layer.key)}</h3><p class=\"sub\">{e(layer.info)}</p>")
        parts.append('<div class="layer">')
        for image, alt, caption in ((layer.gif, " over training", "over training"),
                                    (layer.still, " at the final step", "final step")):
            parts.append(f"<figure>{_img(image, layer.key + alt, pixelated=True)}"
                         f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    parts.append('<p class="note">Made with layerwatch.</p></body></html>')
    return "\n".join(parts) + "\n"


def _drift_table_html(d: DriftResult) -> str:
    e = html.escape
    rows = ["<table><tr><th>layer</th><th>CKA to final at first snapshot</th>"
            f"<th>settled (≥ {d.threshold:g}) from step</th>"
            f"<th>{d.threshold:.0%} of drift done by step</th>"
            "<th>last change (1 − CKA)</th></tr>"]
    for row in d.rows():
        rows.append(
            f"<tr><td>{e(row['layer'])}</td><td class=\"num\">{_num(row['cka_first'], '.3f')}"
            f"</td><td class=\"num\">{_step(row['settled'])}</td>"
            f"<td class=\"num\">{_step(row['settled_relative'])}</td>"
            f"<td class=\"num\">{_num(row['final_change'], '.2e')}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _num(value: float, spec: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _step(value: int | None) -> str:
    return "n/a" if value is None else str(value)


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>])")


def _md(text: str) -> str:
    """Escape untrusted text for a Markdown paragraph or table cell (no HTML, no links)."""
    text = html.escape(str(text), quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return " ".join(text.split())  # no newlines: they would end a table row


def _md_img(path: Path | None, alt: str, out: Path) -> str:
    if path is None:
        return f"*{_md(alt)}: not available.*"
    rel = os.path.relpath(path, out)
    return f"![{_md(alt)}]({quote(rel.replace(os.sep, '/'))})"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _markdown(r: _Report) -> str:
    out = r.health_png.parent
    lines = [f"# {_md(r.title)}", "",
             f"layerwatch report of `{_md(r.source)}`: {_md(r.probes)}", "",
             f"[{_VIEWER_LINK}]({_VIEW}/index.html)", "",
             "## Run", "", "| attribute | value |", "|---|---|"]
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in r.meta]
    if r.summary.strip():
        lines += ["", "## Model", "", _fence(r.summary)]
    lines += ["", "## Training curves", "", _md_img(r.curves, "training curves", out)]
    lines += ["", "## Representation drift", ""]
    if r.drift is not None:
        d = r.drift
        lines += [f"{_md(d.probes_note())} Settled: the first step from which linear CKA to the "
                  f"final snapshot stays ≥ {d.threshold:g}.", "",
                  _md_img(r.drift_png, "representation drift", out), "",
                  f"| layer | CKA to final at first snapshot | settled (≥ {d.threshold:g}) "
                  f"| {d.threshold:.0%} of drift done by step | last change (1 − CKA) |",
                  "|---|---:|---:|---:|---:|"]
        for row in d.rows():
            lines.append(f"| {_md(row['layer'])} | {_num(row['cka_first'], '.3f')} | "
                         f"{_step(row['settled'])} | {_step(row['settled_relative'])} | "
                         f"{_num(row['final_change'], '.2e')} |")
    else:
        lines.append(f"Not measured: {_md(r.drift_error or '')}")
    lines += ["", "## Health", "", _md_img(r.health_png, "saturation and dead channels", out), ""]
    findings = r.health.findings()
    if findings:
        lines += ["At the final step:", ""] + [f"- {_md(line)}" for line in findings]
    else:
        lines.append("No layer ends with dead or saturated channels.")
    lines += ["", "## Layers"]
    for layer in r.layers:
        lines += ["", f"### {_md(layer.key)}", "", _md(layer.info), "",
                  _md_img(layer.gif, f"{layer.key} over training", out) + " " +
                  _md_img(layer.still, f"{layer.key} at the final step", out)]
    return "\n".join(lines) + "\n"
