"""Each adapter end to end: the real server, Whisper tiny.en, real speech, and the official SDK clients.

* OpenAI Realtime (transcription): the ``openai`` SDK's ``client.realtime.connect``.
* Deepgram: the ``deepgram-sdk`` ``AsyncDeepgramClient.listen.v1.connect``, pointed at the server
  with a custom environment (no network needed), two call legs as a stereo μ-law stream with
  ``multichannel=true``.
* Twilio Media Streams: no official client exists for Twilio's side of the socket (Twilio itself is
  the client); a client written from the published message shapes plays Twilio.
* Native protocol v1 with ``"multichannel": true``.

Clips are streamed faster than real time (``PACE``) to keep the suite short; the server still sees
audio frame by frame, as from a live source.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re

import jiwer
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect

from granite_stream_testing.datasets import read_audio
from stream_server.core.audio import encode_mulaw
from stream_server.adapters import ROUTES
from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer

pytestmark = [pytest.mark.slow,
              # The Deepgram SDK imports websockets' deprecated legacy client.
              pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:websockets.exceptions.InvalidStatusCode is deprecated:DeprecationWarning")]

PACE = 2.0


def normalize(text: str) -> str:
    text = re.sub(r"[\[(][^\])]*[\])]", " ", text.lower())
    text = re.sub(r"\b10\b", "ten", text)
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text).split())


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalize(reference), normalize(hypothesis))


def clip(clips, name):
    return next(c for c in clips if c.id.endswith("/" + name))


def padded(audio: np.ndarray, rate: int, lead_s: float, total_s: float) -> np.ndarray:
    out = np.zeros(int(total_s * rate), np.float32)
    start = int(lead_s * rate)
    out[start : start + len(audio)] = audio[: len(out) - start]
    return out


async def paced(chunks, seconds_each: float, send):
    loop = asyncio.get_running_loop()
    began = loop.time()
    for i, chunk in enumerate(chunks):
        await send(chunk)
        await asyncio.sleep(max(0.0, began + (i + 1) * seconds_each / PACE - loop.time()))


async def test_openai_sdk_transcription_session_with_real_speech(whisper_engine, goforward):
    from openai import AsyncOpenAI

    audio, rate = read_audio(goforward)
    audio24 = soxr.resample(audio, rate, 24000).astype(np.float32)
    pcm = (np.clip(padded(audio24, 24000, 0.3, len(audio24) / 24000 + 1.3), -1, 1) * 32767).astype("<i2").tobytes()
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        client = AsyncOpenAI(api_key="sk-local", base_url=f"http://127.0.0.1:{server.port}/v1",
                             websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.type == "transcription"
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1", "language": "en", "prompt": "forward"},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}}}})
            updated = await conn.recv()
            assert updated.type == "session.updated"
            events = []

            async def reader():
                async for event in conn:
                    events.append(event)
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        return

            reading = asyncio.create_task(reader())
            step = 4800  # 100 ms of 24 kHz pcm16
            await paced([pcm[i : i + step] for i in range(0, len(pcm), step)], 0.1,
                        lambda c: conn.input_audio_buffer.append(audio=base64.b64encode(c).decode()))
            await asyncio.wait_for(reading, 30)
    kinds = [e.type for e in events if not e.type.endswith(".delta")]
    assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"]
    completed = events[-1]
    deltas = [e.delta for e in events if e.type.endswith(".delta")]
    assert "".join(deltas) == completed.transcript
    print("OpenAI transcript:", completed.transcript, "| deltas:", deltas)
    assert wer(goforward.text, completed.transcript) <= 0.25
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert events[0].audio_start_ms <= 700 and 2500 <= stopped.audio_end_ms <= 3600
    assert stopped.item_id == events[0].item_id == completed.item_id


async def test_deepgram_sdk_two_call_legs_multichannel_with_real_speech(whisper_engine, asterisk_en_dev):
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    agent, customer = clip(asterisk_en_dev, "tt-weasels"), clip(asterisk_en_dev, "vm-tempgreetactive")
    a, rate = read_audio(agent)
    b, _ = read_audio(customer)
    total = 0.3 + len(a) / rate + 0.5 + len(b) / rate + 1.2
    left, right = padded(a, rate, 0.3, total), padded(b, rate, 0.3 + len(a) / rate + 0.5, total)
    stereo = encode_mulaw(np.stack([left, right], axis=1).reshape(-1))  # interleaved μ-law, 8 kHz
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        base = f"127.0.0.1:{server.port}"
        client = AsyncDeepgramClient(api_key="local", environment=DeepgramClientEnvironment(
            base=f"http://{base}", production=f"ws://{base}/deepgram", agent=f"ws://{base}", agent_rest=f"http://{base}"))
        messages = []
        async with client.listen.v1.connect(model="nova-3", encoding="mulaw", sample_rate="8000", channels="2",
                                            multichannel="true", interim_results="true", vad_events="true",
                                            utterance_end_ms="1000", language="en-US", smart_format="true") as conn:
            async def reader():
                async for message in conn:
                    messages.append(message)

            reading = asyncio.create_task(reader())
            step = 1600  # 100 ms of stereo μ-law
            await paced([stereo[i : i + step] for i in range(0, len(stereo), step)], 0.1, conn.send_media)
            await conn.send_close_stream()
            await asyncio.wait_for(reading, 30)
    names = [type(m).__name__ for m in messages]
    assert names[-1] == "ListenV1Metadata" and messages[-1].channels == 2
    finals = [m for m in messages if names[messages.index(m)] == "ListenV1Results" and m.is_final]
    text = {ch: " ".join(m.channel.alternatives[0].transcript for m in finals if m.channel_index[0] == ch)
            for ch in (0, 1)}
    print("Deepgram channel 0:", text[0], "| channel 1:", text[1])
    assert wer(agent.text, text[0]) <= 0.3 and wer(customer.text, text[1]) <= 0.3
    assert all(m.channel_index[1] == 2 for m in finals)
    assert any(type(m).__name__ == "ListenV1Results" and not m.is_final for m in messages)
    started = {m.channel[0]: m.timestamp for m in messages if type(m).__name__ == "ListenV1SpeechStarted"}
    assert started[0] < 1.0 and started[1] > len(a) / rate
    assert "ListenV1UtteranceEnd" in names


async def test_twilio_call_with_two_tracks_real_speech(whisper_engine, asterisk_en_dev):
    caller, agent = clip(asterisk_en_dev, "conf-getchannel"), clip(asterisk_en_dev, "vm-sorry")
    a, rate = read_audio(caller)
    b, _ = read_audio(agent)
    total = 0.3 + len(a) / rate + 0.4 + len(b) / rate + 1.0
    tracks = {"inbound": encode_mulaw(padded(a, rate, 0.3, total)),
              "outbound": encode_mulaw(padded(b, rate, 0.3 + len(a) / rate + 0.4, total))}
    messages = []
    for i in range(0, len(tracks["inbound"]), 160):  # 20 ms per media message, both legs interleaved
        for track, data in tracks.items():
            messages.append(json.dumps({"event": "media", "sequenceNumber": str(len(messages) + 3),
                                        "streamSid": "MZ00000000000000000000000000000001",
                                        "media": {"track": track, "chunk": str(i // 160 + 1), "timestamp": str(i // 8),
                                                  "payload": base64.b64encode(data[i : i + 160]).decode()}}))
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "sequenceNumber": "2", "streamSid": "MZ00000000000000000000000000000001",
                                      "start": {"accountSid": "AC0", "streamSid": "MZ00000000000000000000000000000001",
                                                "callSid": "CA00000000000000000000000000000001",
                                                "tracks": ["inbound", "outbound"],
                                                "customParameters": {"language": "en"},
                                                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                                "channels": 1}}}))
            events = []

            async def reader():
                async for message in ws:
                    events.append(json.loads(message))

            reading = asyncio.create_task(reader())
            await paced([messages[i : i + 10] for i in range(0, len(messages), 10)], 0.1,
                        lambda batch: asyncio.gather(*[ws.send(m) for m in batch]))
            await ws.send(json.dumps({"event": "stop", "sequenceNumber": str(len(messages) + 3),
                                      "streamSid": "MZ00000000000000000000000000000001",
                                      "stop": {"accountSid": "AC0", "callSid": "CA00000000000000000000000000000001"}}))
            await asyncio.wait_for(reading, 30)
        assert ws.close_code == 1000
    finals = [e for e in events if e["event"] == "transcript" and e["is_final"]]
    text = {t: " ".join(e["text"] for e in finals if e["track"] == t) for t in ("inbound", "outbound")}
    print("Twilio inbound:", text["inbound"], "| outbound:", text["outbound"])
    assert wer(caller.text, text["inbound"]) <= 0.3 and wer(agent.text, text["outbound"]) <= 0.3
    assert all(e["callSid"] == "CA00000000000000000000000000000001" for e in events)
    assert events[-1]["event"] == "end" and set(events[-1]["tracks"]) == {"inbound", "outbound"}


async def test_native_multichannel_agent_and_customer_with_real_speech(whisper_engine, asterisk_en_dev, goforward):
    first, second = clip(asterisk_en_dev, "vm-undelete"), goforward
    a, rate_a = read_audio(first)
    a = soxr.resample(a, rate_a, 16000).astype(np.float32)
    b, _ = read_audio(second)
    total = 0.3 + len(a) / 16000 + 0.3 + len(b) / 16000 + 1.0
    left, right = padded(a, 16000, 0.3, total), padded(b, 16000, 0.6 + len(a) / 16000, total)
    pcm = (np.clip(np.stack([left, right], axis=1).reshape(-1), -1, 1) * 32767).astype("<i2").tobytes()
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "multichannel": True, "language": "en",
                                      "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 2}}))
            ready = json.loads(await ws.recv())
            assert ready["config"]["multichannel"] is True and ready["config"]["audio"]["channels"] == 2
            events = []

            async def reader():
                async for message in ws:
                    events.append(json.loads(message))

            reading = asyncio.create_task(reader())
            step = 6400  # 100 ms of stereo pcm16
            await paced([pcm[i : i + step] for i in range(0, len(pcm), step)], 0.1, ws.send)
            await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(reading, 30)
    assert all("channel" in e for e in events if e["type"] in ("speech_started", "partial", "final"))
    finals = [e for e in events if e["type"] == "final"]
    text = {ch: " ".join(e["text"] for e in finals if e["channel"] == ch) for ch in (0, 1)}
    print("native channel 0:", text[0], "| channel 1:", text[1])
    assert wer(first.text, text[0]) <= 0.3 and wer(second.text, text[1]) <= 0.3
    assert events[-1] == {"type": "end", "utterances": len(finals), "audio_seconds": pytest.approx(total, abs=0.05)}
