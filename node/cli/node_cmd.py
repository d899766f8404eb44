"""`umm node start`, `umm contribute` and `umm pull`: run a node, offer an expert, fetch the merge."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import click

from merging.atomic import write_atomic
from node.cli.options import (
    PORT,
    ByteSize,
    check_writable_target,
    format_bytes,
    format_seconds,
    log_level_option,
    removed_on_failure,
)
from node.errors import NodeError
from node.settings import (
    FALLBACK_SECONDS,
    KEEP_ROUNDS,
    MADDRS_FILE_WAIT,
    POLL_SECONDS,
    PULL_TIMEOUT,
    checked_fallback_seconds,
)


@click.group("node")
def node() -> None:
    """Run a network node."""


def _read_maddrs_file(path: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise NodeError(f"expected a multiaddr file at {path} within {timeout:g} s, got none")
        time.sleep(0.5)
    maddrs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not maddrs:
        raise NodeError(f"expected multiaddrs in {path}, got an empty file")
    return maddrs


@node.command("start")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Store, state and keys of this node (a restart resumes from it).",
)
@click.option(
    "--network", "network_id", help="Network id to join (NAME.<16 hex>); not needed by the creator."
)
@click.option(
    "--genesis",
    "genesis_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A genesis record file (instead of fetching it from the initial peers).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=PORT, default=0, show_default=True, help="TCP port (0 = any free port).")
@click.option("--initial-peers", multiple=True, help="Multiaddr of a running node (repeatable).")
@click.option(
    "--initial-peers-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"A file of multiaddrs, one a line (waits up to {MADDRS_FILE_WAIT:g} s for it to appear).",
)
@click.option(
    "--write-maddrs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write this node's multiaddrs to a file once it is ready (for joiners).",
)
@click.option("--poll", default=POLL_SECONDS, show_default=True, help="Seconds between round steps.")
@click.option(
    "--fallback-seconds",
    default=FALLBACK_SECONDS,
    show_default=True,
    help="Seconds after a round's candidates settle before this node also merges the shards still "
    "lacking a quorum (local behaviour: nodes may differ).",
)
@click.option(
    "--keep-rounds",
    type=click.IntRange(min=1),
    default=KEEP_ROUNDS,
    show_default=True,
    help="Decided rounds kept in the store; older rounds' deltas and results are deleted.",
)
@click.option(
    "--store-quota",
    type=ByteSize(),
    default=None,
    help="Most bytes this node's store may hold (e.g. 20GiB): a chunk past it is refused with an "
    "error in the log, whatever peers announce [default: no quota].",
)
@click.option(
    "--search",
    is_flag=True,
    help="Search each round's merge recipe and propose it (networks whose genesis enables search).",
)
@click.option(
    "--fuse",
    is_flag=True,
    help="Distill each round's distribution summaries into a copy of the base and contribute it "
    "(networks with a probe set; the copy is this node's contribution for the round).",
)
@click.option(
    "--fuse-steps", type=click.IntRange(min=1), default=600, show_default=True, help="Distillation steps."
)
@click.option(
    "--fuse-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=2e-3,
    show_default=True,
    help="AdamW learning rate.",
)
@click.option(
    "--fuse-batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Probe responses per step.",
)
@click.option(
    "--fuse-lambda",
    type=click.FloatRange(0, 1),
    default=0.9,
    show_default=True,
    help="Weight of the CLM term (1: the summaries' text only).",
)
@click.option(
    "--fuse-threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads."
)
@click.option(
    "--fuse-replay",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Prompts of other domains (probe-file format) on which the copy keeps the base's own "
    "answers, so that it merges without erasing the other experts.",
)
@log_level_option()
def start(
    data_dir,
    network_id,
    genesis_file,
    host,
    port,
    initial_peers,
    initial_peers_file,
    write_maddrs,
    poll,
    fallback_seconds,
    keep_rounds,
    store_quota,
    search,
    fuse,
    fuse_steps,
    fuse_lr,
    fuse_batch_size,
    fuse_lambda,
    fuse_threads,
    fuse_replay,
    log_level,
) -> None:
    """Start a node: DHT, chunk server, store and rounds, until SIGINT/SIGTERM.

    Example: umm node start --data-dir node2 --network demo.0123456789abcdef \
        --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/12D3...
    """
    checked_fallback_seconds(fallback_seconds)  # bad values fail before the node makes its folder
    check_writable_target(data_dir / "state", "--data-dir")
    if write_maddrs is not None:
        check_writable_target(write_maddrs, "--write-maddrs")
    if network_id is not None:
        from protocol.genesis import network_genesis_id

        network_genesis_id(network_id)
    peers = list(initial_peers)
    if initial_peers_file is not None:
        peers += _read_maddrs_file(initial_peers_file, timeout=MADDRS_FILE_WAIT)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fuser = None
    if fuse:
        from merging.fusion.summary import read_probe_file
        from node.fuser import FuserSettings

        fuser = FuserSettings(
            steps=fuse_steps,
            lr=fuse_lr,
            batch_size=fuse_batch_size,
            lam=fuse_lambda,
            threads=fuse_threads,
            replay=read_probe_file(fuse_replay) if fuse_replay is not None else None,
        )

    def ready(service) -> None:
        keep()  # from now on the data folder holds the node's state, whatever happens
        if write_maddrs is not None:
            write_atomic(write_maddrs, "".join(f"{m}\n" for m in service.maddrs).encode())
        click.echo(f"network: {service.network_id}", nl=True)
        click.echo(f"peer id: {service.identity.peer_id}")
        for maddr in service.maddrs:
            click.echo(f"multiaddr: {maddr}")
        click.echo("ready", nl=True)

    with removed_on_failure(data_dir) as keep:  # a node that never became ready leaves no folder
        _run_node(
            data_dir,
            network_id=network_id,
            genesis_record=genesis_file.read_bytes() if genesis_file else None,
            host=host,
            port=port,
            initial_peers=peers,
            poll=poll,
            on_ready=ready,
            fallback_seconds=fallback_seconds,
            keep_rounds=keep_rounds,
            store_quota=store_quota,
            searcher=search,
            fuser=fuser,
        )
    click.echo("stopped")


def _run_node(data_dir: Path, **options) -> None:
    """Run a `NodeService` with `options` until SIGINT or SIGTERM."""
    from node.service import NodeService

    service = NodeService(data_dir, **options)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(main())


@click.command("contribute")
@click.argument("expert_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The data folder of the node that will announce the contribution.",
)
@click.option("--network", "network_id", help="Check that the node belongs to this network id.")
@click.option(
    "--base",
    "base_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Check that this base model folder is the network's base (same weights fingerprint).",
)
@click.option(
    "--codec",
    default="bf16",
    show_default=True,
    help="Delta codec: raw (lossless: float32/float64 deltas), bf16, fp16, topk:DENSITY, "
    "int8[:BLOCK], int4[:BLOCK]; add +zstd to compress.",
)
@click.option("--name", help="Expert name on its card (default: the folder name).")
@click.option("--domain", "domains", multiple=True, help="Domain tag (repeatable).")
@click.option(
    "--license", "license_", default="unknown", show_default=True, help="License on the expert card."
)
@click.option(
    "--round", "round_number", type=int, help="Round to contribute to (default: the node's current round)."
)
@click.option(
    "--k", "k", default=10, show_default=True, help="Top-k of a distribution summary (other architectures)."
)
@click.option(
    "--max-new-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest greedy response of a distribution summary (other architectures).",
)
def contribute_command(
    expert_dir,
    data_dir,
    network_id,
    base_dir,
    codec,
    name,
    domains,
    license_,
    round_number,
    k,
    max_new_tokens,
) -> None:
    """Sign and store an expert's deltas; the node in --data-dir announces them.

    Example: umm contribute zoo/experts/math --data-dir node1 --codec int8+zstd --domain math
    """
    from node.contribute import contribute
    from node.datafolder import check_node_folder
    from node.state import NodeState
    from protocol.codecs import parse_codec
    from protocol.genesis import open_genesis

    check_node_folder(data_dir)  # before anything is created there
    parse_codec(codec)
    with NodeState(data_dir) as state:
        record = state.get("genesis")
    genesis = open_genesis(record) if record is not None else None
    if network_id is not None and (genesis is None or genesis.network_id != network_id):
        raise NodeError(f"expected the node in {data_dir} to belong to {network_id}, got another network")
    if base_dir is not None and genesis is not None:
        from protocol.fingerprint import weights_fingerprint

        if weights_fingerprint(base_dir) != genesis.base_fingerprint:
            raise NodeError(f"expected {base_dir} to be the network's base model, got other weights")
    done = contribute(
        data_dir,
        expert_dir,
        codec=codec,
        name=name,
        domains=tuple(domains),
        license=license_,
        round_number=round_number,
        k=k,
        max_new_tokens=max_new_tokens,
        progress=True,
    )
    what = "manifest" if done.kind == "delta" else "distribution summary"
    size = format_bytes(done.total_bytes)
    click.echo(f"round {done.round}: {what} {done.manifest_id} ({size} in {done.chunks} chunks)")


@click.command("pull")
@click.option("--network", "network_id", required=True, help="Network id (NAME.<16 hex>).")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output HF folder."
)
@click.option("--initial-peers", multiple=True, help="Multiaddr of any node (repeatable).")
@click.option(
    "--initial-peers-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file of multiaddrs, one a line (as `umm node start --write-maddrs` writes it).",
)
@click.option(
    "--timeout", default=PULL_TIMEOUT, show_default=True, help="Seconds to wait for an attested result."
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Recompute a random sample of the result's tensors from the round's admitted deltas first, "
    "and refuse a result that differs (--no-verify trusts the quorum's attestations alone).",
)
def pull_command(network_id, out, initial_peers, initial_peers_file, timeout, verify) -> None:
    """Download the latest attested merged model into a loadable folder (resumable).

    Example: umm pull --network demo.0123456789abcdef --out merged \
        --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/12D3...
    """
    from protocol.genesis import network_genesis_id

    network_genesis_id(network_id)  # a malformed id fails before any DHT starts
    check_writable_target(out, "--out")
    initial_peers = list(initial_peers)
    if initial_peers_file is not None:
        initial_peers += _read_maddrs_file(initial_peers_file, timeout=timeout)
    if not initial_peers:
        raise NodeError("expected --initial-peers or --initial-peers-file, got neither")

    from node.cli.progress import steps_progress
    from node.pull import pull

    with steps_progress("pull") as progress:
        outcome = asyncio.run(
            pull(
                network_id,
                out,
                initial_peers=list(initial_peers),
                timeout=timeout,
                progress=progress,
                verify=verify,
            )
        )
    click.echo(f"round {outcome.round}: {outcome.merged_fingerprint} attested by {outcome.attested_by} keys")
    click.echo(f"recipe: {outcome.recipe}")
    if outcome.verified:
        click.echo(
            f"verified: {sum(outcome.verified)} tensors recomputed from the admitted deltas "
            f"({format_bytes(outcome.verify_bytes)} of inputs)"
        )
    else:
        click.echo("not verified (--no-verify): the quorum's attestations alone")
    seconds = sum(outcome.seconds.values())
    click.echo(
        f"wrote {outcome.out} ({format_bytes(outcome.bytes_fetched)} fetched in {format_seconds(seconds)})"
    )


def register(group: click.Group) -> None:
    """Add `node`, `contribute` and `pull` to the `umm` command group."""
    group.add_command(node)
    group.add_command(contribute_command)
    group.add_command(pull_command)
