"""The real server on loopback, driven by a real `websockets` client, with real speech and Whisper tiny.en."""

import asyncio
import json
import re
import urllib.error
import urllib.request

import jiwer
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from granite_stream_testing.datasets import read_audio
from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
from tests.fakes import CountingEngine

pytestmark = pytest.mark.slow

FRAME_S = 0.1


def normalize(text: str) -> str:
    text = re.sub(r"[\[(][^\])]*[\])]", " ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text).split())


async def stream_clip(url, audio, rate, pace=1.0, lead_s=0.3, tail_s=1.0, timeout=60, **start_fields):
    """Stream one clip like a live client: start, frames at real-time pace, stop; return all events."""
    silence = np.zeros(int(rate * lead_s), np.float32)
    signal = np.concatenate([silence, audio, np.zeros(int(rate * tail_s), np.float32)])
    data = (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(rate * FRAME_S) * 2
    events = []
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm_s16le", "sample_rate": rate},
                                  **start_fields}))

        async def reader():
            async for message in ws:
                events.append(json.loads(message))

        reading = asyncio.create_task(reader())
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i, offset in enumerate(range(0, len(data), step)):
            await ws.send(data[offset : offset + step])
            await asyncio.sleep(max(0.0, began + (i + 1) * FRAME_S / pace - loop.time()))
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reading, timeout)
        assert ws.close_code == 1000
    return events


def _http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


async def http_get(port, path):
    # urllib blocks; the server under test shares this event loop, so ask from a thread.
    return await asyncio.to_thread(_http_get, port, path)


async def test_real_speech_streams_concurrently_with_low_wer(whisper_engine, asterisk_en_dev, librivox_clips):
    # Three phone prompts (8 kHz) and one LibriVox clip (16 kHz), streamed at the same time in real time.
    phone = sorted(asterisk_en_dev, key=lambda c: abs(read_audio(c)[0].size / c.sample_rate - 5.0))[:3]
    clips = phone + librivox_clips[:1]
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        results = await asyncio.gather(
            *[stream_clip(server.url, *read_audio(c), language="en") for c in clips]
        )
        status, _, body = (await http_get(server.port, "/metrics"))
        assert status == 200 and b"granite_stream_finals_total" in body
    submitted = re.search(rb'^granite_stream_queue_events_total\{event="submitted"\} (\S+)$', body, re.M)
    finals_total = re.search(rb"^granite_stream_finals_total (\S+)$", body, re.M)
    finals_sent = sum(e["type"] == "final" for events in results for e in events)
    assert submitted and float(submitted.group(1)) >= finals_sent > 0  # every final went through the queue
    assert finals_total and float(finals_total.group(1)) == finals_sent
    references, hypotheses = [], []
    for clip, events in zip(clips, results):
        kinds = [e["type"] for e in events]
        assert kinds[0] == "ready" and kinds[-1] == "end", kinds
        assert "error" not in kinds
        finals = [e for e in events if e["type"] == "final"]
        assert finals and events[-1]["utterances"] == len(finals)
        assert all(f["task"] == "transcribe" and f["language"] == "en" for f in finals)
        references.append(normalize(clip.text))
        hypotheses.append(normalize(" ".join(f["text"] for f in finals)))
        for p in (e for e in events if e["type"] == "partial"):
            assert p["text"].startswith(p["stable_text"])
    wer = jiwer.wer(references, hypotheses)
    print(f"streamed WER over {len(clips)} real clips: {wer:.3f}")
    for ref, hyp in zip(references, hypotheses):
        print(f"  REF: {ref}\n  HYP: {hyp}")
    assert wer < 0.15
    assert any(e["type"] == "partial" for events in results for e in events)


async def test_vanished_client_leaves_server_healthy(whisper_engine, librivox_clips):
    audio, rate = read_audio(librivox_clips[0])
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        ws = await connect(server.url)
        await ws.send(json.dumps({"type": "start"}))
        pcm = (audio[: rate * 3] * 32767).astype("<i2").tobytes()
        for offset in range(0, len(pcm), 3200):
            await ws.send(pcm[offset : offset + 3200])
        ws.transport.abort()  # mid-utterance, no close handshake
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20  # bounded, not a guess at how long a loaded machine needs
        while server._sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert not server._sessions, "the vanished session was not released"
        assert (await http_get(server.port, "/healthz"))[0] == 200
        events = await stream_clip(server.url, audio[: rate * 3], rate, pace=4.0)
        assert any(e["type"] == "final" and e["text"] for e in events)
        assert server.worker.queue_depth == 0


async def test_protocol_errors_over_the_socket_keep_the_session():
    engine = CountingEngine()
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        async with connect(server.url) as ws:
            await ws.send(b"\x00\x00")
            assert json.loads(await ws.recv())["code"] == "not_started"
            await ws.send("{nope")
            assert json.loads(await ws.recv())["code"] == "bad_json"
            await ws.send(json.dumps({"type": "start", "audio": {"sample_rate": 1}}))
            assert json.loads(await ws.recv())["code"] == "bad_config"
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "stop"}))
            end = json.loads(await ws.recv())
            assert end == {"type": "end", "utterances": 0, "audio_seconds": 0.0}
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1000


async def test_http_endpoints_and_static_files_are_safe(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>demo</title>")
    (tmp_path / "app.js").write_text("export {}")
    (tmp_path.parent / "secret.txt").write_text("secret")
    engine = CountingEngine()
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0),
                                                   limits=LimitsSettings(max_sessions=1), web_root=tmp_path)) as server:
        status, headers, body = (await http_get(server.port, "/"))
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"demo" in body
        assert (await http_get(server.port, "/app.js"))[1]["Content-Type"].startswith(("text/javascript", "application/javascript"))
        assert (await http_get(server.port, "/../secret.txt"))[0] == 404
        assert (await http_get(server.port, "/%2e%2e/secret.txt"))[0] == 404
        assert (await http_get(server.port, "/healthz"))[0] == 200
        status, _, body = (await http_get(server.port, "/readyz"))
        assert status == 200 and json.loads(body)["engine"]["name"] == "fake"
        async with connect(server.url):
            with pytest.raises(InvalidStatus) as info:
                async with connect(server.url):
                    pass
            assert info.value.response.status_code == 503
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{server.port}/elsewhere"):
                pass
        assert info.value.response.status_code == 404
