"""`umm pull`: find the network's latest attested result and write it as a loadable HF folder.

A pull starts a client-mode DHT node, reads the genesis (verified against the network id), finds
the highest round whose result carries a quorum of valid attestations on every shard
(`find_attested_result`: signatures, hashes and the shard plan checked), fetches every chunk from
any peer (verified by hash) into a resumable cache store, then writes ``model.safetensors`` and the
base's side files (config, tokenizer) to a temp folder, fsyncs and renames it to ``--out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from node.assemble import write_safetensors
from node.dht import RecordBoard, start_dht
from node.errors import NodeError
from node.service import claimed_latest_rounds, find_attested_result, peer_ids, read_genesis_from
from node.store import ContentStore
from node.transport import FetchReport, fetch_chunks


class NoResultError(NodeError):
    """No result with a quorum of attestations was found."""


@dataclasses.dataclass(frozen=True)
class PullOutcome:
    """What a pull wrote."""

    out: Path
    round: int
    merged_fingerprint: str
    attested_by: int
    bytes_fetched: int


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(temp: Path, out: Path) -> None:
    """Move a complete folder into place; an existing `out` is replaced only after `temp` is whole."""
    _fsync_tree(temp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(temp, out)
    shutil.rmtree(old, ignore_errors=True)


async def pull(
    network_id: str,
    out: str | Path,
    *,
    initial_peers: Sequence[str],
    cache_dir: str | Path | None = None,
    timeout: float = 60.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> PullOutcome:
    """Pull the latest attested result of `network_id` into `out` (see the module docstring)."""
    out = Path(out).absolute()
    cache = Path(cache_dir) if cache_dir is not None else out.with_name(f".{out.name}.umm-pull")
    dht, validator = await asyncio.to_thread(start_dht, initial_peers=list(initial_peers), client_mode=True)
    board = RecordBoard(dht, validator)
    p2p = await dht.replicate_p2p()
    report = FetchReport()
    try:
        with ContentStore(cache / "store", durable=False) as store:  # a resumable cache

            async def fetch(digests, holders=()) -> None:
                peers = await asyncio.to_thread(peer_ids, board, network_id)
                done = await fetch_chunks(p2p, digests, peers, store, timeout=20.0)
                report.fetched += done.fetched
                for peer, size in done.bytes_by_peer.items():
                    report.bytes_by_peer[peer] = report.bytes_by_peer.get(peer, 0) + size

            found_genesis = None
            deadline = asyncio.get_running_loop().time() + timeout
            attested = None
            while asyncio.get_running_loop().time() < deadline:
                found_genesis = found_genesis or await asyncio.to_thread(read_genesis_from, board, network_id)
                if found_genesis is not None:
                    genesis = found_genesis[0]
                    for r in await asyncio.to_thread(claimed_latest_rounds, board, network_id):
                        attested = await find_attested_result(board, genesis, r, fetch, store)
                        if attested is not None:
                            break
                if attested is not None:
                    break
                await asyncio.sleep(1.0)
            if attested is None:
                raise NoResultError(
                    f"expected a result of {network_id} attested by a quorum within {timeout:g} s, got none"
                )
            entries = attested.tensors
            digests = [d for t in entries for d in t.chunks] + list(genesis.base_files.values())
            total = len(digests)
            done_before = total - len(store.missing(digests))
            if progress is not None:
                progress("chunks", done_before, total)
            for start in range(0, total, 64):  # batches, so progress can be shown and a kill loses little
                await fetch(digests[start : start + 64])
                if progress is not None:
                    progress("chunks", min(total, start + 64), total)
            temp = out.with_name(f".{out.name}.partial-{os.getpid()}")
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
            model = temp / "model.safetensors"  # written chunk by chunk, with decode_entry's checks
            await asyncio.to_thread(write_safetensors, entries, store.get, attested.chunk_size, model)
            for name, digest in genesis.base_files.items():
                (temp / name).write_bytes(store.get(digest))
            replace_folder(temp, out)
        shutil.rmtree(cache, ignore_errors=True)
        return PullOutcome(out, attested.round, attested.fingerprint, attested.signers, report.bytes_received)
    finally:
        with contextlib.suppress(Exception):
            await p2p.shutdown()
        await asyncio.to_thread(dht.shutdown)
