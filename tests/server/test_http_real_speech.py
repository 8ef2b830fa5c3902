"""POST /v1/audio/transcriptions with the official ``openai`` SDK, the real Whisper tiny.en engine and
real speech (LibriVox clips from the dev data, uploaded as a user would: a WAV file, a FLAC file).

Every request here runs under a client timeout and ``asyncio.timeout``: a request that hangs fails
the test instead of hanging the run. The synchronous ``openai.OpenAI`` client must run in a thread
(``asyncio.to_thread``): called on the event loop that also runs the in-process server, it blocks
the server it waits for, and with the SDK's defaults (600 s timeout, 2 retries) the test hangs for
half an hour. That is how a first version of this test hung; the server is not at fault.
"""

import asyncio
import re
import wave
from pathlib import Path

import numpy as np
import openai
import pytest

from stream_server.core.captions import MAX_CUE_S, MAX_LINE_CHARS, MAX_LINES
from stream_server.inference.types import InferenceRequest
from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer
from tests.server.test_http_api import flac_bytes, read_wav

SR = 16000
REQUEST_TIMEOUT_S = 120.0

pytestmark = pytest.mark.slow


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = words_of(reference), words_of(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


@pytest.fixture(scope="module")
def recording(librivox_wav_paths: list[Path]) -> np.ndarray:
    """Three LibriVox clips with a second of silence around each: one file of several utterances."""
    gap = np.zeros(SR, np.float32)
    parts = [gap]
    for path in librivox_wav_paths[:3]:
        parts += [read_wav(path), gap]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def offline_text(whisper_engine, librivox_wav_paths: list[Path]) -> str:
    """The same clips decoded offline, each as one utterance."""
    texts = [whisper_engine.transcribe_batch([InferenceRequest("offline", i, "final", read_wav(p))])[0].text
             for i, p in enumerate(librivox_wav_paths[:3])]
    return " ".join(texts)


def client(server: StreamServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                              timeout=REQUEST_TIMEOUT_S)


async def test_verbose_json_of_a_real_recording_matches_the_offline_decode(whisper_engine, recording, offline_text,
                                                                         tmp_path):
    path = tmp_path / "meeting.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(recording, -1, 1) * 32767).astype("<i2").tobytes())
    duration = len(recording) / SR
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        # The synchronous SDK client and an open file, as a user's script uploads (in a thread: see above).
        sync = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                             timeout=REQUEST_TIMEOUT_S)
        async with asyncio.timeout(REQUEST_TIMEOUT_S + 10):
            with path.open("rb") as upload:
                result = await asyncio.to_thread(
                    sync.audio.transcriptions.create, file=upload, model="whisper-tiny.en",
                    response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert wer(offline_text, result.text) <= 0.1, (offline_text, result.text)
    assert abs(result.duration - duration) < 0.01
    words = result.words or []
    assert words and " ".join(w.word for w in words) == " ".join(s.text for s in result.segments or [])
    assert words_of(" ".join(w.word for w in words)) == words_of(result.text)
    for before, after in zip(words, words[1:]):
        assert before.start <= before.end <= after.start + 1e-6, (before, after)
    assert 0.0 <= words[0].start and words[-1].end <= duration + 1e-6
    assert all(0.0 < w.model_extra["confidence"] <= 1.0 for w in words)
    segments = result.segments or []
    assert len(segments) >= 3  # one per clip at least: the VAD cut the file at the silences
    for segment in segments:
        inside = [w for w in words if segment.start - 1e-6 <= w.start and w.end <= segment.end + 1e-6]
        assert " ".join(w.word for w in inside) == segment.text


def parse_cues(body: str, separator: str) -> list[tuple[float, float, list[str]]]:
    def seconds(stamp: str) -> float:
        h, m, s = stamp.replace(",", ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    cues = []
    for block in body.strip().split("\n\n"):
        lines = block.splitlines()
        timing = next(i for i, line in enumerate(lines) if " --> " in line)
        start, end = lines[timing].split(" --> ")
        cues.append((seconds(start), seconds(end.split()[0]), lines[timing + 1:]))
    return cues


async def test_srt_and_vtt_of_a_real_recording_obey_the_caption_limits(whisper_engine, recording, offline_text):
    audio = flac_bytes(recording)
    async with StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        api = client(server)
        async with asyncio.timeout(2 * REQUEST_TIMEOUT_S + 10):
            srt = await api.audio.transcriptions.create(file=("meeting.flac", audio), model="m", response_format="srt")
            vtt = await api.audio.transcriptions.create(file=("meeting.flac", audio), model="m", response_format="vtt")
    assert vtt.startswith("WEBVTT")
    for body, separator in ((srt, ","), (vtt.split("\n\n", 1)[1], ".")):
        cues = parse_cues(body, separator)
        assert len(cues) >= 3
        for start, end, lines in cues:
            assert 0 < end - start <= MAX_CUE_S + 1e-3
            assert 1 <= len(lines) <= MAX_LINES and all(len(line) <= MAX_LINE_CHARS for line in lines), lines
        for (_, end, _), (start, _, _) in zip(cues, cues[1:]):
            assert end <= start + 1e-3
        text = " ".join(" ".join(lines) for _, _, lines in cues)
        assert wer(offline_text, text) <= 0.1, (offline_text, text)
