"""Limits, backpressure, faults, drain and access control over a real socket (fast fake engine)."""

import asyncio
import collections
import json
import socket
import ssl
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream_server.server.auth import AccessPolicy, SecuritySettings
from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
from stream_server.server.logs import LoggingSettings
from stream_server.core.session import SessionSettings
from stream_server.inference.types import WorkerSettings
from tests.fakes import CountingEngine, GatedEngine
from tests.vad.test_vad import voiced

KEY = "k" * 8 + "0123456789abcdef"


def speech_pcm(seconds):
    return (voiced(seconds) * 32767).astype("<i2").tobytes()


async def collect(ws, timeout=30):
    """Every event until the server closes (bounded: a loaded 2-core CI machine is slow, not stuck)."""
    events = []
    try:
        async with asyncio.timeout(timeout):
            async for message in ws:
                events.append(json.loads(message))
    except ConnectionClosed:
        pass
    return events


async def wait_until(condition, what: str, timeout: float = 20.0):
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout`` s (instead of sleeping a guess)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_drain_finishes_open_utterances_then_closes_1001():
    engine = CountingEngine(delay=0.05)
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        ws = await connect(server.url)
        await ws.send(json.dumps({"type": "start", "partials": False}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(speech_pcm(1.5))  # speech still open: no final yet
        reading = asyncio.create_task(collect(ws))
        await asyncio.sleep(0.2)
        left = await server.drain(deadline_s=5)
        events = await reading
    assert left == 0
    kinds = [e["type"] for e in events]
    assert kinds[0] == "speech_started" and "final" in kinds and kinds[-1] == "end"
    assert next(e for e in events if e["type"] == "error")["code"] == "shutting_down"
    assert ws.close_code == 1001


async def test_idle_session_is_finalized_and_closed():
    engine = CountingEngine()
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0),
                                                   limits=LimitsSettings(idle_timeout_s=0.5))) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            await ws.send(speech_pcm(1.0))
            events = await collect(ws)
    kinds = [e["type"] for e in events]
    assert "final" in kinds and kinds[-1] == "end"
    assert any(e.get("code") == "idle_timeout" and e["fatal"] for e in events)
    assert ws.close_code == 1001


@pytest.mark.parametrize("where", ["limits", "session"])
async def test_session_length_limit_ends_the_stream_with_its_finals(where):
    # The bound works set in the limits section (what a user sets) or in the session settings.
    engine = CountingEngine()
    bound = {"limits": LimitsSettings(max_session_s=2.0)} if where == "limits" else {
        "session": SessionSettings(max_session_s=2.0)}
    settings = ServerSettings(network=NetworkSettings(port=0), **bound)
    async with StreamServer(engine, settings) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            for _ in range(10):
                await ws.send(speech_pcm(0.5))
            events = await collect(ws)
    assert any(e.get("code") == "session_limit" for e in events)
    assert [e["type"] for e in events if e["type"] in ("final", "end")] == ["final", "end"]
    assert ws.close_code == 1008


def test_per_session_bounds_set_differently_in_limits_and_session_are_refused():
    settings = ServerSettings(limits=LimitsSettings(max_frame_bytes=4096, max_utterance_s=12.0))
    assert (settings.session.max_frame_bytes, settings.session.limits.max_utterance_s) == (4096, 12.0)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        ServerSettings(limits=LimitsSettings(max_frame_bytes=4096), session=SessionSettings(max_frame_bytes=2048))


async def test_faster_than_real_time_audio_is_throttled_not_dropped():
    engine = CountingEngine()
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(realtime_factor=10.0), burst_s=0.5)
    async with StreamServer(engine, settings) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            await ws.recv()
            began = time.monotonic()
            for _ in range(40):
                await ws.send(speech_pcm(0.5))  # 20 s of audio as fast as the socket takes it
            await ws.send(json.dumps({"type": "stop"}))
            events = await collect(ws)
            elapsed = time.monotonic() - began
    # 20 s at 10x after a 0.5 s burst needs ≥ 1.5 s; unthrottled it takes a few hundredths.
    assert elapsed >= 1.4
    assert events[-1]["type"] == "end" and events[-1]["audio_seconds"] == pytest.approx(20.0, abs=0.01)


async def test_slow_reader_is_disconnected_with_a_reason():
    engine = CountingEngine()
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0), outbox_limit=5)) as server:
        # A client that stops reading: a tiny receive buffer, and websockets stops pulling from it
        # once one message is queued (max_queue=1).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        ws = await connect(server.url, sock=sock, max_queue=1)
        for connection in server._server.connections:  # and a tiny send buffer on the server side
            connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Each bad message is answered with an error event that this client never reads; enough of
        # them fill the socket buffers, then the server's bounded outbox.
        for _ in range(20000):
            await ws.send('{"type": "%s"}' % ("x" * 40))
        await wait_until(lambda: not server._sessions, "the server to give up on the slow reader")
        # The server has sent its close frame behind the unread events; reading them now reaches it.
        events = await collect(ws)
    assert events and all(e["type"] == "error" and e["code"] == "unknown_type" for e in events)
    assert len(events) < 20000  # the rest were never queued: the session was dropped
    assert (ws.close_code, ws.close_reason) == (1008, "client too slow: outgoing queue full")


async def test_partials_shed_under_overload_are_announced_once():
    engine = CountingEngine(delay=0.3)
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(realtime_factor=0),
                              worker=WorkerSettings(max_queue=1))
    async with StreamServer(engine, settings) as server:
        clients = [await connect(server.url) for _ in range(4)]
        for ws in clients:
            await ws.send(json.dumps({"type": "start", "partial_interval": 0.2}))
        for _ in range(6):
            for ws in clients:
                await ws.send(speech_pcm(0.25))
        for ws in clients:
            await ws.send(json.dumps({"type": "stop"}))
        results = await asyncio.gather(*[collect(ws, timeout=60) for ws in clients])
    # 1.5 s of audio per session: at most one announcement each (one per 10 s of audio), and some session
    # had partials shed (4 sessions, a queue of 1 and 0.3 s per batch).
    counts = [sum(e.get("code") == "overloaded" for e in events) for events in results]
    assert max(counts) == 1, counts
    assert all(not e["fatal"] for events in results for e in events if e.get("code") == "overloaded")
    # Nothing lost: each utterance still ends in a final (finals have reserved queue room).
    for events in results:
        started = {e["utterance_id"] for e in events if e["type"] == "speech_started"}
        finished = {e["utterance_id"] for e in events if e["type"] == "final"}
        assert started == finished and events[-1]["type"] == "end"


async def test_overload_is_announced_once_per_10_s_of_audio():
    """Every partial of a 25 s utterance is shed: the client hears of it at 0, 10 and 20 s of audio, 3 times."""
    engine = GatedEngine()
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(realtime_factor=0),
                              worker=WorkerSettings(max_queue=1))
    try:
        async with StreamServer(engine, settings) as server:
            # Both connect first: while the queue is full, new sessions are refused (HTTP 503).
            ws, filler = await connect(server.url), await connect(server.url)
            await ws.send(json.dumps({"type": "start", "partials": True, "partial_interval": 0.2,
                                      "vad": {"max_utterance_s": 30}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            # Fill the queue for the whole test: one final held by the engine, a second one queued.
            await filler.send(json.dumps({"type": "start", "partials": False}))
            await filler.send(speech_pcm(1.0))
            await filler.send(json.dumps({"type": "finalize"}))
            await asyncio.to_thread(engine.entered.wait, 30)
            assert engine.entered.is_set(), "the engine never received the first final"
            await filler.send(bytes(16000) + speech_pcm(1.0))
            await filler.send(json.dumps({"type": "finalize"}))
            await wait_until(lambda: server.worker.queue_depth == 1, "the second final to be queued")

            for _ in range(100):
                await ws.send(speech_pcm(0.25))  # 25 s of speech: about 120 partials asked for, all shed
            await ws.send(json.dumps({"type": "mark"}))  # answered once every frame before it was handled
            events = []
            while not (events and events[-1].get("code") == "unknown_type"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            engine.gate.set()
            await ws.send(json.dumps({"type": "stop"}))
            events += await collect(ws)
            await filler.send(json.dumps({"type": "stop"}))
            await collect(filler)
    finally:
        engine.gate.set()
    assert sum(e.get("code") == "overloaded" for e in events) == 3, [e.get("code") or e["type"] for e in events]
    assert [e["type"] for e in events if e["type"] in ("speech_started", "final", "end")] == [
        "speech_started", "final", "end"]
    assert not any(e["type"] == "partial" for e in events)


async def test_metrics_count_the_traffic_they_served():
    """After known traffic, each counter on /metrics holds what the clients saw, not just its name."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.server.test_server import http_get

    engine = CountingEngine()
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0),
                                                   limits=LimitsSettings(realtime_factor=0))) as server:
        async with connect(server.url) as first, connect(server.url) as second:
            await first.send(json.dumps({"type": "start", "partials": False}))
            await first.send(speech_pcm(1.0))
            await first.send(json.dumps({"type": "finalize"}))
            await first.send(bytes(32000) + speech_pcm(1.0))  # 1 s of silence, then a second utterance
            await first.send(json.dumps({"type": "stop"}))
            await second.send("{nope")
            await second.send(json.dumps({"type": "start", "partials": True, "partial_interval": 0.2}))
            await second.send(speech_pcm(1.0))
            seen = []
            while not any(e["type"] == "partial" for e in seen):  # still speaking when a partial is back
                seen.append(json.loads(await asyncio.wait_for(second.recv(), 30)))
            await second.send(speech_pcm(0.5))
            await second.send(json.dumps({"type": "stop"}))
            events = await collect(first) + seen + await collect(second)
        await wait_until(lambda: not server._sessions, "both sessions to be released")
        status, _, body = await http_get(server.port, "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    count = collections.Counter(e["type"] for e in events)
    assert count["final"] == 3 and count["partial"] >= 1
    assert value("granite_stream_sessions_total") == 2 and value("granite_stream_sessions_active") == 0
    assert value("granite_stream_audio_seconds_total") == pytest.approx(4.5)
    assert value("granite_stream_finals_total") == 3
    assert value("granite_stream_partials_total") == count["partial"]
    errors = {labels: v for (name, labels), v in samples.items() if name == "granite_stream_errors_total"}
    assert errors == {(("code", "bad_json"),): 1}
    ran = [r for batch in engine.batches for r in batch]
    kinds = collections.Counter(r.kind for r in ran)
    assert kinds["final"] == 3
    assert value("granite_stream_queue_events_total", event="batches") == len(engine.batches)
    assert (value("granite_stream_queue_events_total", event="submitted")
            - value("granite_stream_queue_events_total", event="replaced")) == len(ran)
    assert value("granite_stream_batch_size_count") == len(engine.batches)
    assert value("granite_stream_batch_size_sum") == len(ran)
    assert value("granite_stream_engine_seconds_count") == len(engine.batches)
    for kind in ("final", "partial"):
        assert value("granite_stream_inference_seconds_count", kind=kind) == kinds[kind], kind
    assert value("granite_stream_queue_depth") == 0


async def test_engine_failure_fails_only_that_utterance():
    engine = CountingEngine(fail_on={0})
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            await ws.send(speech_pcm(1.0))
            await ws.send(json.dumps({"type": "finalize"}))
            await ws.send(bytes(32000))
            await ws.send(speech_pcm(1.0))
            await ws.send(json.dumps({"type": "stop"}))
            events = await collect(ws)
    error = next(e for e in events if e["type"] == "error")
    assert error["utterance_id"] == 0 and error["code"] == "internal"
    assert [e["utterance_id"] for e in events if e["type"] == "final"] == [1]
    assert events[-1] == {"type": "end", "utterances": 2, "audio_seconds": 3.0}


@pytest.mark.parametrize("how", ["header", "token-scheme", "query", "subprotocol"])
async def test_api_key_accepted_three_ways(how):
    settings = ServerSettings(network=NetworkSettings(port=0), access=AccessPolicy(api_keys=frozenset({KEY})))
    async with StreamServer(CountingEngine(), settings) as server:
        url, kwargs = server.url, {}
        if how == "header":
            kwargs["additional_headers"] = {"Authorization": f"Bearer {KEY}"}
        elif how == "token-scheme":
            kwargs["additional_headers"] = {"Authorization": f"Token {KEY}"}
        elif how == "query":
            url += f"?token={KEY}"
        else:
            kwargs["subprotocols"] = ["granite-stream", f"token.{KEY}"]
        async with connect(url, **kwargs) as ws:
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            if how == "subprotocol":
                assert ws.subprotocol == "granite-stream"


async def test_missing_or_wrong_key_and_foreign_origin_are_refused():
    policy = AccessPolicy(api_keys=frozenset({KEY}), allowed_origins=frozenset({"https://captions.example"}))
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0), access=policy)) as server:
        for kwargs, status, fragment in [
            ({}, 401, b"API key is required"),
            ({"additional_headers": {"Authorization": "Bearer wrong-key-0123456789"}}, 403, b"not valid"),
            ({"additional_headers": {"Authorization": f"Bearer {KEY}"}, "origin": "https://evil.example"}, 403, b"origin"),
        ]:
            with pytest.raises(InvalidStatus) as info:
                async with connect(server.url, **kwargs):
                    pass
            assert info.value.response.status_code == status and fragment in info.value.response.body
        async with connect(server.url, origin="https://captions.example",
                           additional_headers={"Authorization": f"Bearer {KEY}"}):
            pass


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (HTTP clients normalise paths such as ``/../x``); returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_static_files_never_leave_the_web_root(tmp_path):
    web, secret = tmp_path / "web", b"top secret " + KEY.encode()
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>demo</title>")
    (tmp_path / "secret.txt").write_bytes(secret)
    (web / "leak.txt").symlink_to(tmp_path / "secret.txt")  # a file link out of the root
    (web / "out").symlink_to(tmp_path, target_is_directory=True)  # a folder link out of the root
    (web / "alias.html").symlink_to(web / "index.html")  # a link that stays inside is fine
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0), web_root=web)) as server:
        status, body = await raw_get(server.port, "/alias.html")
        assert status == 200 and b"demo" in body
        for target in ("/../secret.txt", "/./../secret.txt", "/web/../../secret.txt", "/leak.txt", "/out/secret.txt",
                       "/out/web/leak.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt"):
            status, body = await raw_get(server.port, target)
            assert status == 404 and secret not in body, (target, status, body[:80])


async def test_per_ip_session_limit():
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0),
                                                             limits=LimitsSettings(max_sessions_per_ip=2))) as server:
        first, second = await connect(server.url), await connect(server.url)
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url):
                pass
        assert info.value.response.status_code == 429
        await first.close()
        await wait_until(lambda: len(server._sessions) < 2, "the closed session to be released")
        async with connect(server.url):
            pass
        await second.close()


async def test_tls_with_a_self_signed_certificate(self_signed):
    cert, key = self_signed
    settings = ServerSettings(network=NetworkSettings(port=0),
                              security=SecuritySettings(certfile=str(cert), keyfile=str(key)))
    async with StreamServer(CountingEngine(), settings) as server:
        assert server.url.startswith("wss://")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        async with connect(server.url, ssl=client_ctx) as ws:
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(server.url, ssl=ssl.create_default_context()):
                pass


async def test_transcripts_are_not_logged_unless_enabled(caplog):
    caplog.set_level("INFO")
    for enabled in (False, True):
        settings = ServerSettings(network=NetworkSettings(port=0), logging=LoggingSettings(log_transcripts=enabled))
        async with StreamServer(CountingEngine(), settings) as server:
            async with connect(server.url) as ws:
                await ws.send(json.dumps({"type": "start", "partials": False}))
                await ws.send(speech_pcm(1.2))
                await ws.send(json.dumps({"type": "stop"}))
                await collect(ws)
        logged = "w0 w1" in caplog.text
        assert logged is enabled


async def test_pool_of_two_workers_behind_one_server_and_readyz_reports_them():
    from stream_server.inference.worker import InferenceWorker, WorkerPool

    engines = [CountingEngine(), CountingEngine()]
    pool = WorkerPool([InferenceWorker(e) for e in engines])
    async with StreamServer(engines[0], ServerSettings(network=NetworkSettings(port=0)), worker=pool) as server:
        async def one():
            async with connect(server.url) as ws:
                await ws.send(json.dumps({"type": "start", "partials": False}))
                await ws.send(speech_pcm(1.0))
                await ws.send(json.dumps({"type": "stop"}))
                return await collect(ws)

        results = await asyncio.gather(one(), one())
        from tests.server.test_server import http_get

        status, _, body = await http_get(server.port, "/readyz")
        metrics = (await http_get(server.port, "/metrics"))[2].decode()
    assert all(any(e["type"] == "final" for e in events) for events in results)
    assert all(engine.batches for engine in engines), "both workers served a session"
    assert status == 200 and len(json.loads(body)["workers"]) == 2
    assert "granite_stream_worker_restarts_total 0.0" in metrics
