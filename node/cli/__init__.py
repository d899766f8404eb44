"""The `umm` command line: a thin layer over the library APIs.

Each command group lives in its own module with a `register(group)` function, listed in
`COMMAND_MODULES`; a module imports only click and light helpers at the top (heavy libraries inside
its command functions), so `umm --help` answers at once. Every failure the user can fix — library
errors (`UmmError`), click's usage errors, and files or folders the system refuses (`OSError`) —
becomes one `Error: ...` line on stderr and exit code 2, without a traceback or usage block.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

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


def fail(message: str) -> NoReturn:
    """Print `message` as one `Error: ...` line on stderr and exit with code 2."""
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(2)


class UmmGroup(click.Group):
    """A click group that prints every user-facing failure as one line and exits 2 (module docstring)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:  # usage errors: no usage block, one line
            fail(exc.format_message())
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UmmError as exc:
            fail(str(exc))
        except OSError as exc:  # a path the system refuses (unwritable, not a folder, full disk)
            if exc.filename is None:
                raise
            fail(f"expected a usable path at {exc.filename}, got: {exc.strerror or exc}")


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
