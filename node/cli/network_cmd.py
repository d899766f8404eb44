"""`umm network create`: write a signed genesis; `umm status`: the network as a rich table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from merging.atomic import write_atomic
from merging.config import DTYPES
from merging.methods import METHODS
from merging.search.space import OPTIMIZERS
from node.cli.options import check_writable_target, format_bytes, removed_on_failure
from node.errors import NodeError
from node.settings import MADDRS_FILE_WAIT
from protocol.genesis import (
    DEFAULT_DTYPE,
    DEFAULT_METHOD,
    DEFAULT_MIN_CONTRIBUTIONS,
    DEFAULT_OUTLIER_FACTOR,
    DEFAULT_PARAMETERS,
    DEFAULT_QUORUM,
    DEFAULT_SETTLE_SECONDS,
)


def _members(value: str) -> tuple[bytes, ...] | None:
    from protocol.identity import public_key_from_peer_id

    if value == "open":
        return None
    return tuple(public_key_from_peer_id(p.strip()) for p in value.split(",") if p.strip())


@click.group("network")
def network() -> None:
    """Create and inspect networks."""


@network.command("create")
@click.argument("name")
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The base model folder (safetensors + config + tokenizer).",
)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The creating node's data folder (its identity signs the genesis).",
)
@click.option(
    "--method",
    type=click.Choice(sorted(METHODS)),
    default=DEFAULT_METHOD,
    show_default=True,
    help="Default merge method.",
)
@click.option(
    "--params",
    default=json.dumps(DEFAULT_PARAMETERS),
    show_default=True,
    help="Method parameters as JSON or YAML (layer-wise lists allowed).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="Merged model dtype [default: the base's, e.g. bfloat16 for a bf16 base].",
)
@click.option(
    "--quorum",
    type=click.IntRange(min=0),
    default=DEFAULT_QUORUM,
    show_default=True,
    help="Attestations needed; 0 = majority of contributors (>= 2).",
)
@click.option(
    "--members",
    default="open",
    show_default=True,
    help="Comma-separated peer ids allowed to sign, or 'open'.",
)
@click.option(
    "--min-contributions",
    type=click.IntRange(min=1),
    default=DEFAULT_MIN_CONTRIBUTIONS,
    show_default=True,
    help="Contributions a round needs.",
)
@click.option(
    "--settle-seconds",
    default=DEFAULT_SETTLE_SECONDS,
    show_default=True,
    help="A round merges once its contributions are unchanged this long.",
)
@click.option(
    "--outlier-factor",
    default=DEFAULT_OUTLIER_FACTOR,
    show_default=True,
    help="Reject deltas with norm > factor x median.",
)
@click.option(
    "--probe-set",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Probe texts (a JSON list, or one text a line) for distribution summaries of other architectures.",
)
@click.option(
    "--search-tasks",
    help="Enable searched merges: testbed tasks (comma-separated) whose dev split is the fitness.",
)
@click.option("--search-limit", default=16, show_default=True, help="Dev prompts per search task.")
@click.option(
    "--search-budget", default=24, show_default=True, help="Candidates each searcher scores a round."
)
@click.option("--search-granularity", default="layer", show_default=True, help="Layer groups searched.")
@click.option(
    "--search-keys", default="weight", show_default=True, help="Parameters searched (comma-separated)."
)
@click.option("--search-metric", default="loglik", show_default=True, help="Teacher-forced fitness metric.")
@click.option("--search-aggregate", default="mean", show_default=True, help="How task gains combine.")
@click.option(
    "--search-optimizer",
    default="cma",
    show_default=True,
    type=click.Choice(OPTIMIZERS),
    help="How searchers search: CMA-ES, or Adam on the fitness's gradient (task_arithmetic, loglik/seqprob).",
)
@click.option(
    "--search-wait",
    default=120.0,
    show_default=True,
    help="Seconds after a round settles that nodes wait for proposals before adopting the best verified one.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the genesis record here.",
)
def create(
    name,
    base_dir,
    data_dir,
    method,
    params,
    dtype,
    quorum,
    members,
    min_contributions,
    settle_seconds,
    outlier_factor,
    probe_set,
    search_tasks,
    search_limit,
    search_budget,
    search_granularity,
    search_keys,
    search_metric,
    search_aggregate,
    search_optimizer,
    search_wait,
    out,
):
    """Write a signed genesis for a new network and print its network id.

    Example: umm network create demo --base zoo/base --data-dir node1 --method ties --quorum 2
    """
    import yaml

    from node.datafolder import load_or_create_identity
    from node.genesis import create_genesis
    from node.state import NodeState
    from node.store import ContentStore
    from protocol.genesis import check_proposed_settings

    try:
        parameters = yaml.safe_load(params)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise NodeError(f"expected --params as JSON or YAML, got unparsable text: {problem}{where}") from None
    if not isinstance(parameters, dict):
        raise NodeError(f"expected --params to be a map, got {type(parameters).__name__}")
    texts = None
    if probe_set is not None:
        raw = probe_set.read_text(encoding="utf-8")
        texts = (
            json.loads(raw) if raw.lstrip().startswith("[") else [t for t in raw.splitlines() if t.strip()]
        )
    allowed = _members(members)
    settings = dict(
        method=method,
        parameters=parameters,
        dtype=dtype,
        quorum=quorum,
        outlier_factor=outlier_factor,
        min_contributions=min_contributions,
        settle_seconds=settle_seconds,
    )
    check_proposed_settings(name, **{**settings, "dtype": dtype or DEFAULT_DTYPE})  # before any write
    search = None
    if search_tasks:
        from protocol.search_rules import make_search_settings

        search = make_search_settings(
            [t.strip() for t in search_tasks.split(",") if t.strip()],
            limit=search_limit,
            budget=search_budget,
            granularity=search_granularity,
            keys=[k.strip() for k in search_keys.split(",") if k.strip()],
            metric=search_metric,
            aggregate=search_aggregate,
            wait_seconds=search_wait,
            optimizer=search_optimizer,
        )
        search.check_method(method)
    check_writable_target(data_dir / "state", "--data-dir")
    if out is not None:
        check_writable_target(out, "--out")
    with removed_on_failure(data_dir):  # a failed create leaves no data folder behind
        identity = load_or_create_identity(data_dir)
        with ContentStore(data_dir / "store") as store, NodeState(data_dir) as state:
            genesis, record = create_genesis(
                name, base_dir, identity, store, members=allowed, probe_set=texts, search=search, **settings
            )
            state.set("genesis", record)
        if out is not None:
            write_atomic(out, record)
    click.echo(f"network: {genesis.network_id}")
    click.echo(f"genesis: {genesis.id}")
    click.echo(f"creator: {identity.peer_id}")


async def _collect(network_id: str, initial_peers: list[str]) -> dict:
    """What `umm status` shows, read by a light client DHT node (no node process)."""
    from node.dht import ClientBoard
    from node.fault_status import read_faults
    from node.fusion_status import fused_contributions, read_fusion_verdicts
    from node.lookups import latest_rounds_from_records, read_genesis, read_round_records
    from node.records import contrib_key, parse_record, peers_key, summary_key
    from node.search_status import read_proposals

    client = await ClientBoard.start(initial_peers)
    try:
        found, peer_values = await asyncio.gather(
            read_genesis(client, network_id), client.aread(peers_key(network_id))
        )
        peers = [parse_record("peers", v) for v in peer_values.values()]
        claims = latest_rounds_from_records(peer_values.values())
        current = (claims[0] + 1) if claims else 0
        rounds = sorted({current, *claims[:1]})

        async def read_round(r: int) -> tuple:
            # every DHT lookup of a round at once: the status costs one lookup's latency per step
            return await asyncio.gather(
                client.aread(summary_key(network_id, r)),
                client.aread(contrib_key(network_id, r)),
                read_round_records(client, network_id, r),
                read_proposals(client, network_id, r),
                read_faults(client, network_id, r),
            )

        per_round = dict(zip(rounds, await asyncio.gather(*(read_round(r) for r in rounds)), strict=True))
        summaries = {r: [parse_record("summary", v) for v in per_round[r][0].values()] for r in rounds}
        contribs = {r: [parse_record("contrib", v) for v in per_round[r][1].values()] for r in rounds}
        results = {r: per_round[r][2] for r in rounds}
        proposals = {r: per_round[r][3] for r in rounds}
        faults = {r: per_round[r][4] for r in rounds}
        fusion = dict(
            zip(
                rounds,
                await asyncio.gather(
                    *(
                        read_fusion_verdicts(
                            client, network_id, r, fused_contributions(contribs[r], network_id)
                        )
                        for r in rounds
                    )
                ),
                strict=True,
            )
        )
    finally:
        await client.shutdown()
    return {
        "genesis": found,
        "peers": [p for p in peers if p],
        "contribs": contribs,
        "summaries": summaries,
        "results": results,
        "proposals": proposals,
        "faults": faults,
        "fusion": fusion,
    }


def _cards(records: list, network_id: str, field: str) -> list[dict]:
    from protocol.envelope import open_envelope
    from protocol.errors import ProtocolError
    from protocol.messages import ExpertCard

    rows = []
    for rec in records:
        if rec is None:
            continue
        try:
            card = open_envelope(rec["card"], ExpertCard, network_id=network_id).message
        except ProtocolError:
            continue
        rows.append(
            {
                "expert": card.name,
                "peer": card.peer_id,
                "domains": list(card.domains),
                "fused_from": list(card.fused_from),
                field: rec[field],
            }
        )
    return rows


@click.command("status")
@click.option("--network", "network_id", help="Network id (NAME.<16 hex>).")
@click.option("--initial-peers", multiple=True, help="A multiaddr of any node (repeatable).")
@click.option(
    "--initial-peers-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file of multiaddrs, one a line (as `umm node start --write-maddrs` writes it).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A node's data folder: also report its store (size, chunks, decided rounds kept); alone, only that.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(
    network_id: str | None,
    initial_peers: tuple[str, ...],
    initial_peers_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Show peers, their expert cards, contributions per round and the latest results.

    Example: umm status --network demo.0123456789abcdef --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/12D3...
    """
    if network_id is None and data_dir is None:
        raise NodeError("expected --network (with --initial-peers) or --data-dir, got neither")
    store = None
    if data_dir is not None:
        from node.datafolder import check_node_folder
        from node.retention import store_usage

        store = store_usage(check_node_folder(data_dir))
        if network_id is None:
            _print_store(store, as_json)
            return
    _network_status(network_id, initial_peers, initial_peers_file, store, as_json)


def _print_store(store: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"store": store}, indent=2, sort_keys=True))
        return
    click.echo(_store_line(store))


def _store_line(store: dict) -> str:
    kept = ", ".join(str(r) for r in store["decided_rounds"]) or "none"
    return (
        f"store: {format_bytes(store['bytes'])} in {store['chunks']} chunks "
        f"(decided rounds kept: {kept}; --keep-rounds keeps the latest {store['keep_default']} by default)"
    )


def _network_status(
    network_id: str,
    initial_peers: tuple[str, ...],
    initial_peers_file: Path | None,
    store: dict | None,
    as_json: bool,
) -> None:
    """The network part of `umm status`."""
    from rich.console import Console
    from rich.table import Table

    from node.cli.node_cmd import _read_maddrs_file
    from node.fault_status import faults_table
    from node.fusion_status import fusion_table
    from node.search_status import proposals_table
    from protocol.genesis import network_genesis_id
    from protocol.identity import peer_id_from_public_key

    network_genesis_id(network_id)  # a malformed id fails before any DHT starts
    peers_given = list(initial_peers)
    if initial_peers_file is not None:
        peers_given += _read_maddrs_file(initial_peers_file, timeout=MADDRS_FILE_WAIT)
    if not peers_given:
        raise NodeError("expected --initial-peers or --initial-peers-file, got neither")
    data = asyncio.run(_collect(network_id, peers_given))
    peers = [
        {"p2p": p["p2p"], "peer": peer_id_from_public_key(p["signer"]), "latest": p["latest"]}
        for p in data["peers"]
    ]
    rounds = {}
    for r, records in data["contribs"].items():
        rows = _cards(records, network_id, "manifest")
        summaries = _cards(data["summaries"][r], network_id, "summary")
        atts = []
        for shard in data["results"][r]:
            for result_id, held in sorted(shard.attestations.by_result.items()):
                for signed in held:
                    att = signed.message
                    atts.append(
                        {
                            "peer": att.peer_id,
                            "result": result_id,
                            "fingerprint": att.merged_fingerprint,
                            "shard": f"{att.shard}/{att.shards}",
                            "kind": att.kind,
                            "checked": att.checked_bytes,
                        }
                    )
        rounds[r] = {
            "contributions": rows,
            "summaries": summaries,
            "attestations": atts,
            "proposals": data["proposals"][r],
            "faults": data["faults"][r],
            "fusion": data["fusion"][r],
        }
    if as_json:
        shown = {"network": network_id, "peers": peers, "rounds": rounds}
        if store is not None:
            shown["store"] = store
        click.echo(json.dumps(shown, indent=2, sort_keys=True))
        return
    console = Console()
    console.print(f"network {network_id} (genesis {'found' if data['genesis'] else 'not found'})")
    if store is not None:
        console.print(_store_line(store))
    table = Table("libp2p peer", "umm peer id", "latest round")
    for p in peers:
        table.add_row(p["p2p"], p["peer"], str(p["latest"]))
    console.print(table)
    for r, info in rounds.items():
        table = Table("expert", "peer", "domains", "manifest", title=f"round {r}: contributions")
        for row in info["contributions"]:
            table.add_row(row["expert"], row["peer"][:20], ",".join(row["domains"]), row["manifest"][:16])
        console.print(table)
        if info["summaries"]:
            table = Table("expert", "peer", "domains", "summary", title=f"round {r}: distribution summaries")
            for row in info["summaries"]:
                table.add_row(row["expert"], row["peer"][:20], ",".join(row["domains"]), row["summary"][:16])
            console.print(table)
        table = Table(
            "attested by",
            "shard",
            "kind",
            "checked",
            "result",
            "fingerprint",
            title=f"round {r}: attestations",
        )
        for row in info["attestations"]:
            table.add_row(
                row["peer"][:20],
                row["shard"],
                row["kind"],
                format_bytes(row["checked"]),
                row["result"][:16],
                row["fingerprint"][:16],
            )
        console.print(table)
        if info["proposals"]:
            console.print(proposals_table(r, info["proposals"]))
        if info["faults"]:
            console.print(faults_table(r, info["faults"]))
        if info["fusion"]:
            console.print(fusion_table(r, info["fusion"]))


def register(group: click.Group) -> None:
    """Add `network` and `status` to the `umm` command group."""
    group.add_command(network)
    group.add_command(status)
