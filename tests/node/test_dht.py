"""DHT records: owner-only subkeys, size limit, timeouts; the DHT child and p2pd die with the node."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import textwrap

import pytest

from node.dht import (
    MAX_VALUE_BYTES,
    ClientBoard,
    ReadOnlyValidator,
    RecordBoard,
    load_or_create_rsa_key,
    visible_maddrs,
)
from node.errors import DHTError
from node.process import process_tree, spawn_in_new_session, stop_process_group, wait_gone

pytestmark = pytest.mark.network


def test_each_owner_keeps_its_own_record(dht_peers):
    a, b, c = dht_peers
    assert a.board.publish("umm/test/cards", b"card of a", ttl=60)
    assert b.board.publish("umm/test/cards", b"card of b", ttl=60)
    records = c.board.read("umm/test/cards")
    assert records == {a.board.owner: b"card of a", b.board.owner: b"card of b"}


def test_a_peer_cannot_overwrite_another_owners_record(dht_peers):
    a, b, c = dht_peers
    assert a.board.publish("umm/test/owned", b"original", ttl=60)
    # b signs with its own key, so a value under a's subkey fails validation everywhere.
    future = b.dht.store("umm/test/owned", b"forged", 10**10, subkey=a.board.owner, return_future=True)
    assert future.result(timeout=15) is False
    assert c.board.read("umm/test/owned") == {a.board.owner: b"original"}


def test_value_size_and_type_are_limited(dht_peers):
    a = dht_peers[0]
    with pytest.raises(DHTError, match=f"at most {MAX_VALUE_BYTES} bytes, got {MAX_VALUE_BYTES + 1}"):
        a.board.publish("umm/test/big", b"x" * (MAX_VALUE_BYTES + 1), ttl=60)
    with pytest.raises(DHTError, match="expected a bytes value, got str"):
        a.board.publish("umm/test/big", "text", ttl=60)


def test_unknown_key_reads_empty(dht_peers):
    assert dht_peers[1].board.read("umm/test/nothing-here") == {}


def test_every_call_has_a_timeout(dht_peers):
    a = dht_peers[0]
    impatient = RecordBoard(a.dht, a.board.validator, timeout=1e-6)
    with pytest.raises(DHTError, match="within 1e-06 s"):
        impatient.read("umm/test/cards")


def test_rsa_key_is_persisted_with_private_mode(tmp_path):
    path = tmp_path / "dht_key.der"
    first = load_or_create_rsa_key(path)
    second = load_or_create_rsa_key(path)
    assert first.to_bytes() == second.to_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o600


_NODE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from node.dht import start_dht
    dht, _ = start_dht()
    print("READY", os.getpid(), flush=True)
    time.sleep(600)
    """
)


def _start_script_node(tmp_path):
    log = tmp_path / "node.log"
    proc = spawn_in_new_session([sys.executable, "-c", _NODE_SCRIPT], log_path=log)
    for _ in range(600):
        if "READY" in log.read_text():
            break
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        wait_gone([proc.pid], 0.05)
    tree = process_tree(proc.pid)
    return proc, tree


def test_sigkill_of_the_node_takes_dht_child_and_p2pd_along(tmp_path):
    proc, tree = _start_script_node(tmp_path)
    try:
        assert len(tree) >= 3  # node, DHT child, p2pd
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(tree, 15.0) == []
    finally:
        stop_process_group(proc.pid, grace=2.0)


def test_stop_process_group_ends_the_whole_tree(tmp_path):
    proc, tree = _start_script_node(tmp_path)
    stop_process_group(proc.pid, grace=10.0)
    assert wait_gone(tree, 1.0) == []


def test_a_client_board_reads_what_owners_signed_and_leaves_nothing_running(dht_peers, loop):
    a, b, _ = dht_peers
    assert a.board.publish("umm/test/client", b"signed by a", ttl=60)
    assert b.board.publish("umm/test/client", b"signed by b", ttl=60)

    async def read():
        client = await ClientBoard.start(visible_maddrs(b.dht))
        try:
            return await client.aread("umm/test/client"), await client.aread("umm/test/none"), client.pids
        finally:
            await client.shutdown()

    records, nothing, pids = loop.run_until_complete(read())
    assert records == {a.board.owner: b"signed by a", b.board.owner: b"signed by b"}
    assert nothing == {}
    assert len(pids) == 1 and wait_gone(pids, 10.0) == []  # its p2pd


def test_the_read_only_validator_checks_signatures_without_a_key():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.crypto import RSAPrivateKey

    owner = RSASignatureValidator(RSAPrivateKey())
    record = DHTRecord(key=b"key", subkey=owner.local_public_key, value=b"value", expiration_time=10.0**10)
    signed = dataclasses.replace(record, value=owner.sign_value(record))
    reader = ReadOnlyValidator()
    assert reader.validate(signed)
    assert not reader.validate(dataclasses.replace(signed, value=b"other" + signed.value[5:]))
    assert reader.sign_value(signed) == signed.value  # relayed as the owner signed it
    assert reader.local_public_key not in signed.subkey
