"""`umm keygen`: create an Ed25519 identity key file (mode 0600) and print its peer id."""

from __future__ import annotations

from pathlib import Path

import click

from protocol.identity import Identity

DEFAULT_KEY_PATH = Path("~/.umm/identity.key")


@click.command("keygen")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=str(DEFAULT_KEY_PATH),
    show_default=True,
    help="Where to write the private key (refuses to overwrite).",
)
def keygen(out: Path) -> None:
    """Create a new Ed25519 identity key and print its peer id.

    Example: umm keygen --out node1.key
    """
    path = Identity.generate().save(out.expanduser())
    identity = Identity.load(path)
    click.echo(f"peer id: {identity.peer_id}")
    click.echo(f"key file: {path} (mode 0600; keep it private)")


def register(group: click.Group) -> None:
    """Add `keygen` to the `umm` command group."""
    group.add_command(keygen)
