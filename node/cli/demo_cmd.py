"""`umm demo`: run a local 3-node network on test-bed experts and print the accuracy table."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from node.cli.options import LazyChoice


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the nodes' folders and the pulled model go (default: a temp folder).",
)
@click.option(
    "--size",
    type=LazyChoice("merging.testbed.sizes:ZOO_SIZES", metavar="SIZE"),
    default="small",
    show_default=True,
    help="Test-bed zoo size: small (trained experts; ~15 min to build once), micro (seconds, untrained) "
    "or real (SmolLM2-135M experts; needs the real extra, about 100 minutes to build once).",
)
@click.option("--nodes", default=3, show_default=True, help="Node processes, one expert each.")
@click.option("--codec", default="bf16", show_default=True, help="Delta codec the nodes contribute with.")
@click.option("--limit", default=50, show_default=True, help="Test examples per domain.")
def demo(workdir: Path | None, size: str, nodes: int, codec: str, limit: int) -> None:
    """Start a local network, contribute zoo experts, aggregate, attest, pull, and score the merge.

    Example: umm demo --workdir demo-run
    """
    from rich.console import Console
    from rich.table import Table

    from merging.testbed.training_progress import rich_reporter
    from node.demo import run_demo

    console = Console()
    folder = workdir or Path(tempfile.mkdtemp(prefix="umm-demo-"))
    with rich_reporter(console) as reporter:
        report = run_demo(
            folder, size=size, nodes=nodes, codec=codec, limit=limit, say=console.print, reporter=reporter
        )
    table = Table(
        "model", *report.domains, "mean", title=f"exact-match accuracy ({limit} test examples per domain)"
    )
    for label, scores in report.accuracy.items():
        table.add_row(label, *(f"{scores[d]:.1%}" for d in report.domains), f"{scores['mean']:.1%}")
    console.print(table)
    console.print(
        f"network {report.network_id}: merged {report.merged_fingerprint[:16]}, attested by "
        f"{report.attested_by} keys; model in {report.merged_dir}"
    )
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))


def register(group: click.Group) -> None:
    """Add `demo` to the `umm` command group."""
    group.add_command(demo)
