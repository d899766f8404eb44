"""Attack 2 of issue 14 on real node processes: a flipped byte on a node's own disk stays local.

Three `umm node start` processes; node h1's expert is signed before the nodes start, and its delta
chunks are copied into h2's and h3's stores (so no peer asks h2 for them), one of them with a byte
flipped in h2's blob file. When h2 reads that chunk (its scrub or its merge, whichever first),
the read fails: a store fault, not a malformed contribution — h2 fetches the chunk again from a
peer and merges with h1's delta like the others, so all three decide the same round (before, h2
excluded h1 from that shard and refused the quorum for good). Then a byte of a base chunk that
nobody reads again is flipped in h2's running store: the scrub finds it and fetches it again.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from node_models import make_base, make_expert

from node.errors import NodeError
from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.store import ContentStore
from protocol.envelope import open_envelope
from protocol.messages import DeltaManifest, MergeResult

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("h1", "h2", "h3")


def _flip_byte(store_dir: Path, digest: str) -> Path:
    """Flip the first byte of the blob of `digest` on disk (as a failing disk would)."""
    blob = store_dir / "blobs" / digest[:2] / digest
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    return blob


def _wait_intact(blob: Path, digest: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if blob.exists() and hashlib.sha256(blob.read_bytes()).hexdigest() == digest:
            return
        time.sleep(0.2)
    raise NodeError(f"expected blob {digest} repaired within {timeout:g} s")


def test_a_corrupt_blob_is_a_store_fault_and_is_repaired(tmp_path):
    make_base(tmp_path / "base")
    for index, name in enumerate(NODES):
        make_expert(tmp_path / "base", tmp_path / f"expert-{name}", seed=400 + index)
    with LocalNetwork(tmp_path) as net:
        genesis = net.create(
            NODES[0], tmp_path / "base", network_name="faults", min_contributions=3, settle_seconds=1.0
        )
        prepared = net.contribute(NODES[0], tmp_path / "expert-h1", codec="bf16")
        with ContentStore(tmp_path / NODES[0] / "store") as own:
            raw = own.get(prepared.manifest_id)
            manifest = open_envelope(raw, DeltaManifest, network_id=genesis.network_id)
            chunks = {d: own.get(d) for t in manifest.message.tensors for d in t.chunks}
            base_entries = read_base_manifest(own.get(genesis.base_manifest))
        for name in NODES[1:]:
            with ContentStore(tmp_path / name / "store") as store:
                for digest, data in chunks.items():
                    store.put(data, digest)
        flipped = sorted(chunks)[0]
        _flip_byte(tmp_path / "h2" / "store", flipped)

        net.start_all(NODES)
        for name in NODES[1:]:
            net.contribute(name, tmp_path / f"expert-{name}", codec="bf16")
        latest = net.wait_converged(NODES, timeout=240.0)
        assert len({v["fingerprint"] for v in latest.values()}) == 1
        log = net.tail("h2", 100_000)  # the scrub or the merge's own read found it first
        assert "store fault" in log or "store repair: fetched" in log
        with ContentStore(tmp_path / "h2" / "store") as store:
            for result_id in latest["h2"]["results"]:  # every shard admits h1's delta
                result = open_envelope(store.get(result_id), MergeResult, network_id=genesis.network_id)
                assert prepared.manifest_id in result.message.recipe.contributions
            assert store.get(flipped) == chunks[flipped]

        base_chunk = base_entries[0].chunks[0]  # read by nobody once the node has merged
        blob = _flip_byte(tmp_path / "h2" / "store", base_chunk)
        _wait_intact(blob, base_chunk, timeout=120.0)
        assert "store repair: fetched" in net.tail("h2", 100_000)
