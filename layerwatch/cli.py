"""The ``layerwatch`` command line: a thin wrapper over the library."""

from __future__ import annotations

import os

import click

from .version import __version__
from .store import RecordingError
from .text import format_bytes


def _echo_written(paths) -> None:
    for path in paths:
        click.echo(f"{path}  ({format_bytes(os.path.getsize(path))})")


def _notes(quiet: bool):
    """Where the library's notes (what a render chose or trimmed) go: stderr."""
    def notes(line: str) -> None:
        if not quiet:
            click.echo(f"note: {line}", err=True)
    return notes


class _Group(click.Group):
    """Every command's failure is one ``Error: ...`` line and exit 1: the one
    place the CLI turns exceptions into messages.

    Library errors (:class:`RecordingError`, and ``ValueError`` for a bad
    option or layer name) become their message; an output that cannot be
    written says which; anything else a damaged file provokes deep inside
    h5py or numpy becomes one line too, never a traceback
    (``LAYERWATCH_DEBUG=1`` shows it).
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (RecordingError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(
                f"Cannot write {exc.filename or 'the outputs'}: {exc.strerror or exc}") from None
        except Exception as exc:
            if os.environ.get("LAYERWATCH_DEBUG"):
                raise
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {reason} (if the file is intact, this is "
                "a layerwatch bug: rerun with LAYERWATCH_DEBUG=1 and report the traceback)"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="layerwatch")
def main() -> None:
    """Watch a neural network learn: inspect and render layerwatch recordings."""


class _ByteSize(click.ParamType):
    """A byte count such as 2000000, 2MB, 1.5M, 500kB or 2MiB."""

    name = "size"
    _UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
              "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in self._UNITS:
            self.fail(f"{value!r} is not a size; use bytes or a unit, e.g. 2000000, 2MB, 500kB.",
                      param, ctx)
        size = int(float(match.group(1)) * self._UNITS[unit])
        if size < 1:
            self.fail(f"{value!r} is not a positive size.", param, ctx)
        return size


class _ColorRange(click.ParamType):
    """M (for -M..M) or LOW,HIGH."""

    name = "range"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        import math

        try:
            parts = [float(p) for p in str(value).split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1 and math.isfinite(parts[0]) and parts[0] > 0:
            return (-parts[0], parts[0])
        if len(parts) == 2 and all(map(math.isfinite, parts)) and parts[0] < parts[1]:
            return (parts[0], parts[1])
        self.fail(f"{value!r} is not a colour range; use M (for -M..M, M > 0) or LOW,HIGH "
                  "with LOW < HIGH, e.g. --range 1 or --range=-0.5,2.", param, ctx)


def _options(*options):
    """One decorator from several click options (first listed = first in --help)."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def _out_option(default: str, what: str = "Output directory"):
    return click.option("-o", "--out", "--out-dir", "out", type=click.Path(file_okay=False),
                        default=None, help=f"{what} (default {default}).")


def _layers_option(what: str):
    return click.option("--layers", multiple=True, metavar="NAMES", help=what)


_max_frames_option = click.option(
    "--max-frames", type=click.IntRange(min=2), default=None,
    help="At most N frames per GIF, evenly spaced (first and last kept).")
_max_bytes_option = click.option(
    "--max-bytes", type=_ByteSize(), default=None,
    help="Keep each GIF under this size (e.g. 2MB): fewer frames (the quietest first), then "
         "a smaller scale.")
_quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
_max_channels_option = click.option(
    "--max-channels", type=click.IntRange(min=0), default=32, show_default=True,
    help="Draw at most N channels per layer (0: all).")
#: The GIF look options shared by the commands that write GIFs.
_gif_options = _options(
    click.option("--fps", type=click.FloatRange(min=0, min_open=True, max=50),
                 default=10.0, show_default=True, help="GIF frames per second."),
    click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True,
                 help="Integer pixel zoom."),
    _max_channels_option)


def _names(items: tuple[str, ...]) -> list[str] | None:
    """``--layers a,b --layers c`` → ``["a", "b", "c"]`` (None when not given)."""
    return [n.strip() for item in items for n in item.split(",") if n.strip()] or None


@main.command(short_help="Summarize a recording: layers, steps, metrics, state.")
@click.argument("run", type=click.Path(dir_okay=False))
def info(run: str) -> None:
    """Summarize the recording RUN.h5: layers, steps, metrics, size, state."""
    from .analysis.summary import describe_run

    click.echo(describe_run(run))


@main.command(short_help="Render a recording into GIFs, stills and curves.")
@click.argument("run", type=click.Path(dir_okay=False))
@_out_option("outputs/<run name>/")
@_layers_option("Layers to render: comma-separated or repeated (default all).")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="Use every N-th snapshot (the last is always kept).")
@_max_frames_option
@_gif_options
@_max_bytes_option
@click.option("--range", "color_range", type=_ColorRange(), default=None,
              help="Colour range: M for -M..M, or LOW,HIGH (default: the activation's natural "
                   "range, else the 99.9th percentile of |activation|).")
@_quiet_option
def render(run: str, out: str | None, layers: tuple[str, ...], every: int | None,
           max_frames: int | None, fps: float, scale: int, max_channels: int,
           max_bytes: int | None, color_range: tuple[float, float] | None, quiet: bool) -> None:
    """Render RUN.h5 into <layer>.gif, <layer>.png (final step) and curves.png."""
    from .rendering.run import render as render_run

    with _RenderProgress(enabled=not quiet) as progress:
        written = render_run(run, out, layers=_names(layers), every=every,
                             max_frames=max_frames, fps=fps, scale=scale,
                             max_channels=max_channels or None, max_bytes=max_bytes,
                             value_range=color_range, progress=progress, notes=_notes(quiet))
    if not quiet:
        _echo_written(written)


class _RenderProgress:
    """A click progress bar that appears once a render is long enough to want one."""

    _MIN_FRAMES = 300

    def __init__(self, *, enabled: bool):
        self._enabled = enabled
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled or total < self._MIN_FRAMES:
            return
        if self._bar is None:
            stream = click.get_text_stream("stderr")
            if not stream.isatty():  # no bar in logs and pipes
                self._enabled = False
                return
            self._bar = click.progressbar(length=total, label="Rendering", file=stream)
            self._bar.__enter__()
        self._bar.length = total
        self._bar.update(done - self._done)
        self._done = done

    def __enter__(self) -> "_RenderProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@main.command(short_help="Write a page to scrub through a run, every layer at one step.")
@click.argument("run", type=click.Path(dir_okay=False))
@_out_option("outputs/<run name>/view/")
@_layers_option("Layers to show: comma-separated or repeated (default all).")
@_max_frames_option
@_max_channels_option
@click.option("--follow", is_flag=True,
              help="Keep rewriting the page while training writes RUN.h5, until the run ends.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="With --follow: seconds between checks for new snapshots.")
@_quiet_option
def view(run: str, out: str | None, layers: tuple[str, ...], max_frames: int | None,
         max_channels: int, follow: bool, interval: float, quiet: bool) -> None:
    """Write index.html: every layer of RUN.h5 held at one step, a slider through training.

    The page opens from disk (no server, no network): drag the slider or use
    the arrow keys, Home and End; hover a cell for its recorded value; click a
    channel to see it large over training. The URL keeps the step
    (index.html#step=120). Writing again over the same folder reuses what has
    not changed; --follow does so whenever training has flushed new snapshots,
    and an open page picks them up by itself.
    """
    from .view import follow_view, write_view

    options = {"layers": _names(layers), "max_frames": max_frames,
               "max_channels": max_channels or None}
    if follow:
        try:
            follow_view(run, out, interval=interval, notes=_notes(quiet), **options)
        except KeyboardInterrupt:
            click.echo("Stopped following.")
        return
    written = write_view(run, out, notes=_notes(quiet), **options)
    if not quiet:
        total = sum(os.path.getsize(p) for p in written)
        click.echo(f"{written[0]}  ({format_bytes(total)} with its {len(written) - 1} data "
                   "and script files; open it in a browser)")


@main.command(short_help="Re-render a recording while training writes it.")
@click.argument("run", type=click.Path(dir_okay=False))
@_out_option("outputs/<run name>/", "Where the pictures go")
@click.option("--interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds between checks for new snapshots.")
@_max_frames_option
def watch(run: str, out: str | None, interval: float, max_frames: int | None) -> None:
    """Re-render RUN.h5 while training writes it, until the run ends.

    Renders (like `layerwatch render`) whenever new snapshots have been
    flushed, checking every --interval seconds, and stops when the run is
    closed, when its writer is gone, or on Ctrl-C.
    """
    from .rendering.watch import watch as follow

    try:
        follow(run, out, interval=interval, max_frames=max_frames,
               notes=lambda line: click.echo(line))
    except KeyboardInterrupt:
        click.echo("Stopped watching.")


@main.command(short_help="Make a killed run readable by plain HDF5 tools.")
@click.argument("run", type=click.Path(dir_okay=False))
def repair(run: str) -> None:
    """Rewrite RUN.h5 after its writer was killed, so any HDF5 tool opens it.

    A killed run stays readable by layerwatch and by h5py.File(path, "r",
    swmr=True); tools that open HDF5 files without SWMR refuse it until it is
    repaired. The snapshots committed before the kill are kept and the run is
    marked stopped.
    """
    from .store import open_run, repair_run

    if not repair_run(run):
        click.echo(f"{run} was closed properly; nothing to repair.")
        return
    with open_run(run) as repaired:
        n = repaired.num_snapshots
    click.echo(f"Repaired {run}: {n} snapshot(s) kept, marked stopped; "
               "plain h5py.File(path) opens it now.")


@main.command(short_help="Measure how much each layer still changes (CKA).")
@click.argument("run", type=click.Path(dir_okay=False))
@_out_option("outputs/<run name>/", "Where drift.png goes")
@_layers_option("Layers to measure: comma-separated or repeated (default all).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True, help="CKA to final a layer must stay at to count as settled.")
@click.option("--probes", type=click.Choice(["auto", "main", "analysis"]), default="auto",
              show_default=True,
              help="Which probes CKA uses: analysis probes when recorded (auto), or force one.")
def drift(run: str, out: str | None, layers: tuple[str, ...], threshold: float,
          probes: str) -> None:
    """Measure how much each layer of RUN.h5 still changes (linear CKA), write drift.png.

    Prints, per layer, the step from which its CKA with the final snapshot
    stays >= THRESHOLD ("settled") and its change between the last two
    snapshots, and how many probes the numbers rest on.
    """
    from .analysis.drift import write_drift

    result, png = write_drift(run, out, layers=_names(layers), probes=probes,
                              threshold=threshold)
    click.echo(result.probes_note())
    click.echo(result.table())
    _echo_written([png])


@main.command(short_help="How much saliency and Grad-CAM fall on the probes' strokes.")
@click.argument("run", type=click.Path(dir_okay=False))
@click.option("--points", type=click.IntRange(min=1), default=5, show_default=True,
              help="Steps to measure: the first, the last and evenly spaced ones between.")
@click.option("--threshold", type=click.FloatRange(0, 1, max_open=True), default=0.5,
              show_default=True,
              help="A stroke pixel is above this fraction of its probe's value range.")
def saliency(run: str, points: int, threshold: float) -> None:
    """Print, per probe and over training, the share of RUN.h5's saliency maps
    (and Grad-CAM mass) on each probe's strokes, beside the strokes' share of the area.
    """
    from .analysis.saliency import stroke_shares

    click.echo(stroke_shares(run, points=points, threshold=threshold).table())


@main.command(short_help="Put the same layers of several runs side by side.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_out_option("outputs/compare_<run>_<run>...")
@click.option("--labels", default=None, metavar="A,B,...",
              help="Comma-separated panel labels, one per run (default the file names).")
@_layers_option("Layers to compare: comma-separated or repeated (default all; then every "
                "run must record the same layers).")
@_max_frames_option
@_gif_options
@click.option("--range", "color_range", type=_ColorRange(), default=None,
              help="One colour range for every run: M for -M..M, or LOW,HIGH.")
@_quiet_option
def compare(runs: tuple[str, ...], out: str | None, labels: str | None,
            layers: tuple[str, ...], max_frames: int | None, fps: float, scale: int,
            max_channels: int, color_range: tuple[float, float] | None, quiet: bool) -> None:
    """Put the same layers of two or more runs side by side: RUNS... are .h5 recordings.

    Writes <layer>.gif (one panel per run, frames at the steps every run
    recorded), <layer>.png (the last shared step) and curves.png (all runs'
    curves on one plot).
    """
    from .rendering.compare import compare as compare_runs

    if len(runs) < 2:
        raise click.UsageError(f"compare needs at least two runs. Received: {len(runs)} run.")
    names = [n.strip() for n in labels.split(",")] if labels is not None else None
    if names is not None and (len(names) != len(runs) or not all(names)):
        raise click.BadParameter(f"give one non-empty label per run ({len(runs)} runs). "
                                 f"Received: {labels!r}.", param_hint="'--labels'")
    written = compare_runs(runs, out, labels=names, layers=_names(layers),
                           max_frames=max_frames, fps=fps, scale=scale,
                           max_channels=max_channels or None, value_range=color_range,
                           notes=_notes(quiet))
    if not quiet:
        _echo_written(written)


@main.command(short_help="Write a self-contained HTML (and Markdown) report.")
@click.argument("run", type=click.Path(dir_okay=False))
@_out_option("outputs/<run name>/")
@_max_frames_option
@click.option("--max-bytes", type=_ByteSize(), default=None,
              help="Keep each GIF under this size (e.g. 2MB), so the page stays light.")
@_gif_options
@_quiet_option
def report(run: str, out: str | None, max_frames: int | None, max_bytes: int | None, fps: float,
           scale: int, max_channels: int, quiet: bool) -> None:
    """Write report.html (one self-contained page) and report.md for RUN.h5.

    The page embeds every image and opens offline: run metadata, model
    summary, curves, drift and health plots, the settled table, and every
    layer's GIF with its final still. Both link to the step viewer
    (view/index.html, as `layerwatch view` writes it). report.md shows the same with relative
    image paths (for READMEs and wikis).
    """
    from .report import report as write_report

    written = write_report(run, out, max_frames=max_frames, max_bytes=max_bytes, fps=fps,
                           scale=scale, max_channels=max_channels or None, notes=_notes(quiet))
    if not quiet:
        _echo_written(written[:2])
        click.echo(f"  and {len(written) - 3} images beside them; the step viewer: "
                   f"{written[-1]}")
