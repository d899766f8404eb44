"""Chunk transfer over hivemind's P2P: framing, parallel fetch, and peers that lie, die or stall."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from node.errors import ChunkNotFoundError, ErrorCode, FetchError, FramingError, RemoteTimeoutError
from node.framing import HEADER, BufferPool, FrameStream, read_frame, write_frame
from node.store import ContentStore
from node.transport import HANDLER_NAME, ChunkServer, ChunkStream, fetch_chunks

pytestmark = pytest.mark.network


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FaultyServer(ChunkServer):
    """A chunk server whose misbehaviour is chosen per test: corrupt bytes, a cut stream, silence."""

    mode = "honest"

    async def _answer_gets(self, writer, digests, peer):
        if self.mode == "honest":
            return await super()._answer_gets(writer, digests, peer)
        for digest in digests:
            data = self.source.get(digest)
            if self.mode == "corrupt":
                await write_frame(writer, ErrorCode.OK, data[:-1] + bytes([data[-1] ^ 1]), timeout=5)
            elif self.mode == "cut":  # dies mid-chunk: half of the announced payload, then the stream closes
                writer.write(HEADER.pack(ErrorCode.OK, len(data)) + data[: len(data) // 2])
                await writer.drain()
                raise ConnectionError("simulated death mid-transfer")
            elif self.mode == "silent":  # longer than the client's timeout
                await asyncio.sleep(3)


@pytest.fixture(scope="module")
def servers(dht_peers, loop, tmp_path_factory):
    """Peer 0 serves honestly, peer 1 runs a FaultyServer, peer 2 is the fetching client."""
    root = tmp_path_factory.mktemp("transport")
    stores = [ContentStore(root / f"store{i}") for i in range(3)]
    honest, faulty = ChunkServer(stores[0]), FaultyServer(stores[1], timeout=5)

    async def setup():
        p2ps = [await peer.dht.replicate_p2p() for peer in dht_peers]
        await honest.start(p2ps[0])
        await faulty.start(p2ps[1])
        return p2ps

    p2ps = loop.run_until_complete(setup())
    yield p2ps, stores, faulty
    faulty.mode = "honest"

    async def teardown():
        await honest.stop(p2ps[0])
        await faulty.stop(p2ps[1])
        for p2p in p2ps:
            await p2p.shutdown()

    loop.run_until_complete(teardown())
    for store in stores:
        store.close()


def _fresh_sink(tmp_path):
    return ContentStore(tmp_path / "sink")


def _chunks(count: int, size: int = 256 * 1024) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def test_parallel_fetch_takes_different_chunks_from_several_peers(servers, loop, tmp_path):
    (p0, p1, client), stores, faulty = servers
    faulty.mode = "honest"
    chunks = _chunks(10)
    digests = [_digest(c) for c in chunks]
    for c in chunks[:6]:
        stores[0].put(c)
    for c in chunks[3:]:
        stores[1].put(c)
    with _fresh_sink(tmp_path) as sink:
        report = loop.run_until_complete(fetch_chunks(client, digests, [p0.peer_id, p1.peer_id], sink))
        assert report.fetched == 10 and report.already_held == 0
        assert report.bytes_received == sum(map(len, chunks))
        assert report.bytes_by_peer[str(p0.peer_id)] >= 3 * len(chunks[0])  # chunks 0-2 exist only there
        assert report.bytes_by_peer[str(p1.peer_id)] >= 4 * len(chunks[0])  # chunks 6-9 exist only there
        assert [sink.get(d) for d in digests] == chunks


def test_have_reports_which_chunks_a_peer_holds(servers, loop):
    (p0, _, client), stores, _ = servers
    held = stores[0].put(b"held by peer 0")

    async def ask():
        async with ChunkStream(client, p0.peer_id, timeout=10) as stream:
            return await stream.call_have([held, _digest(b"absent")])

    assert loop.run_until_complete(ask()) == [True, False]


def test_corrupt_chunks_drop_the_peer_and_come_from_another(servers, loop, tmp_path):
    (p0, p1, client), stores, faulty = servers
    faulty.mode = "corrupt"
    chunks = _chunks(4)
    for c in chunks:
        stores[0].put(c)
        stores[1].put(c)
    digests = [_digest(c) for c in chunks]
    with _fresh_sink(tmp_path) as sink:
        report = loop.run_until_complete(fetch_chunks(client, digests, [p1.peer_id, p0.peer_id], sink))
        assert "served a corrupt chunk" in report.dropped_peers[str(p1.peer_id)]
        assert str(p1.peer_id) not in report.bytes_by_peer
        assert [sink.get(d) for d in digests] == chunks


def test_peer_dying_mid_transfer_is_replaced(servers, loop, tmp_path):
    (p0, p1, client), stores, faulty = servers
    faulty.mode = "cut"
    chunks = _chunks(4, size=2 << 20)
    for c in chunks:
        stores[0].put(c)
        stores[1].put(c)
    digests = [_digest(c) for c in chunks]
    with _fresh_sink(tmp_path) as sink:
        report = loop.run_until_complete(
            fetch_chunks(client, digests, [p1.peer_id, p0.peer_id], sink, timeout=5)
        )
        assert str(p1.peer_id) in report.dropped_peers
        assert [sink.get(d) for d in digests] == chunks


def test_silent_peer_times_out(servers, loop, tmp_path):
    (_, p1, client), stores, faulty = servers
    faulty.mode = "silent"
    chunk = _chunks(1)[0]
    stores[1].put(chunk)
    with _fresh_sink(tmp_path) as sink:
        with pytest.raises(FetchError) as caught:
            loop.run_until_complete(fetch_chunks(client, [_digest(chunk)], [p1.peer_id], sink, timeout=1.0))
        assert caught.value.missing == (_digest(chunk),)
        assert "RemoteTimeoutError" in str(caught.value)


def test_missing_chunk_fails_then_fetch_resumes(servers, loop, tmp_path):
    (p0, _, client), stores, _ = servers
    chunks = _chunks(3)
    digests = [_digest(c) for c in chunks]
    stores[0].put(chunks[0])
    stores[0].put(chunks[1])
    with _fresh_sink(tmp_path) as sink:
        with pytest.raises(FetchError) as caught:
            loop.run_until_complete(fetch_chunks(client, digests, [p0.peer_id], sink))
        assert caught.value.missing == (digests[2],)
        assert sink.missing(digests) == [digests[2]]
        stores[0].put(chunks[2])
        report = loop.run_until_complete(fetch_chunks(client, digests, [p0.peer_id], sink))
        assert (report.already_held, report.fetched) == (2, 1)
        assert sink.get(digests[2]) == chunks[2]


def test_server_answers_bad_requests_with_a_code(servers, loop):
    (p0, _, client), _, _ = servers

    async def raw(kind: int, payload: bytes, *, then_wait: float = 0.0):
        _, reader, writer = await client.call_binary_stream_handler(p0.peer_id, HANDLER_NAME)
        try:
            await write_frame(writer, kind, payload, timeout=5)
            frame = await read_frame(reader, timeout=5)
            if then_wait:  # the server waits for us to close first: closing first could lose its reply
                with pytest.raises(RemoteTimeoutError):
                    await read_frame(reader, timeout=then_wait)
            return frame
        finally:
            writer.close()
            await writer.wait_closed()

    code, message = loop.run_until_complete(raw(9, b"\0" * 32, then_wait=0.5))
    assert (code, message) == (ErrorCode.BAD_REQUEST, b"expected a request kind 1 or 2, got 9")
    code, message = loop.run_until_complete(raw(1, b"\0" * 31))
    assert code == ErrorCode.BAD_REQUEST
    assert message == b"expected 1..256 digests of 32 bytes, got a 31-byte payload"
    code, message = loop.run_until_complete(raw(1, bytes(32)))
    assert code == ErrorCode.NOT_FOUND


def _reader_with(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_framing_rejects_truncation_oversize_and_silence():
    async def scenario():
        assert await read_frame(_reader_with(b""), timeout=1) is None
        assert await read_frame(_reader_with(HEADER.pack(3, 2) + b"ok"), timeout=1) == (3, b"ok")
        with pytest.raises(FramingError, match="5-byte frame header, got 2 bytes"):
            await read_frame(_reader_with(b"\0\0"), timeout=1)
        with pytest.raises(FramingError, match="10-byte frame payload, got 4 bytes"):
            await read_frame(_reader_with(HEADER.pack(0, 10) + b"abcd"), timeout=1)
        with pytest.raises(FramingError, match="at most 100 bytes, got a header announcing 101"):
            await read_frame(_reader_with(HEADER.pack(0, 101)), timeout=1, max_bytes=100)
        with pytest.raises(RemoteTimeoutError, match=r"frame header within 0\.05 s"):
            await read_frame(_reader_with(b"", eof=False), timeout=0.05)

    asyncio.run(scenario())


def test_server_reports_not_found_from_a_plain_source():
    class EmptySource:
        def get(self, digest):
            raise ChunkNotFoundError(f"no {digest}")

    server = ChunkServer(EmptySource())
    assert server._has(_digest(b"x")) is False


async def _frame_stream_pair(server_bytes: bytes, *, close: bool = True):
    """A FrameStream client reading `server_bytes` sent by a TCP server on 127.0.0.1."""

    async def serve(reader, writer):
        writer.write(server_bytes)
        await writer.drain()
        if close:
            writer.close()
        else:
            await asyncio.sleep(1)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, stream = await asyncio.get_running_loop().create_connection(FrameStream, "127.0.0.1", port)
    return server, stream


def test_frame_stream_reads_frames_in_place_and_rejects_bad_ones():
    payload = os.urandom(3 << 20)

    async def scenario():
        server, stream = await _frame_stream_pair(
            HEADER.pack(0, len(payload)) + payload + HEADER.pack(7, 0) + HEADER.pack(1, 10) + b"abcd"
        )
        pool = BufferPool()
        kind, got = await stream.read_frame(timeout=5, allocate=pool.take)
        assert (kind, got) == (0, payload) and isinstance(got, bytearray)
        pool.give(got)
        assert await stream.read_frame(timeout=5) == (7, bytearray())
        with pytest.raises(FramingError, match="10-byte frame payload, got 4 bytes"):
            await stream.read_frame(timeout=5)
        assert await stream.read_frame(timeout=5) is None  # nothing more after the end of stream
        assert pool.take(len(payload)) is got  # the buffer came back for reuse
        server.close()

        server, stream = await _frame_stream_pair(HEADER.pack(0, 101))
        with pytest.raises(FramingError, match="at most 100 bytes, got a header announcing 101"):
            await stream.read_frame(timeout=5, max_bytes=100)
        server.close()

        server, stream = await _frame_stream_pair(b"\0\0")
        with pytest.raises(FramingError, match="5-byte frame header, got 2 bytes"):
            await stream.read_frame(timeout=5)
        server.close()

        server, stream = await _frame_stream_pair(HEADER.pack(0, 8) + b"half", close=False)
        with pytest.raises(RemoteTimeoutError, match=r"8-byte frame payload within 0\.2 s"):
            await stream.read_frame(timeout=0.2)
        stream.close()
        with pytest.raises(ConnectionResetError):
            await stream.write_frame(1, b"x", timeout=1)
        server.close()

    asyncio.run(scenario())


def test_buffer_pool_reuses_by_size_and_stays_bounded():
    pool = BufferPool(max_buffers=2)
    a, b, c = pool.take(4), pool.take(4), pool.take(8)
    for buffer in (a, b, c):
        pool.give(buffer)  # the third is dropped: the pool holds two
    assert pool.take(4) is b and pool.take(4) is a
    assert pool.take(8) is not c and len(pool.take(8)) == 8


def test_one_stream_pipelines_many_requests(servers, loop, tmp_path):
    (p0, _, client), stores, _ = servers
    chunks = _chunks(25, size=64 * 1024)
    for c in chunks:
        stores[0].put(c)
    digests = [_digest(c) for c in chunks]
    with _fresh_sink(tmp_path) as sink:
        report = loop.run_until_complete(
            fetch_chunks(client, digests, [p0.peer_id], sink, streams_per_peer=1, batch=2, depth=3, writers=2)
        )
        assert (report.fetched, report.bytes_received) == (25, 25 * 64 * 1024)
        assert [sink.get(d) for d in digests] == chunks


def test_a_failing_sink_stops_the_fetch_with_its_error(servers, loop):
    (p0, _, client), stores, _ = servers
    chunks = _chunks(6)
    for c in chunks:
        stores[0].put(c)

    class FullDisk:
        def missing(self, digests):
            return list(digests)

        def put(self, data, digest=None):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        loop.run_until_complete(fetch_chunks(client, [_digest(c) for c in chunks], [p0.peer_id], FullDisk()))


def test_a_chunk_just_sent_to_one_peer_is_answered_elsewhere_to_another(servers, loop):
    (p0, p1, client), stores, _ = servers
    chunk = os.urandom(1024)
    digest = stores[0].put(chunk)

    async def get(p2p):
        async with ChunkStream(p2p, p0.peer_id, timeout=10) as stream:
            await stream.request_get([digest])
            code, data = await stream.read_chunk()
            return code, bytes(data)

    async def three_asks():
        return await get(p1), await get(client), await get(p1)

    first, other, again = loop.run_until_complete(three_asks())
    assert first == (ErrorCode.OK, chunk)  # peer 1 asks first: served
    assert other[0] is ErrorCode.ELSEWHERE  # the client, moments later: ask the others
    assert again == (ErrorCode.OK, chunk)  # peer 1 again: served (it may have lost its copy)
