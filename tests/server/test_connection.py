"""The one connection shell over real sockets: idle clients on every route, adversarial clients, drain.

Every route (native and adapters) runs through :func:`stream_server.server.connection.serve_connection`,
so these tests hold for all of them. Adversarial clients use loopback addresses only
(127.0.0.x), are bounded in count, and every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream_server.server.driver import SessionDriver
from stream_server.adapters import ROUTES as ADAPTER_ROUTES
from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
from stream_server.core.session import Session
from tests.fakes import CountingEngine
from tests.vad.test_vad import voiced

IDLE_S = 1.0

# (path, first message) for every route: the first message opens the route's session(s).
ROUTES = {
    "native": ("/v1/listen", json.dumps({"type": "start", "partials": False})),
    "openai": ("/v1/realtime", json.dumps({
        "type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": {
            "type": "audio/pcm", "rate": 24000}}}}})),
    "deepgram": ("/deepgram/v1/listen?encoding=linear16&sample_rate=16000", json.dumps({"type": "KeepAlive"})),
    "twilio": ("/v1/twilio", json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
        "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
        "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})),
}


def speech_pcm(seconds: float) -> bytes:
    return (voiced(seconds) * 32767).astype("<i2").tobytes()


async def wait_for(condition, timeout: float = 10.0, step: float = 0.02) -> None:
    """Wait until ``condition()`` holds (bounded), instead of sleeping a guessed time."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(step)


async def messages_until_closed(ws, timeout: float) -> list:
    out = []
    try:
        async with asyncio.timeout(timeout):
            async for message in ws:
                out.append(message)
    except ConnectionClosed:
        pass
    return out


def live_objects() -> dict[str, int]:
    """Sessions and drivers alive in this process (what a connection holds on to)."""
    gc.collect()
    counts = {"Session": 0, "SessionDriver": 0}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: that touches lazy modules' attributes (torch warns)
        if kind is Session or kind is SessionDriver:
            counts[kind.__name__] += 1
    return counts


# ---- idle clients on every route ----------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("first_message", [False, True], ids=["silent-from-the-start", "silent-after-first-message"])
async def test_a_silent_client_is_ended_within_the_idle_timeout(route, first_message):
    path, message = ROUTES[route]
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(idle_timeout_s=IDLE_S))
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        async with connect(f"ws://127.0.0.1:{server.port}{path}") as ws:
            began = time.monotonic()
            if first_message:
                await ws.send(message)
            await messages_until_closed(ws, timeout=IDLE_S + 5)
            took = time.monotonic() - began
        assert ws.close_code == 1001 and ws.close_reason == "idle timeout"
        assert took <= IDLE_S + 1.0, f"{route}: closed after {took:.2f} s"
        await wait_for(lambda: not server._sessions)


async def test_native_idle_before_start_is_told_why():
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(idle_timeout_s=IDLE_S))
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        async with connect(server.url) as ws:
            events = [json.loads(m) for m in await messages_until_closed(ws, timeout=IDLE_S + 5)]
    assert [(e["type"], e.get("code"), e.get("fatal")) for e in events] == [("error", "idle_timeout", True)]


async def test_throttling_is_not_idleness():
    """A client throttled for sending faster than real time is not idle while the server waits."""
    settings = ServerSettings(network=NetworkSettings(port=0),
                              limits=LimitsSettings(idle_timeout_s=0.5, realtime_factor=1.0), burst_s=0.0)
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            await ws.send(speech_pcm(1.5))  # the server will not read again for ~1.5 s
            await ws.send(json.dumps({"type": "stop"}))
            events = [json.loads(m) for m in await messages_until_closed(ws, timeout=10)]
    assert not [e for e in events if e.get("code") == "idle_timeout"]
    assert events[-1]["type"] == "end" and ws.close_code == 1000


# ---- adversarial clients ------------------------------------------------------------------------


async def test_silent_connections_from_many_addresses_cannot_hold_the_slots():
    """Silent connections from 4 addresses fill every slot; a legitimate client from a fifth
    address is refused (503) only until the idle timeout frees them, then served; nothing of the
    attack stays in memory."""
    settings = ServerSettings(network=NetworkSettings(port=0),
                              limits=LimitsSettings(idle_timeout_s=IDLE_S, max_sessions=12, max_sessions_per_ip=3))
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        before = live_objects()
        attackers = []
        for host in range(10, 14):
            for _ in range(3):
                attackers.append(await connect(f"ws://127.0.0.1:{server.port}/v1/listen",
                                               local_addr=(f"127.0.0.{host}", 0)))
        assert len(server._sessions) == 12
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{server.port}/v1/listen", local_addr=("127.0.0.2", 0)):
                pass
        assert refused.value.response.status_code == 503
        ended = await asyncio.gather(*(messages_until_closed(ws, timeout=IDLE_S + 5) for ws in attackers))
        assert all(ws.close_code == 1001 for ws in attackers) and all(len(m) == 1 for m in ended)
        await wait_for(lambda: not server._sessions)
        async with connect(f"ws://127.0.0.1:{server.port}/v1/listen", local_addr=("127.0.0.2", 0)) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            await ws.send(speech_pcm(1.0))
            await ws.send(json.dumps({"type": "stop"}))
            events = [json.loads(m) for m in await messages_until_closed(ws, timeout=10)]
        assert [e["type"] for e in events if e["type"] in ("ready", "final", "end")] == ["ready", "final", "end"]
        await wait_for(lambda: not server._sessions)
        del attackers, ended
        assert live_objects() == before
        assert not server._per_ip and server.worker.queue_depth == 0


async def test_a_client_that_never_reads_is_closed_1008_and_others_are_served():
    """A raw TCP client upgrades, streams audio and never reads a byte: once its outgoing queue is
    full the server drops it with 1008, and meanwhile a normal client is served."""
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(realtime_factor=0), outbox_limit=8)
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        before = live_objects()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill the server's send path quickly
            key = base64.b64encode(b"0123456789abcdef").decode()
            raw.sendall((f"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            send_frame(raw, 0x1, json.dumps({"type": "start", "partials": True, "partial_interval": 0.1}).encode())
            for _ in range(60):  # 60 x 1 s of speech and pauses, never reading: many partials and finals
                send_frame(raw, 0x2, speech_pcm(0.6) + bytes(12800))
            await wait_for(lambda: not server._sessions, timeout=20)
            async with connect(server.url) as ws:  # the server stays healthy meanwhile
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
        await wait_for(lambda: not server._sessions)
        assert live_objects() == before


def send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    """One masked client frame (RFC 6455), written with a blocking send."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    header = bytes([0x80 | opcode])
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 1 << 16:
        header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    sock.sendall(header + mask + masked)


async def test_a_client_that_vanishes_mid_utterance_frees_everything():
    engine = CountingEngine(delay=0.05)
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0)), routes=ADAPTER_ROUTES) as server:
        before = live_objects()
        ws = await connect(server.url)
        await ws.send(json.dumps({"type": "start", "partials": True}))
        await ws.send(speech_pcm(2.0))  # speech still open, partials in flight
        await wait_for(lambda: engine.batches)
        ws.transport.abort()  # gone without a close frame
        await wait_for(lambda: not server._sessions)
        await wait_for(lambda: server.worker.queue_depth == 0)
        del ws
        assert live_objects() == before


async def test_an_upgrade_request_sent_a_byte_a_second_is_dropped_and_holds_no_slot():
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(max_sessions=1),
                              handshake_timeout_s=2.0)
    async with StreamServer(CountingEngine(), settings, routes=ADAPTER_ROUTES) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.20", 0))
        request = b"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        began = time.monotonic()

        async def trickle():
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)

        trickling = asyncio.create_task(trickle())
        # Meanwhile the one session slot is free for a legitimate client.
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
        async with asyncio.timeout(10):
            try:
                assert await reader.read() == b""  # closed by the server...
            except ConnectionResetError:
                pass  # ...or reset, as the unread trickle was still arriving
        took = time.monotonic() - began
        trickling.cancel()
        writer.close()
        assert took <= settings.handshake_timeout_s + 1.5


# ---- drain ----------------------------------------------------------------------------------------


async def test_drain_finishes_open_sessions_and_answers_new_ones_503():
    engine = CountingEngine(delay=0.05)
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0)), routes=ADAPTER_ROUTES) as server:
        ws = await connect(server.url)
        await ws.send(json.dumps({"type": "start", "partials": False}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(speech_pcm(1.5))  # speech still open: its final is due at the drain
        await wait_for(lambda: server._sessions and next(iter(server._sessions.values())).session.audio_seconds >= 1.5)
        engine.delay = 1.0  # the open utterance's final takes a while: the drain has to wait for it
        draining = asyncio.create_task(server.drain(deadline_s=5))
        await wait_for(lambda: server.draining)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.url):
                pass
        assert refused.value.response.status_code == 503
        assert b"shutting down" in refused.value.response.body
        events = [json.loads(m) for m in await messages_until_closed(ws, timeout=10)]
        assert await draining == 0
    kinds = [e["type"] for e in events]
    assert kinds == ["error", "speech_started", "speech_ended", "final", "end"] or kinds == [
        "speech_started", "error", "speech_ended", "final", "end"]
    assert events[kinds.index("error")]["code"] == "shutting_down"
    assert ws.close_code == 1001
