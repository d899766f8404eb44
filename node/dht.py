"""The node's hivemind DHT: a child process that dies with its parent, and owner-only small records.

`start_dht` starts hivemind's DHT (a forked child that runs the go-libp2p daemon `p2pd`) on
127.0.0.1 with NAT traversal off. The child asks the kernel for SIGTERM when its parent dies and,
on SIGTERM, terminates its own children (`p2pd`) before exiting, so a SIGKILLed node leaves nothing.

`RecordBoard` stores and reads small values (a few KiB) under a key with one subkey per owner:
the subkey carries the owner's RSA public key and the value its signature (hivemind's
`RSASignatureValidator`), so no peer can overwrite another's record. Every call has a timeout.

`ClientBoard` is a reader for short-lived clients (`umm pull`): a client-mode DHT node inside the
caller's event loop, with no child Python process, so it starts in about the time `p2pd` takes to
start. Its `p2pd` is the caller's own child and exits with it, even after a SIGKILL (measured:
within 0.05 s, its socket removed), as nothing else holds its control connection. Once in about
40 such kills on a loaded machine (load 4-8) it exited but left its socket file; the next node or
pull start removes such files (`remove_unbound_sockets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from merging.atomic import write_atomic
from node.errors import DHTError
from node.process import child_pids, remove_unbound_sockets

MAX_VALUE_BYTES = 8 * 1024
DEFAULT_DHT_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


def _terminate_children_and_exit(signum: int, _frame: object) -> None:
    for child in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
    os._exit(128 + signum)


class NodeDHT(DHT):
    """hivemind's DHT whose child process (and its `p2pd`) dies with the parent."""

    def run(self) -> None:  # runs in the forked child
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        signal.signal(signal.SIGTERM, _terminate_children_and_exit)
        if os.getppid() != self._parent_pid:  # the parent died before prctl took effect
            _terminate_children_and_exit(signal.SIGTERM, None)
        super().run()


def load_or_create_rsa_key(path: str | Path) -> RSAPrivateKey:
    """The node's DHT signing key, kept in `path` (DER, mode 0600) so a restart keeps its records."""
    path = Path(path)
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        der = path.read_bytes()
        key.__setstate__({"_private_key": der})
        return key
    fresh = RSAPrivateKey()
    write_atomic(path, fresh.to_bytes())  # its temp file is created with mode 0600
    return fresh


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    rsa_key: RSAPrivateKey | None = None,
    identity_path: str | Path | None = None,
    start_timeout: float = 60.0,
    client_mode: bool = False,
) -> tuple[NodeDHT, RSASignatureValidator]:
    """Start a DHT node on `host:port` joined to `initial_peers`; returns it and its record validator."""
    remove_unbound_sockets()  # those of nodes killed without a chance to clean up
    validator = RSASignatureValidator(rsa_key if rsa_key is not None else RSAPrivateKey())
    dht = NodeDHT(
        initial_peers=list(initial_peers),
        start=False,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        nat_port_map=False,
        auto_nat=False,
        record_validators=[validator],
        identity_path=str(identity_path) if identity_path is not None else None,
        client_mode=client_mode,
    )
    try:
        dht.run_in_background(await_ready=True, timeout=start_timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            dht.shutdown()
        raise DHTError(
            f"expected a DHT node to start on {host}:{port}, got {type(exc).__name__}: {exc}"
        ) from exc
    return dht, validator


def visible_maddrs(dht: DHT) -> list[str]:
    """The multiaddrs other peers can bootstrap from (with the /p2p/ peer id)."""
    return [str(addr) for addr in dht.get_visible_maddrs()]


class RecordBoard:
    """Owner-only records of a few KiB under shared keys, on a DHT started by `start_dht`."""

    def __init__(self, dht: DHT, validator: RSASignatureValidator, *, timeout: float = DEFAULT_DHT_TIMEOUT):
        self.dht = dht
        self.validator = validator
        self.timeout = timeout

    @property
    def owner(self) -> bytes:
        """This node's subkey: its RSA public key in hivemind's owner tag."""
        return self.validator.local_public_key

    def publish(self, key: str, value: bytes, *, ttl: float) -> bool:
        """Store `value` under `key` in this node's subkey for `ttl` seconds; False if no peer took it."""
        if not isinstance(value, bytes):
            raise DHTError(f"expected a bytes value, got {type(value).__name__}")
        if len(value) > MAX_VALUE_BYTES:
            raise DHTError(f"expected a DHT value of at most {MAX_VALUE_BYTES} bytes, got {len(value)}")
        future = self.dht.store(key, value, get_dht_time() + ttl, subkey=self.owner, return_future=True)
        return bool(self._wait(future, f"store under {key!r}"))

    def read(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        """Every owner's current value under `key` as {owner subkey: value}, validated by hivemind."""
        future = self.dht.get(key, latest=latest, return_future=True)
        return owner_values(self._wait(future, f"get of {key!r}"))

    async def apublish(self, key: str, value: bytes, *, ttl: float) -> bool:
        """`publish` without blocking the event loop."""
        return await asyncio.to_thread(self.publish, key, value, ttl=ttl)

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        """`read` without blocking the event loop."""
        return await asyncio.to_thread(self.read, key, latest=latest)

    def _wait(self, future, what: str):
        started = time.monotonic()
        try:
            return future.result(timeout=self.timeout)
        except TimeoutError:
            future.cancel()
            raise DHTError(f"expected the DHT {what} within {self.timeout:g} s, got no answer") from None
        except Exception as exc:
            raise DHTError(
                f"expected the DHT {what} to succeed, "
                f"got {type(exc).__name__} after {time.monotonic() - started:.1f} s"
            ) from exc


def owner_values(found: object) -> dict[bytes, bytes]:
    """{owner subkey: value} of a DHT `get` answer (a `ValueWithExpiration` of subkeys, or None)."""
    value = getattr(found, "value", None)
    if not isinstance(value, dict):
        return {}
    records: dict[bytes, bytes] = {}
    for subkey, item in value.items():
        if isinstance(subkey, bytes) and isinstance(getattr(item, "value", None), bytes):
            records[subkey] = item.value
    return records


class ReadOnlyValidator(RSASignatureValidator):
    """Checks owners' signatures on the records it reads, with no key of its own.

    hivemind's validator generates an RSA key when given none (35-250 ms at every start). This one
    owns no record, so `sign_value` passes every value through as it is (a value it relays keeps
    its owner's signature).
    """

    def __init__(self) -> None:  # no super().__init__: it would want or make a private key
        self._private_key = None
        self._local_public_key = self.PUBLIC_KEY_FORMAT.replace(b"_key_", b"read-only reader")


class ClientBoard:
    """A read-only, client-mode DHT node in the caller's event loop (see the module docstring).

    Reads return what `RecordBoard.read` returns; `p2p` serves `fetch_chunks` directly.
    """

    def __init__(self, node: DHTNode, *, timeout: float) -> None:
        self.node = node
        self.p2p: P2P = node.p2p
        self.timeout = timeout

    @classmethod
    async def start(
        cls,
        initial_peers: Sequence[str],
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_DHT_TIMEOUT,
        start_timeout: float = 60.0,
    ) -> ClientBoard:
        """Start `p2pd` and a client DHT node joined to `initial_peers`; raises DHTError if it fails."""
        remove_unbound_sockets()  # those of nodes and pulls killed without a chance to clean up
        p2p = None
        try:
            p2p = await P2P.create(
                initial_peers=list(initial_peers),
                host_maddrs=[f"/ip4/{host}/tcp/0"],
                nat_port_map=False,
                auto_nat=False,
                dht_mode="client",
                startup_timeout=start_timeout,
            )
            validator = CompositeValidator([ReadOnlyValidator()])
            joining = DHTNode.create(
                p2p=p2p, initial_peers=list(initial_peers), client_mode=True, record_validator=validator
            )
            node = await asyncio.wait_for(joining, start_timeout)
        except BaseException as exc:  # cancelled too: stop the daemon before going on
            if p2p is not None:
                with contextlib.suppress(Exception):
                    await p2p.shutdown()
            if not isinstance(exc, Exception):
                raise
            raise DHTError(
                f"expected a DHT client joined to {list(initial_peers)}, got {type(exc).__name__}: {exc}"
            ) from exc
        return cls(node, timeout=timeout)

    @property
    def pids(self) -> list[int]:
        """The processes this client started: its `p2pd`."""
        child = getattr(self.p2p, "_child", None)
        return [child.pid] if child is not None else []

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        """Every owner's current value under `key` as {owner subkey: value}, validated by hivemind."""
        try:
            found = await asyncio.wait_for(self.node.get(key, latest=latest), self.timeout)
        except TimeoutError:
            raise DHTError(
                f"expected the DHT get of {key!r} within {self.timeout:g} s, got no answer"
            ) from None
        return owner_values(found)

    async def shutdown(self) -> None:
        """Stop the DHT node and `p2pd` (their sockets are removed)."""
        with contextlib.suppress(Exception):
            await self.node.shutdown()
        with contextlib.suppress(Exception):
            await self.p2p.shutdown()
