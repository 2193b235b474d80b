"""The ``layerwatch`` command line: a thin wrapper over the library."""

from __future__ import annotations

import click

from . import __version__
from .store import RecordingError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="layerwatch")
def main() -> None:
    """Watch a neural network learn: inspect and render layerwatch recordings."""


@main.command()
@click.argument("run", type=click.Path(dir_okay=False))
def info(run: str) -> None:
    """Summarize the recording RUN.h5: layers, steps, metrics, size, state."""
    from .summary import describe_run

    try:
        click.echo(describe_run(run))
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
