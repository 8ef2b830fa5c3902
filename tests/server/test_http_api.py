"""OpenAI-compatible file transcription (POST /v1/audio/…) through the official ``openai`` SDK, on
the WebSocket server's own port: both endpoints, limits, auth, drain, TLS, and the WebSocket and GET
routes served alongside (fake engine: the text does not matter here)."""

import asyncio
import io
import json
import ssl
import wave

import httpx
import numpy as np
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stream_server.server.auth import AccessPolicy, SecuritySettings
from stream_server.cli import server_settings
from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
from stream_server.settings import load_config
from tests.fakes import CountingEngine, GatedEngine
from tests.server.test_server import http_get
from tests.vad.test_vad import voiced

KEY = "k" * 8 + "0123456789abcdef"
SR = 16000


def wav_bytes(audio: np.ndarray, rate: int = SR) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def read_wav(path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == SR and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def flac_bytes(audio: np.ndarray) -> bytes:
    """``audio`` encoded as FLAC by PyAV (a compressed container, decoded by the server)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray((np.clip(audio, -1, 1) * 32767).astype("<i2")[None, :], format="s16",
                                           layout="mono")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def client(server: StreamServer, key: str = "unused", **kw) -> openai.AsyncOpenAI:
    scheme = "https" if server.settings.security.cert_path else "http"
    kw.setdefault("timeout", 60.0)  # a request that hangs fails its test (the SDK's default is 600 s)
    return openai.AsyncOpenAI(base_url=f"{scheme}://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, **kw)


def speech(seconds: float) -> np.ndarray:
    """Voiced sound (the fake engine "recognises" one word per 0.4 s of an utterance)."""
    return voiced(seconds)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


async def test_translations_run_the_translate_task():
    # The fake engine translates fr → en as upper-case words; a transcription gives lower case.
    audio = wav_bytes(np.concatenate([silence(0.3), speech(2.0), silence(1.0)]))
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0))) as server:
        api = client(server)
        translated = await api.audio.translations.create(file=("a.wav", audio), model="m", response_format="verbose_json",
                                                         extra_body={"language": "fr"})
        assert translated.model_extra["task"] == "translate" and translated.text.startswith("W0 W1")
        transcribed = await api.audio.transcriptions.create(file=("a.wav", audio), model="m", language="fr")
        assert transcribed.text.startswith("w0 w1")
        raw = await api.audio.translations.with_raw_response.create(file=("a.wav", audio), model="my-model",
                                                                    extra_body={"language": "fr"})
        assert raw.headers["openai-model"] == "my-model"


# ---- auth, limits, bad input ----------------------------------------------------------------------


async def test_api_keys_are_required_as_for_streams():
    audio = wav_bytes(np.concatenate([silence(0.3), speech(1.0), silence(1.0)]))
    settings = ServerSettings(network=NetworkSettings(port=0), access=AccessPolicy(api_keys=frozenset({KEY})))
    async with StreamServer(CountingEngine(), settings) as server:
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client(server, "wrong-key-0123456789").audio.transcriptions.create(file=("a.wav", audio), model="m")
        assert info.value.status_code == 403 and info.value.body["message"] == "the API key is not valid"
        async with httpx.AsyncClient() as http:
            response = await http.post(f"http://127.0.0.1:{server.port}/v1/audio/transcriptions",
                                       files={"file": ("a.wav", audio)}, data={"model": "m"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        result = await client(server, KEY).audio.transcriptions.create(file=("a.wav", audio), model="m")
        assert result.text.startswith("w0")


async def test_too_large_too_long_and_undecodable_uploads_are_refused():
    # The limits as an operator sets them (flags/env/TOML through the settings object).
    settings = server_settings(load_config({"port": "0", "max_upload_bytes": "65536", "max_upload_audio_s": "1.5"}, {}))
    async with StreamServer(CountingEngine(), settings) as server:
        api = client(server)
        # 2 MB against a 64 KiB limit: refused from Content-Length, and the answer arrives (the
        # unread upload is drained, not reset).
        with pytest.raises(openai.APIStatusError) as info:
            await api.audio.transcriptions.create(file=("big.wav", wav_bytes(speech(64.0))), model="m")
        assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
        # Under the byte limit but 1.8 s of audio, over the 1.5 s limit.
        with pytest.raises(openai.APIStatusError) as info:
            await api.audio.transcriptions.create(file=("long.wav", wav_bytes(speech(1.8))), model="m")
        assert info.value.status_code == 413 and info.value.body["code"] == "audio_too_long"
        with pytest.raises(openai.APIStatusError) as info:
            await api.audio.transcriptions.create(file=("notes.txt", b"these are not audio bytes " * 50), model="m")
        assert info.value.status_code == 415 and info.value.body["code"] == "unsupported_audio"
        with pytest.raises(openai.BadRequestError) as info:
            await api.audio.transcriptions.create(file=("a.wav", wav_bytes(speech(1.0))), model="m",
                                                  response_format="xml")
        assert info.value.body["param"] == "response_format"
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{server.port}"
            missing = await http.post(f"{base}/v1/audio/transcriptions", data={"model": "m"},
                                      files={"other": ("x", b"1")})
            not_form = await http.post(f"{base}/v1/audio/transcriptions", content=b"{}",
                                       headers={"Content-Type": "application/json"})
            elsewhere = await http.post(f"{base}/v1/listen", content=b"x")
            put = await http.put(f"{base}/v1/audio/transcriptions", content=b"x")
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
        assert not_form.status_code == 400
        assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "not_found"
        assert put.status_code == 405 and put.headers["allow"] == "POST"
        assert not server._sessions


async def test_an_upload_trickled_past_upload_timeout_gets_408_and_frees_its_slot():
    # A client sends a byte every 50 ms (well inside idle_timeout_s, so the stall bound never fires)
    # of a body it declared 100 kB long: the total bound ends it with 408 upload_timeout, the slot
    # it held is free again, and the refusal is counted as the other statuses are.
    settings = ServerSettings(network=NetworkSettings(port=0),
                              limits=LimitsSettings(idle_timeout_s=0.4, upload_timeout_s=0.6))
    boundary = "b0undary"
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    async with StreamServer(CountingEngine(), settings) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def trickle() -> None:
            writer.write(head + f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n".encode())
            for _ in range(200):  # 10 s at most: without the bound the idle timeout would answer after it
                await asyncio.sleep(0.05)
                writer.write(b"\0")

        trickling = asyncio.create_task(trickle())
        try:
            await wait_until(lambda: len(server._sessions) == 1)  # the upload holds a slot while it arrives
            began = asyncio.get_running_loop().time()
            answer = await asyncio.wait_for(reader.read(), timeout=15)  # the server half-closes after its answer
            took = asyncio.get_running_loop().time() - began
        finally:
            trickling.cancel()
            writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert status_line == b"HTTP/1.1 408 Request Timeout", answer
        assert body["error"]["code"] == "upload_timeout" and body["error"]["param"] == "file"
        assert took < settings.limits.upload_timeout_s + 1.0
        assert not server._sessions
        assert server.metrics.registry.get_sample_value(
            "granite_stream_http_requests_total", {"endpoint": "transcriptions", "status": "408"}) == 1.0


# ---- the same port, the same slots -----------------------------------------------------------------


async def wait_until(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_websocket_and_get_routes_are_served_while_a_file_is_transcribed():
    engine = GatedEngine()
    audio = wav_bytes(np.concatenate([silence(0.3), speech(2.0), silence(1.0)]))
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0),
                                                   limits=LimitsSettings(max_sessions=2))) as server:
        request = asyncio.create_task(client(server).audio.transcriptions.create(file=("a.wav", audio), model="m"))
        await wait_until(engine.entered.is_set)  # the file's final is in the engine, held
        assert len(server._sessions) == 1  # the file request holds a session slot
        status, _, body = await http_get(server.port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "partials": False}))
            assert json.loads(await ws.recv())["type"] == "ready"
            # Both slots are taken now: a third session, stream or file, is refused.
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.url):
                    pass
            assert refused.value.response.status_code == 503
            with pytest.raises(openai.InternalServerError) as info:
                await client(server).audio.transcriptions.create(file=("a.wav", audio), model="m")
            assert info.value.status_code == 503 and info.value.body["code"] == "overloaded"
            engine.gate.set()
            await ws.send((np.concatenate([speech(1.2), silence(0.1)]) * 32767).astype("<i2").tobytes())
            await ws.send(json.dumps({"type": "stop"}))
            events = [json.loads(m) async for m in ws]
        assert [e["text"] for e in events if e["type"] == "final"] == ["w0 w1 w2"]
        assert (await request).text.startswith("w0 w1 w2 w3")
        await wait_until(lambda: not server._sessions)


async def test_drain_answers_an_open_file_request_503():
    engine = GatedEngine()
    audio = wav_bytes(np.concatenate([silence(0.3), speech(2.0), silence(1.0), speech(2.0), silence(1.0)]))
    server = StreamServer(engine, ServerSettings(network=NetworkSettings(port=0)))
    await server.start()
    try:
        request = asyncio.create_task(client(server).audio.transcriptions.create(file=("a.wav", audio), model="m"))
        await wait_until(engine.entered.is_set)
        draining = asyncio.create_task(server.drain(deadline_s=10))
        await asyncio.sleep(0.2)
        with pytest.raises(openai.InternalServerError) as refused:  # a new request while draining
            await client(server).audio.transcriptions.create(file=("a.wav", audio), model="m")
        assert refused.value.status_code == 503 and refused.value.body["code"] == "shutting_down"
        engine.gate.set()
        with pytest.raises(openai.InternalServerError) as info:
            await request
        assert info.value.status_code == 503 and info.value.body["code"] == "shutting_down"
        assert await draining == 0
    finally:
        engine.gate.set()
        await server.close()


async def test_https_with_tls_serves_files_and_websockets(self_signed):
    cert, key = self_signed
    context = ssl.create_default_context(cafile=str(cert))
    audio = wav_bytes(np.concatenate([silence(0.3), speech(1.2), silence(1.0)]))
    tls = SecuritySettings(certfile=str(cert), keyfile=str(key))
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0), security=tls)) as server:
        async with httpx.AsyncClient(verify=context) as http:
            result = await client(server, http_client=http).audio.transcriptions.create(file=("a.wav", audio),
                                                                                         model="m")
        assert result.text.startswith("w0 w1 w2")
        async with connect(server.url, ssl=context) as ws:
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
