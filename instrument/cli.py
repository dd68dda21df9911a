"""The ``poolscope`` command line: a thin shell over the library."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="poolscope")
def cli() -> None:
    """poolscope: who held your SQLAlchemy pool's connections, for how long, and which never
    came back."""


@cli.command()
def demo() -> None:
    """Run the sample app for about half a minute on SQLite, then open the dashboard."""
    click.echo("poolscope demo: coming soon")


def main() -> None:
    """Entry point of the ``poolscope`` console script."""
    cli()
