"""`umm pull` trusts no one by default: a quorum-attested result with one tensor altered is refused.

One honest `umm node start` process holds the genesis (it needs three contributions, so it merges
nothing itself) and serves the base. Two keys of a `HostilePeer` announce real contributions and
their merge, attested in full by both keys on every shard: a quorum (2 of 2 contributions, 2 full).
Round 0 is merged honestly: a pull (verifying by default) writes it. Round 1's merge has one norm
weight altered: the default pull refuses it with one `Error:` line, exit 2 and nothing at --out,
while ``--no-verify`` (the quorum's word alone) writes the altered model.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from hostile_peer import HostilePeer, attested_merge
from node_models import make_base
from safetensors.torch import load_file

from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.store import ContentStore
from protocol.fingerprint import fingerprint_state_dict
from protocol.identity import Identity

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _pull(net: LocalNetwork, out, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "node.cli", "pull", "--network", net.network_id, "--out", str(out)]
    command += ["--initial-peers", net.bootstrap, "--timeout", "180", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def _in_thread(loop, fn, *args):
    """`fn(*args)` in a thread while `loop` runs (the hostile peer answers chunk requests on it)."""
    return loop.run_until_complete(asyncio.to_thread(fn, *args))


def test_a_pull_refuses_an_attested_result_whose_sample_does_not_recompute(tmp_path, loop):
    make_base(tmp_path / "base")
    base = load_file(tmp_path / "base" / "model.safetensors")
    altered = sorted(n for n in base if n.endswith("norm.weight"))[0]
    with LocalNetwork(tmp_path) as net:
        genesis = net.create("h1", tmp_path / "base", network_name="verify", min_contributions=3)
        with ContentStore(tmp_path / "h1" / "store") as store:
            base_entries = read_base_manifest(store.get(genesis.base_manifest))
        net.start_all(["h1"])
        keys = [Identity.from_seed(bytes([91 + i]) * 32) for i in range(2)]
        peer = loop.run_until_complete(HostilePeer.start(net.bootstrap, keys, tmp_path / "peer"))
        try:
            honest, _ = loop.run_until_complete(
                attested_merge(peer, genesis, tmp_path / "base", base_entries, 0)
            )
            pulled = _in_thread(loop, _pull, net, tmp_path / "honest")
            assert pulled.returncode == 0, pulled.stderr
            assert f"round 0: {honest}" in pulled.stdout and "verified: " in pulled.stdout
            written = load_file(tmp_path / "honest" / "model.safetensors")
            assert fingerprint_state_dict(written) == honest

            forged, _ = loop.run_until_complete(
                attested_merge(peer, genesis, tmp_path / "base", base_entries, 1, alter=altered)
            )
            refused = _in_thread(loop, _pull, net, tmp_path / "refused")
            assert refused.returncode == 2, refused.stderr
            errors = [line for line in refused.stderr.splitlines() if line.strip()]
            assert len(errors) == 1 and errors[0].startswith("Error: "), refused.stderr
            assert "round 1" in errors[0] and altered in errors[0]
            assert not (tmp_path / "refused").exists()
            assert not list(tmp_path.glob(".refused*"))

            trusting = _in_thread(loop, _pull, net, tmp_path / "trusting", "--no-verify")
            assert trusting.returncode == 0, trusting.stderr
            assert f"round 1: {forged}" in trusting.stdout and "not verified" in trusting.stdout
            written = load_file(tmp_path / "trusting" / "model.safetensors")
            assert not written[altered].equal(base[altered])
            assert fingerprint_state_dict(written) == forged != honest
        finally:
            loop.run_until_complete(peer.close())
