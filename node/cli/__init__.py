"""The `umm` command line: a thin layer over the library APIs.

Each command group lives in its own module with a `register(group)` function, listed in
`COMMAND_MODULES`; a module imports only click and light helpers at the top (heavy libraries inside
its command functions), so `umm --help` answers at once. Library errors (`UmmError`) become one
`Error: ...` line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from merging import __version__
from merging.errors import UmmError
from node.cli.options import quiet_third_parties, verbose_option

COMMAND_MODULES: tuple[str, ...] = (
    "node.cli.keys_cmd",
    "node.cli.merge_cmd",
    "node.cli.evolve_cmd",
    "node.cli.network_cmd",
    "node.cli.node_cmd",
    "node.cli.testbed_cmd",
    "node.cli.demo_cmd",
    "node.cli.fuse_cmd",
)


class UmmGroup(click.Group):
    """A click group that prints library errors as one line and exits 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UmmError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=UmmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="umm")
@verbose_option()
def cli(verbose: bool) -> None:
    """umm: merge domain-expert LLMs into one model, locally or over a peer-to-peer network."""
    quiet_third_parties(verbose)


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(cli)


def main() -> None:
    """Console-script entry point."""
    cli()
