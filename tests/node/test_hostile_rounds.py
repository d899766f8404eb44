"""Attack 1 of issue 14 on real node processes: two fresh keys cannot invent a round.

Three honest `umm node start` processes (open membership, majority quorum) sit idle in round 0.
Two attacker keys (a `HostilePeer` in this process) publish round 0 of two contributions that
never existed: the base with one norm weight zeroed, attested in full by both keys on both shards —
a quorum (2 of 2 candidates) by the old rule. No honest node adopts it (it cannot fetch or verify
the candidates the result names, so it cannot check the round) and `umm pull` does not return it.
The honest nodes then contribute and decide round 0 themselves, and the pull returns their merge.
"""

from __future__ import annotations

import asyncio

import pytest
from hostile_peer import HostilePeer, fabricated_round, wait_logged
from node_models import make_base, make_expert

from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.store import ContentStore
from protocol.identity import Identity

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("h1", "h2", "h3")
REFUSAL = "not adopting the attested result"


def _serving(loop, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a thread while `loop` runs (the hostile peer answers on it)."""
    return loop.run_until_complete(asyncio.to_thread(fn, *args, **kwargs))


def test_two_fresh_keys_cannot_invent_a_round(tmp_path, loop):
    make_base(tmp_path / "base")
    with LocalNetwork(tmp_path) as net:
        genesis = net.create(NODES[0], tmp_path / "base", network_name="hostile", settle_seconds=1.0)
        with ContentStore(tmp_path / NODES[0] / "store") as store:
            base_entries = read_base_manifest(store.get(genesis.base_manifest))
        net.start_all(NODES)
        keys = [Identity.from_seed(bytes([77 + i]) * 32) for i in range(2)]
        attacker = loop.run_until_complete(HostilePeer.start(net.bootstrap, keys, tmp_path / "attacker"))
        try:
            forged = loop.run_until_complete(
                fabricated_round(attacker, genesis, tmp_path / "base", base_entries, 0)
            )
            _serving(loop, wait_logged, net.root, NODES, REFUSAL, timeout=120.0)
            assert all(net.state(n, "latest") is None for n in NODES)
            refused = _serving(loop, net.pull, tmp_path / "refused", timeout=10.0)
            assert refused.returncode == 2, refused.stderr
            assert "names candidates that do not verify" in refused.stderr
            assert not (tmp_path / "refused").exists()

            for index, name in enumerate(NODES):  # the honest round 0, beside the invented one
                make_expert(tmp_path / "base", tmp_path / f"expert-{name}", seed=300 + index)
                net.contribute(name, tmp_path / f"expert-{name}", codec="bf16")
            latest = _serving(loop, net.wait_converged, NODES, timeout=240.0)
            assert len({v["fingerprint"] for v in latest.values()}) == 1
            assert latest[NODES[0]]["fingerprint"] != forged
            pulled = _serving(loop, net.pull, tmp_path / "pulled", timeout=60.0)
            assert pulled.returncode == 0, pulled.stderr
            assert latest[NODES[0]]["fingerprint"] in pulled.stdout
        finally:
            loop.run_until_complete(attacker.close())
