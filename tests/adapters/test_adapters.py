"""Protocol adapters and native multichannel, with the fake engine: translation both ways, error paths.

The translators are sans-I/O, so most tests drive them directly through :class:`Harness`, which
carries out their outputs against real sessions the way ``serve_connection`` does (minus sockets
and the worker thread). A few tests go over real sockets with the official SDK clients
(``openai``, ``deepgram-sdk``) against a real server with the fake engine.

Speech is a 150 Hz sawtooth (what the VAD tests use): the VAD takes it for voice, the fake engine
"recognises" one word per 0.4 s of it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave

import numpy as np
import pytest
from websockets.asyncio.client import connect

from stream_server.adapters import ROUTES
from stream_server.adapters.base import Hangup, OpenStream, Reply, StreamAudio, StreamCommand, alaw_to_pcm16, parse_wav_header
from stream_server.adapters.deepgram import DeepgramTranslator
from stream_server.adapters.openai_realtime import RealtimeTranscriptionTranslator
from stream_server.adapters.twilio import TwilioTranslator
from stream_server.core.audio import encode_mulaw
from stream_server.core.events import Error
from stream_server.core.multichannel import MultichannelSession
from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
from stream_server.core.session import Close, Send, SessionSettings, State, Submit
from tests.fakes import CountingEngine

pytestmark = [  # the Deepgram SDK imports websockets' deprecated legacy client
    pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:websockets.exceptions.InvalidStatusCode is deprecated:DeprecationWarning"),
]


def buzz(seconds: float, rate: int = 16000, f0: float = 150.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * (2.0 * ((f0 * t) % 1.0) - 1.0)).astype(np.float32)


def quiet(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """A-law by table inversion (nearest code), for feeding the A-law paths."""
    table = alaw_to_pcm16(bytes(range(256)))
    levels = np.frombuffer(table, "<i2").astype(np.int32)
    order = np.argsort(levels)
    target = (np.clip(samples, -1, 1) * 32767).astype(np.int32)
    idx = np.clip(np.searchsorted(levels[order], target), 0, 255)
    return order[idx].astype(np.uint8).tobytes()


class Harness:
    """Carries out a translator's outputs against real sessions and the fake engine, synchronously."""

    def __init__(self, translator, engine=None, settings=SessionSettings(), hold=False):
        self.t = translator
        self.engine = engine or CountingEngine()
        self.settings = settings
        self.hold = hold
        self.sessions: dict[str, MultichannelSession] = {}
        self.replies: list = []
        self.hangup: Hangup | None = None
        self.held: list = []
        self.native_log: list = []
        self.run(self.t.opened())

    def run(self, outs):
        for out in outs:
            if isinstance(out, Reply):
                self.replies.append(out.message)
            elif isinstance(out, Hangup):
                self.hangup = out
            elif isinstance(out, OpenStream):
                self.sessions[out.key] = MultichannelSession(f"s-{out.key}", self.engine.capabilities, self.settings)
            elif isinstance(out, StreamCommand):
                self.native_log.append((out.key, out.command.to_wire()))  # as a native client would send it
                self.feed(out.key, self.sessions[out.key].handle(out.command))
            elif isinstance(out, StreamAudio):
                self.feed(out.key, self.sessions[out.key].receive_bytes(out.data))

    def feed(self, key, actions):
        for action in actions:
            if isinstance(action, Submit):
                request = action.request
                if self.hold and request.kind == "final":
                    self.held.append((key, request))
                else:
                    self.answer(key, request)
            elif isinstance(action, Send):
                self.run(self.t.native_event(key, action.event))
            elif isinstance(action, Close):
                self.run(self.t.native_closed(key, action.code, action.reason))

    def answer(self, key, request):
        session = self.sessions[key]
        try:
            result = self.engine.transcribe_batch([request])[0]
        except RuntimeError as exc:
            self.feed(key, session.inference_done(request, None, str(exc)))
        else:
            self.feed(key, session.inference_done(request, result))

    def release(self):
        held, self.held = self.held, []
        for key, request in held:
            self.answer(key, request)

    def text(self, message) -> list:
        before = len(self.replies)
        self.run(self.t.client_text(message if isinstance(message, str) else json.dumps(message)))
        return self.replies[before:]

    def binary(self, data: bytes) -> list:
        before = len(self.replies)
        self.run(self.t.client_bytes(data))
        return self.replies[before:]

    def of(self, key, value):
        return [r for r in self.replies if isinstance(r, dict) and r.get(key) == value]


async def released(server):
    """Sessions are released in the handler's ``finally``, just after the socket closes."""
    for _ in range(100):
        if not server._sessions:
            return
        await asyncio.sleep(0.02)
    assert not server._sessions


# ==== native multichannel =====================================================================


def mc_session(engine=None, **settings):
    engine = engine or CountingEngine()
    return MultichannelSession("mc", engine.capabilities, SessionSettings(**settings)), engine


def run_session(session, engine, actions, events, closes):
    for action in actions:
        if isinstance(action, Send):
            events.append(action.event.to_wire())
        elif isinstance(action, Close):
            closes.append(action)
        else:
            result = engine.transcribe_batch([action.request])[0]
            run_session(session, engine, session.inference_done(action.request, result), events, closes)


def stereo(left: np.ndarray, right: np.ndarray) -> bytes:
    n = max(len(left), len(right))
    both = np.zeros((n, 2), np.float32)
    both[: len(left), 0], both[: len(right), 1] = left, right
    return pcm16(both.reshape(-1))


def test_multichannel_start_splits_channels_and_tags_every_event():
    session, engine = mc_session()
    events, closes = [], []
    start = {"type": "start", "multichannel": True, "audio": {"encoding": "pcm_s16le", "sample_rate": 16000,
                                                               "channels": 2}}
    run_session(session, engine, session.receive_text(json.dumps(start)), events, closes)
    [ready] = events
    assert ready["type"] == "ready" and ready["session_id"] == "mc"
    assert ready["config"]["audio"]["channels"] == 2 and ready["config"]["multichannel"] is True
    agent = np.concatenate([quiet(0.5), buzz(1.2), quiet(3.3)])  # speaks first
    customer = np.concatenate([quiet(2.5), buzz(1.6), quiet(0.9)])  # answers later
    data = stereo(agent, customer)
    for i in range(0, len(data), 1283):  # odd sizes: frames split mid-sample and mid-channel
        run_session(session, engine, session.receive_bytes(data[i : i + 1283]), events, closes)
    run_session(session, engine, session.receive_text('{"type":"stop"}'), events, closes)
    finals = [e for e in events if e["type"] == "final"]
    assert sorted(f["channel"] for f in finals) == [0, 1]
    by_channel = {f["channel"]: f for f in finals}
    assert by_channel[0]["start"] < 0.6 and by_channel[0]["end"] < 2.0
    assert 2.0 < by_channel[1]["start"] < 2.6 and by_channel[1]["text"].startswith("w0 w1 w2 w3")
    for kind in ("speech_started", "partial", "final"):
        assert all("channel" in e for e in events if e["type"] == kind)
    assert events[-1] == {"type": "end", "utterances": 2, "audio_seconds": 5.0}
    assert closes == [Close(1000, "end of stream")]
    assert session.state == State.CLOSED
    assert session.session_ids == ["mc", "mc.0", "mc.1"]


def test_without_multichannel_the_session_is_a_plain_session():
    session, engine = mc_session()
    events, closes = [], []
    run_session(session, engine, session.receive_text('{"type":"start","audio":{"channels":2}}'), events, closes)
    assert "multichannel" not in events[0]["config"] and events[0]["session_id"] == "mc"
    run_session(session, engine, session.receive_bytes(stereo(np.concatenate([quiet(0.5), buzz(1.0)]),
                                                              np.concatenate([quiet(0.5), buzz(1.0)]))), events, closes)
    run_session(session, engine, session.receive_text('{"type":"stop"}'), events, closes)
    assert [e["type"] for e in events if e["type"] in ("final", "end")] == ["final", "end"]
    assert all("channel" not in e for e in events)
    assert not session.multichannel and session.session_ids == ["mc"]


@pytest.mark.parametrize("start, problem", [
    ({"multichannel": "yes"}, "multichannel must be true or false"),
    ({"multichannel": True, "audio": {"channels": 9}}, "audio.channels"),
    ({"multichannel": True, "language": "xx"}, "'xx'"),
    ({"multichannel": True, "bogus": 1}, "bogus"),
])
def test_bad_multichannel_start_is_bad_config_and_a_good_one_still_works(start, problem):
    session, engine = mc_session()
    [action] = session.receive_text(json.dumps({"type": "start", **start}))
    assert action.event.to_wire()["code"] == "bad_config" and problem in action.event.to_wire()["message"]
    assert session.state == State.AWAITING_START and not session.multichannel
    [action] = session.receive_bytes(b"\x00\x00")
    assert action.event.to_wire()["code"] == "not_started"
    [ready] = session.receive_text('{"type":"start","multichannel":true,"audio":{"channels":2}}')
    assert ready.event.to_wire()["type"] == "ready" and session.multichannel


def test_multichannel_answers_stream_wide_messages_once():
    session, engine = mc_session()
    session.receive_text('{"type":"start","multichannel":true,"audio":{"channels":3}}')
    [configured] = session.receive_text('{"type":"configure","language":"fr"}')
    assert configured.event.to_wire()["type"] == "configured" and configured.event.to_wire()["config"]["audio"]["channels"] == 3
    assert configured.event.to_wire()["config"]["multichannel"] is True
    for bad, code in (("{nope", "bad_json"), ('{"type":"configure","task":1}', "bad_config"),
                      ('{"type":"start"}', "already_started")):
        [action] = session.receive_text(bad)
        assert action.event.to_wire()["code"] == code and "channel" not in action.event.to_wire()
    [too_large] = session.receive_bytes(b"\x00" * (SessionSettings().max_frame_bytes + 2))
    assert too_large.event.to_wire()["code"] == "too_large"


def test_multichannel_end_stream_keeps_the_close_code_and_sends_the_notice_once():
    session, engine = mc_session()
    events, closes = [], []
    session.receive_text('{"type":"start","multichannel":true,"audio":{"channels":2}}')
    run_session(session, engine, session.receive_bytes(stereo(np.concatenate([quiet(0.4), buzz(1.0)]),
                                                              np.concatenate([quiet(0.4), buzz(1.0)]))), events, closes)
    notice = Error("shutting_down", "bye")
    run_session(session, engine, session.end_stream(notice, 1001, "server shutting down"), events, closes)
    assert [e["type"] for e in events if e["type"] != "partial"].count("error") == 1
    assert sorted(e["channel"] for e in events if e["type"] == "final") == [0, 1]
    assert events[-1]["type"] == "end" and events[-1]["utterances"] == 2
    assert closes == [Close(1001, "server shutting down")]


async def test_native_route_serves_multichannel_over_the_socket():
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "multichannel": True, "partials": False,
                                      "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 2}}))
            ready = json.loads(await ws.recv())
            assert ready["config"]["multichannel"] is True
            data = stereo(np.concatenate([quiet(0.5), buzz(1.0), quiet(1.5)]),
                          np.concatenate([quiet(1.5), buzz(1.0), quiet(0.5)]))
            for i in range(0, len(data), 6400):
                await ws.send(data[i : i + 6400])
            await ws.send('{"type":"stop"}')
            events = [json.loads(m) async for m in ws]
        finals = [e for e in events if e["type"] == "final"]
        assert [f["channel"] for f in finals] in ([0, 1], [1, 0]) and events[-1]["type"] == "end"
        assert ws.close_code == 1000
        await released(server)


# ==== OpenAI Realtime (transcription) =========================================================


def openai_harness(**kw):
    engine = kw.pop("engine", None) or CountingEngine()
    return Harness(RealtimeTranscriptionTranslator(engine.capabilities, SessionSettings()), engine, **kw)


def append(h, data: bytes, chunk: int = 4800):
    out = []
    for i in range(0, len(data), chunk):
        out += h.text({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + chunk]).decode()})
    return out


def sdk_validate(event: dict):
    """Parse a server event with the openai SDK's own (GA) types, strictly."""
    from openai.types.realtime import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
        ConversationItemInputAudioTranscriptionDeltaEvent,
        ConversationItemInputAudioTranscriptionFailedEvent,
        InputAudioBufferClearedEvent,
        InputAudioBufferCommittedEvent,
        InputAudioBufferSpeechStartedEvent,
        InputAudioBufferSpeechStoppedEvent,
        RealtimeErrorEvent,
        SessionCreatedEvent,
        SessionUpdatedEvent,
    )

    types = {
        "session.created": SessionCreatedEvent, "session.updated": SessionUpdatedEvent,
        "input_audio_buffer.speech_started": InputAudioBufferSpeechStartedEvent,
        "input_audio_buffer.speech_stopped": InputAudioBufferSpeechStoppedEvent,
        "input_audio_buffer.committed": InputAudioBufferCommittedEvent,
        "input_audio_buffer.cleared": InputAudioBufferClearedEvent,
        "conversation.item.input_audio_transcription.delta": ConversationItemInputAudioTranscriptionDeltaEvent,
        "conversation.item.input_audio_transcription.completed": ConversationItemInputAudioTranscriptionCompletedEvent,
        "conversation.item.input_audio_transcription.failed": ConversationItemInputAudioTranscriptionFailedEvent,
        "error": RealtimeErrorEvent,
    }
    return types[event["type"]].model_validate(event)


def test_openai_session_created_and_updated_have_the_sdk_shapes():
    h = openai_harness()
    [created] = h.replies
    parsed = sdk_validate(created)
    assert parsed.session.type == "transcription" and parsed.session.audio.input.format.rate == 24000
    [updated] = h.text({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"},
        "transcription": {"model": "gpt-4o-transcribe", "language": "en", "prompt": "Granite, Deepgram"},
        "turn_detection": {"type": "server_vad", "threshold": 0.8, "silence_duration_ms": 700},
        "noise_reduction": {"type": "near_field"}}}}})
    session = sdk_validate(updated).session
    assert session.audio.input.format.type == "audio/pcmu" and session.audio.input.transcription.model == "gpt-4o-transcribe"
    assert session.audio.input.turn_detection.silence_duration_ms == 700
    assert updated["session"]["audio"]["input"]["noise_reduction"] is None  # the effective setting
    append(h, encode_mulaw(quiet(0.2, 8000)))
    [(_, start)] = [(k, m) for k, m in h.native_log if m["type"] == "start"]
    assert start["audio"] == {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}
    assert start["keywords"] == ["Granite", "Deepgram"] and start["vad"] == {"silence_ms": 700, "aggressiveness": 3}
    assert h.sessions["main"].state == State.STREAMING


def test_openai_server_vad_items_with_deltas_that_add_up_to_the_transcript():
    h = openai_harness()
    # The first item is long enough for stable words during speech: the stabilizer counts partials
    # over 2 s of audio or more and wants agreement over 3 s of it (PartialStabilizer's defaults).
    audio = np.concatenate([quiet(0.5, 24000), buzz(6.4, 24000), quiet(1.0, 24000), buzz(1.0, 24000), quiet(1.0, 24000)])
    append(h, pcm16(audio))
    events = h.replies[1:]
    for event in events:
        sdk_validate(event)
        assert event["event_id"].startswith("event_")
    kinds = [e["type"] for e in events if not e["type"].endswith(".delta")]
    assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"] * 2
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    completed = [e for e in events if e["type"].endswith(".completed")]
    assert 100 <= started[0]["audio_start_ms"] <= 500 and 7300 <= started[1]["audio_start_ms"] <= 7900
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert committed[0]["previous_item_id"] is None and committed[1]["previous_item_id"] == committed[0]["item_id"]
    for item in completed:
        deltas = [e["delta"] for e in events if e["type"].endswith(".delta") and e["item_id"] == item["item_id"]]
        assert "".join(deltas) == item["transcript"] and item["transcript"].startswith("w0 w1")
        assert item["usage"]["type"] == "duration" and item["usage"]["seconds"] > 0.5
    first_deltas = [e for e in events if e["type"].endswith(".delta") and e["item_id"] == completed[0]["item_id"]]
    stopped_at = events.index(next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped"))
    assert len(first_deltas) >= 2 and events.index(first_deltas[0]) < stopped_at  # streamed during speech



# A pause longer than the early final's 200 ms and shorter than the VAD's 500 ms end-of-speech
# silence: the session decodes a final speculatively, speech resumes, and the utterance goes on.
# The end of speech must be announced once, after the second phrase, when the VAD decides.
SHORT_PAUSE_S = 0.35
PHRASE_END_S = 0.5 + 1.2 + SHORT_PAUSE_S + 1.0  # where the second phrase stops


def short_pause_speech(rate: int) -> np.ndarray:
    return np.concatenate([quiet(0.5, rate), buzz(1.2, rate), quiet(SHORT_PAUSE_S, rate), buzz(1.0, rate),
                           quiet(1.5, rate)])


def fed_until(h, send, audio: np.ndarray, rate: int, encode, is_end) -> list[float]:
    """Feed ``audio`` in 100 ms steps; the stream positions (s) at which an end-of-speech reply came."""
    ends = []
    step = rate // 10
    for i in range(0, len(audio), step):
        for reply in send(h, encode(audio[i : i + step])):
            if is_end(reply):
                ends.append((i + step) / rate)
    return ends


def test_short_pause_has_an_early_final_that_is_discarded():
    """The premise of the short-pause adapter tests: the 350 ms pause makes the session submit an
    early final that speech then overrides, and the utterance goes on as one."""
    engine = CountingEngine()
    session = MultichannelSession("s", engine.capabilities, SessionSettings())
    events, closes = [], []
    run_session(session, engine, session.receive_text(json.dumps({"type": "start"})), events, closes)
    audio = short_pause_speech(16000)
    for i in range(0, len(audio), 1600):
        run_session(session, engine, session.receive_bytes(pcm16(audio[i : i + 1600])), events, closes)
    finals = [b for batch in engine.batches for b in batch if b.kind == "final"]
    assert len(finals) == 2 and finals[0].duration < 2.2 < finals[1].duration  # the early one, then the real one
    assert [e["type"] for e in events if e["type"] != "partial"] == ["ready", "speech_started", "speech_ended", "final"]
    [ended] = [e for e in events if e["type"] == "speech_ended"]
    assert ended["end"] >= PHRASE_END_S - 0.05 and ended["reason"] == "silence"


def test_openai_short_pause_stops_speech_once_per_item_after_the_vad_decides():
    h = openai_harness()
    ends = fed_until(h, append, short_pause_speech(24000), 24000, pcm16,
                     lambda e: e["type"] in ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"))
    events = h.replies[1:]
    kinds = [e["type"] for e in events if not e["type"].endswith(".delta")]
    assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"]
    [stopped] = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert stopped["audio_end_ms"] >= (PHRASE_END_S - 0.05) * 1000
    # Announced only once the silence after the second phrase reached the VAD's 500 ms.
    assert len(ends) == 2 and min(ends) >= PHRASE_END_S + 0.5


def test_openai_manual_commit_makes_one_item_of_everything_since_the_last_commit():
    h = openai_harness()
    h.text({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}})
    # Two stretches of speech 6 s apart (the native VAD splits them: two utterances), one commit.
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.2, 24000), quiet(6.0, 24000), buzz(0.8, 24000)])))
    assert not h.of("type", "input_audio_buffer.speech_started")  # no VAD events without turn detection
    out = h.text({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert out[0]["type"] == "input_audio_buffer.committed"
    [completed] = h.of("type", "conversation.item.input_audio_transcription.completed")
    words = completed["transcript"].split()  # the two utterances' finals, joined
    assert words.count("w0") == 2 and words[-2:] == ["w0", "w1"] and completed["item_id"] == out[0]["item_id"]
    deltas = [e["delta"] for e in h.of("type", "conversation.item.input_audio_transcription.delta")]
    assert "".join(deltas) == completed["transcript"]
    [error] = h.text({"type": "input_audio_buffer.commit"})  # nothing new since the commit
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    append(h, pcm16(quiet(0.5, 24000)))
    [committed, empty] = h.text({"type": "input_audio_buffer.commit"})  # silence only: an empty transcript
    assert empty["type"].endswith(".completed") and empty["transcript"] == ""
    assert committed["previous_item_id"] == out[0]["item_id"]


def test_openai_clear_drops_the_current_item():
    h = openai_harness()
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.5, 24000)])))
    assert h.of("type", "input_audio_buffer.speech_started")
    [cleared] = h.text({"type": "input_audio_buffer.clear"})
    assert cleared["type"] == "input_audio_buffer.cleared"
    append(h, pcm16(np.concatenate([quiet(1.0, 24000), buzz(1.0, 24000), quiet(1.0, 24000)])))
    completed = h.of("type", "conversation.item.input_audio_transcription.completed")
    started = h.of("type", "input_audio_buffer.speech_started")
    assert len(started) == 2 and [c["item_id"] for c in completed] == [started[1]["item_id"]]


def test_openai_commit_during_speech_ends_the_item_now():
    h = openai_harness()
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.6, 24000)])))
    out = h.text({"type": "input_audio_buffer.commit"})
    assert [e["type"] for e in out if not e["type"].endswith(".delta")] == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed"]
    assert abs(out[0]["audio_end_ms"] - 2100) <= 40


@pytest.mark.parametrize("fmt, encode, rate", [("audio/pcmu", encode_mulaw, 8000), ("audio/pcma", encode_alaw, 8000),
                                               ("audio/pcm", pcm16, 16000)])
def test_openai_input_formats(fmt, encode, rate):
    h = openai_harness()
    h.text({"type": "session.update", "session": {"audio": {"input": {"format": {"type": fmt, "rate": rate}}}}})
    append(h, encode(np.concatenate([quiet(0.5, rate), buzz(1.2, rate), quiet(1.0, rate)])), chunk=1000)
    [completed] = h.of("type", "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"].startswith("w0 w1 w2")
    [started] = h.of("type", "input_audio_buffer.speech_started")
    assert 100 <= started["audio_start_ms"] <= 500


def test_openai_beta_transcription_session_update():
    h = openai_harness()
    [updated] = h.text({"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "whisper-1", "language": "fr"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}})
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["input_audio_transcription"]["language"] == "fr"
    append(h, encode_mulaw(quiet(0.1, 8000)))
    start = next(m for _, m in h.native_log if m["type"] == "start")
    assert start["language"] == "fr" and start["vad"]["silence_ms"] == 400


@pytest.mark.parametrize("message, code, param", [
    ("{not json", "invalid_json", None),
    ('["a"]', "missing_required_parameter", "type"),
    ({"type": "input_audio_buffer.append", "audio": "%%%not base64"}, "invalid_value", "audio"),
    ({"type": "input_audio_buffer.append"}, "invalid_value", "audio"),
    ({"type": "response.create"}, "invalid_value", "type"),
    ({"type": "input_audio_buffer.frobnicate", "event_id": "e7"}, "invalid_value", "type"),
    ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
    ({"type": "session.update", "session": {"tools": []}}, "unknown_parameter", "session.tools"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}},
     "invalid_value", "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": 20}}}}},
     "invalid_value", "session.audio.input.turn_detection.silence_duration_ms"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": "500"}}}}},
     "invalid_value", "session.audio.input.turn_detection.silence_duration_ms"),
    ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}},
     "invalid_value", "session.audio.input.format.type"),
    ({"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": "xx"}}}}},
     "invalid_value", "session"),
    ({"type": "session.update", "session": {"audio": {"input": {"transcription": {"prompt": "x" * 80}}}}},
     "invalid_value", "session"),
])
def test_openai_bad_events_get_an_error_and_the_session_goes_on(message, code, param):
    h = openai_harness()
    [error] = h.text(message)
    parsed = sdk_validate(error)
    assert parsed.error.code == code and parsed.error.param == param and parsed.error.type == "invalid_request_error"
    if isinstance(message, dict) and "event_id" in message:
        assert parsed.error.event_id == message["event_id"]
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(0.8, 24000), quiet(1.0, 24000)])))
    assert h.of("type", "conversation.item.input_audio_transcription.completed")


def test_openai_binary_frames_and_late_format_changes_are_refused():
    h = openai_harness()
    [error] = h.binary(b"\x00\x01")
    assert error["type"] == "error" and "base64" in error["error"]["message"]
    append(h, pcm16(quiet(0.2, 24000)))
    [error] = h.text({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    assert error["error"]["param"] == "session.audio.input.format"
    [error] = h.text({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
    assert error["error"]["param"] == "session.audio.input.turn_detection"


def test_openai_update_after_audio_reconfigures_the_native_session():
    h = openai_harness()
    append(h, pcm16(quiet(0.2, 24000)))
    [updated] = h.text({"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"language": "fr", "keywords": ["Granite"]},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["transcription"]["language"] == "fr"
    configure = [m for _, m in h.native_log if m["type"] == "configure"][-1]
    assert configure["language"] == "fr" and configure["keywords"] == ["Granite"]
    assert h.sessions["main"].config.vad.silence_ms == 300


def test_openai_failed_transcription_is_reported_for_its_item():
    h = openai_harness(engine=CountingEngine(fail_on={0}))
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.0, 24000), quiet(1.0, 24000)])))
    [failed] = h.of("type", "conversation.item.input_audio_transcription.failed")
    parsed = sdk_validate(failed)
    assert parsed.error.code == "internal" and parsed.item_id == h.of("type", "input_audio_buffer.committed")[0]["item_id"]


def test_openai_finals_answered_out_of_order_still_complete_in_order():
    h = openai_harness(hold=True)
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(0.8, 24000), quiet(1.0, 24000), buzz(0.8, 24000),
                                    quiet(1.0, 24000)])))
    assert len(h.held) == 2 and not h.of("type", "conversation.item.input_audio_transcription.completed")
    h.held.reverse()
    h.release()
    completed = h.of("type", "conversation.item.input_audio_transcription.completed")
    committed = h.of("type", "input_audio_buffer.committed")
    assert [c["item_id"] for c in completed] == [c["item_id"] for c in committed]


# ==== Deepgram ===============================================================================


def deepgram_harness(query: str, **kw):
    from urllib.parse import parse_qs

    engine = kw.pop("engine", None) or CountingEngine()
    t = DeepgramTranslator(engine.capabilities, SessionSettings(), parse_qs(query, keep_blank_values=True),
                           created="2026-01-01T00:00:00Z")
    return Harness(t, engine, **kw)


def dg_validate(message: dict):
    from deepgram.listen.v1.types import (
        ListenV1ConfigureSuccess,
        ListenV1Error,
        ListenV1Metadata,
        ListenV1Results,
        ListenV1SpeechStarted,
        ListenV1UtteranceEnd,
    )

    types = {"Results": ListenV1Results, "Metadata": ListenV1Metadata, "SpeechStarted": ListenV1SpeechStarted,
             "UtteranceEnd": ListenV1UtteranceEnd, "Error": ListenV1Error, "ConfigureSuccess": ListenV1ConfigureSuccess}
    return types[message["type"]].model_validate(message)


def test_deepgram_query_maps_onto_the_native_start():
    h = deepgram_harness("model=nova-3&encoding=mulaw&sample_rate=8000&channels=1&language=en-US&interim_results=true"
                         "&endpointing=300&keyterm=Granite&keyterm=call%20center&keywords=Twilio:2&smart_format=true"
                         "&punctuate=true")
    [(_, start)] = h.native_log
    assert start["audio"] == {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}
    assert start["language"] == "en" and start["partials"] is True and start["vad"] == {"silence_ms": 300}
    assert start["keywords"] == ["Granite", "call center", "Twilio"] and "multichannel" not in start
    assert not h.replies and h.hangup is None
    h2 = deepgram_harness("encoding=linear16&sample_rate=16000&endpointing=10")
    assert h2.native_log[0][1]["vad"] == {"silence_ms": 100}  # Deepgram's 10 ms default, clamped


def test_deepgram_results_speech_started_utterance_end_and_metadata():
    h = deepgram_harness("encoding=linear16&sample_rate=16000&interim_results=true&vad_events=true"
                         "&utterance_end_ms=1000")
    data = pcm16(np.concatenate([quiet(0.5), buzz(2.0), quiet(2.0)]))
    for i in range(0, len(data), 3200):
        h.binary(data[i : i + 3200])
    for message in h.replies:
        dg_validate(message)
    kinds = [m["type"] for m in h.replies]
    assert kinds[0] == "SpeechStarted" and kinds[-1] == "UtteranceEnd"
    interim = [m for m in h.replies if m["type"] == "Results" and not m["is_final"]]
    [final] = [m for m in h.replies if m["type"] == "Results" and m["is_final"]]
    assert interim and all(not m["speech_final"] for m in interim)
    assert final["speech_final"] is True and final["from_finalize"] is False and final["channel_index"] == [0, 1]
    alt = final["channel"]["alternatives"][0]
    assert alt["transcript"].startswith("w0 w1 w2 w3 w4")
    assert alt["words"][0]["start"] == final["start"] and alt["words"][-1]["end"] == pytest.approx(
        final["start"] + final["duration"], abs=0.002)
    assert h.replies[-1]["last_word_end"] == pytest.approx(final["start"] + final["duration"], abs=0.002)
    h.text({"type": "KeepAlive"})
    h.text({"type": "CloseStream"})
    metadata = h.replies[-1]
    assert metadata["type"] == "Metadata" and metadata["duration"] == pytest.approx(4.5)
    assert metadata["channels"] == 1 and len(metadata["sha256"]) == 64 and metadata["created"] == "2026-01-01T00:00:00Z"
    assert h.hangup == Hangup(1000, "end of stream")


def test_deepgram_short_pause_is_one_speech_final_and_one_utterance_end():
    h = deepgram_harness("encoding=linear16&sample_rate=16000&interim_results=true&vad_events=true"
                         "&utterance_end_ms=1000")

    def is_end(m):
        return m["type"] == "UtteranceEnd" or (m["type"] == "Results" and m["is_final"])

    audio = np.concatenate([short_pause_speech(16000), quiet(1.0)])
    ends = fed_until(h, lambda h_, data: h_.binary(data), audio, 16000, pcm16, is_end)
    for message in h.replies:
        dg_validate(message)
    assert [m["type"] for m in h.replies if m["type"] != "Results"] == ["SpeechStarted", "UtteranceEnd"]
    [final] = [m for m in h.replies if m["type"] == "Results" and m["is_final"]]
    assert final["speech_final"] is True and final["from_finalize"] is False
    assert final["start"] + final["duration"] >= PHRASE_END_S - 0.05
    assert len(ends) == 2 and min(ends) >= PHRASE_END_S + 0.5


def test_deepgram_finalize_in_a_short_pause_is_from_finalize():
    """Finalize while an early final is in flight: the final is the client's, not endpointing's."""
    h = deepgram_harness("encoding=linear16&sample_rate=16000")
    h.binary(pcm16(np.concatenate([quiet(0.5), buzz(1.2), quiet(SHORT_PAUSE_S)])))
    [final] = h.text({"type": "Finalize"})
    assert final["is_final"] and final["from_finalize"] and not final["speech_final"]


def test_deepgram_finalize_marks_from_finalize_and_no_interims_without_interim_results():
    h = deepgram_harness("encoding=linear16&sample_rate=16000")
    h.binary(pcm16(np.concatenate([quiet(0.5), buzz(1.5)])))
    assert not h.replies  # no interim results, no SpeechStarted unless asked
    [final] = h.text({"type": "Finalize"})
    assert final["is_final"] and final["from_finalize"] and not final["speech_final"]
    h.binary(pcm16(np.concatenate([quiet(1.0), buzz(1.0)])))
    h.binary(b"")  # Deepgram's legacy end of stream
    results = [m for m in h.replies if m["type"] == "Results"]
    assert len(results) == 2 and not results[1]["from_finalize"] and not results[1]["speech_final"]
    assert h.replies[-1]["type"] == "Metadata" and h.hangup.code == 1000


def test_deepgram_multichannel_gives_each_channel_its_index():
    h = deepgram_harness("encoding=linear16&sample_rate=16000&channels=2&multichannel=true&vad_events=true")
    h.binary(stereo(np.concatenate([quiet(0.5), buzz(1.0), quiet(2.5)]),
                    np.concatenate([quiet(2.0), buzz(1.2), quiet(0.8)])))
    h.text({"type": "CloseStream"})
    finals = [m for m in h.replies if m["type"] == "Results" and m["is_final"]]
    assert sorted(m["channel_index"] for m in finals) == [[0, 2], [1, 2]]
    starts = {m["channel"][0]: m["timestamp"] for m in h.replies if m["type"] == "SpeechStarted"}
    assert starts[0] < 0.6 < 1.5 < starts[1]
    assert h.replies[-1]["type"] == "Metadata" and h.replies[-1]["channels"] == 2


def test_deepgram_wav_stream_without_encoding_and_alaw():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm16(np.concatenate([quiet(0.5, 8000), buzz(1.2, 8000), quiet(1.0, 8000)])))
    h = deepgram_harness("")
    h.binary(buffer.getvalue())
    [(_, start)] = [x for x in h.native_log if x[1]["type"] == "start"]
    assert start["audio"] == {"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1}
    [result] = [m for m in h.replies if m["type"] == "Results"]
    assert result["channel"]["alternatives"][0]["transcript"].startswith("w0 w1 w2")
    h = deepgram_harness("encoding=alaw&sample_rate=8000")
    h.binary(encode_alaw(np.concatenate([quiet(0.5, 8000), buzz(1.2, 8000), quiet(1.0, 8000)])))
    [result] = [m for m in h.replies if m["type"] == "Results"]
    assert result["channel"]["alternatives"][0]["transcript"].startswith("w0 w1 w2")


@pytest.mark.parametrize("query, problem", [
    ("encoding=linear16&diarize=true", "diarize is not available"),  # the engine has no speaker encoder
    ("encoding=linear16&diarize_model=nova", "diarize_model is not supported"),
    ("encoding=linear16&frobnicate=1", "unknown query parameter"),
    ("encoding=opus", "encoding 'opus' is not supported"),
    ("encoding=linear16&interim_results=maybe", "interim_results must be true or false"),
    ("encoding=linear16&utterance_end_ms=1000", "utterance_end_ms requires interim_results=true"),
    ("encoding=linear16&sample_rate=abc", "sample_rate must be a whole number"),
    ("encoding=linear16&sample_rate=4000", "audio.sample_rate"),
    ("encoding=linear16&language=xx", "'xx'"),
])
def test_deepgram_bad_options_are_an_error_then_close_1008(query, problem):
    h = deepgram_harness(query)
    [error] = [m for m in h.replies if m["type"] == "Error"]
    dg_validate(error)
    assert problem in error["description"]
    assert h.hangup.code == 1008
    assert h.binary(pcm16(buzz(0.5))) == []


def test_deepgram_bad_client_messages_and_non_wav_audio():
    h = deepgram_harness("encoding=linear16&sample_rate=16000")
    [error] = h.text("{oops")
    assert error["variant"] == "SchemaError" and error["message"] == "{oops"
    [error] = h.text({"type": "Frobnicate"})
    assert error["variant"] == "SchemaError" and "Frobnicate" in error["description"]
    [success] = h.text({"type": "Configure", "keyterms": ["Granite", "Twilio"]})
    dg_validate(success)
    assert success["keyterms"] == ["Granite", "Twilio"] and h.sessions["main"].config.keywords == ("Granite", "Twilio")
    h = deepgram_harness("")
    [error] = h.binary(b"\x01\x02" * 400)
    assert error["type"] == "Error" and "WAV" in error["description"] and h.hangup.code == 1008


# ==== Twilio =================================================================================


def twilio_start(tracks=("inbound", "outbound"), **custom):
    return {"event": "start", "sequenceNumber": "1", "streamSid": "MZ123", "start": {
        "accountSid": "AC1", "streamSid": "MZ123", "callSid": "CA9", "tracks": list(tracks),
        "customParameters": custom, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def twilio_media(track: str, payload: bytes, chunk: int, timestamp: int):
    return {"event": "media", "sequenceNumber": str(chunk + 2), "streamSid": "MZ123",
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp),
                      "payload": base64.b64encode(payload).decode()}}


def feed_twilio(h, tracks: dict[str, np.ndarray]):
    """Interleave 20 ms media messages of each track like Twilio does."""
    encoded = {track: encode_mulaw(audio) for track, audio in tracks.items()}
    frames = max(len(e) for e in encoded.values()) // 160
    for i in range(frames):
        for track, data in encoded.items():
            if i * 160 < len(data):
                h.text(twilio_media(track, data[i * 160 : (i + 1) * 160], i + 1, i * 20))


def test_twilio_transcribes_each_track_separately():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    assert h.text({"event": "connected", "protocol": "Call", "version": "1.0.0"}) == []
    assert h.text(twilio_start(language="en", keywords="Granite, Twilio", customerId="42")) == []
    starts = {k: m for k, m in h.native_log if m["type"] == "start"}
    assert set(starts) == {"inbound", "outbound"}
    assert starts["inbound"]["audio"] == {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}
    assert starts["inbound"]["keywords"] == ["Granite", "Twilio"]
    feed_twilio(h, {"inbound": np.concatenate([quiet(0.5, 8000), buzz(1.2, 8000), quiet(2.5, 8000)]),
                    "outbound": np.concatenate([quiet(2.0, 8000), buzz(0.8, 8000), quiet(1.4, 8000)])})
    h.text({"event": "mark", "streamSid": "MZ123", "mark": {"name": "x"}})
    h.text({"event": "stop", "sequenceNumber": "99", "streamSid": "MZ123", "stop": {"accountSid": "AC1", "callSid": "CA9"}})
    finals = [r for r in h.replies if r["event"] == "transcript" and r["is_final"]]
    assert sorted(f["track"] for f in finals) == ["inbound", "outbound"]
    texts = {f["track"]: f["text"] for f in finals}
    assert texts["inbound"].startswith("w0 w1 w2") and len(texts["outbound"].split()) < len(texts["inbound"].split())
    assert all(r["streamSid"] == "MZ123" and r["callSid"] == "CA9" for r in h.replies)
    assert any(r["event"] == "transcript" and not r["is_final"] and "stable_text" in r for r in h.replies)
    assert [r["track"] for r in h.replies if r["event"] == "speech_started"] == ["inbound", "outbound"]
    end = h.replies[-1]
    assert end["event"] == "end" and end["tracks"]["inbound"]["utterances"] == 1
    assert end["tracks"]["outbound"]["audio_seconds"] == pytest.approx(4.2, abs=0.01)
    assert h.hangup == Hangup(1000, "end of stream")


def test_twilio_short_pause_ends_speech_once_after_the_vad_decides():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    h.text(twilio_start(tracks=("inbound",)))
    audio = short_pause_speech(8000)
    ends = []
    encoded = encode_mulaw(audio)
    for i in range(0, len(encoded), 160):
        for reply in h.text(twilio_media("inbound", encoded[i : i + 160], i // 160 + 1, i // 8)):
            if reply["event"] == "speech_ended" or (reply["event"] == "transcript" and reply["is_final"]):
                ends.append((i + 160) / 8000)
    kinds = [r["event"] for r in h.replies if not (r["event"] == "transcript" and not r["is_final"])]
    assert kinds == ["speech_started", "speech_ended", "transcript"]
    [ended] = [r for r in h.replies if r["event"] == "speech_ended"]
    assert ended["track"] == "inbound" and ended["utterance_id"] == 0 and ended["end"] >= PHRASE_END_S - 0.05
    assert len(ends) == 2 and min(ends) >= PHRASE_END_S + 0.5


def test_twilio_gap_in_a_track_keeps_it_on_the_call_clock():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    h.text(twilio_start(tracks=("outbound",)))
    h.text(twilio_media("outbound", encode_mulaw(quiet(0.2, 8000)), 1, 0))
    speech = encode_mulaw(np.concatenate([buzz(1.0, 8000), quiet(1.0, 8000)]))
    for i in range(0, len(speech), 160):  # nothing for 3 s, then speech at 3.2 s
        h.text(twilio_media("outbound", speech[i : i + 160], 2 + i // 160, 3200 + i // 8))
    [started] = [r for r in h.replies if r["event"] == "speech_started"]
    assert 2.8 <= started["start"] <= 3.2


def test_twilio_errors_media_before_start_bad_payload_unknown_events():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    [error] = h.text(twilio_media("inbound", b"\xff" * 160, 1, 0))
    assert error["event"] == "error" and error["code"] == "not_started"
    [error] = h.text("{nope")
    assert error["code"] == "bad_json"
    [error] = h.text({"event": "dance"})
    assert error["code"] == "unknown_type"
    [error] = h.binary(b"\x00")
    assert error["code"] == "bad_message"
    h.text(twilio_start(tracks=("inbound",)))
    [error] = h.text({"event": "media", "media": {"track": "inbound", "payload": "!!notbase64"}})
    assert error["code"] == "bad_audio" and error["track"] == "inbound"
    [error] = h.text({"event": "media", "media": {"track": "sideways", "payload": ""}})
    assert error["code"] == "bad_message"
    [error] = h.text(twilio_start())
    assert error["code"] == "already_started"


def test_twilio_refused_settings_are_reported_once_per_track():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    out = h.text(twilio_start(language="xx"))
    assert [(e["code"], e["track"]) for e in out] == [("bad_config", "inbound"), ("bad_config", "outbound")]
    feed_twilio(h, {"inbound": buzz(0.5, 8000)})
    assert len(h.replies) == 2  # the tracks' media are dropped without an error per frame
    h.text({"event": "stop"})
    assert h.replies[-1]["event"] == "end" and h.hangup.code == 1000


def test_twilio_mediaformat_other_than_mulaw_is_refused():
    h = Harness(TwilioTranslator(CountingEngine().capabilities, SessionSettings()), CountingEngine())
    start = twilio_start()
    start["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}
    [error] = h.text(start)
    assert error["code"] == "bad_config" and not h.sessions


# ==== shared helpers ==========================================================================


def test_alaw_expansion_matches_g711():
    table = np.frombuffer(alaw_to_pcm16(bytes(range(256))), "<i2")
    assert table[0xD5] == 8 and table[0x55] == -8 and table[0xAA] == 32256 and table[0x2A] == -32256


def test_wav_header_parsing():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(b"\x00" * 40)
    header = parse_wav_header(buffer.getvalue())
    assert (header.encoding, header.sample_rate, header.channels, header.data_offset) == ("pcm_s16le", 44100, 2, 44)
    assert "not a RIFF" in parse_wav_header(b"OggS....")
    assert "incomplete" in parse_wav_header(buffer.getvalue()[:30])


def test_the_adapters_routes_are_served_when_handed_to_the_server():
    # The shell knows no foreign protocol: alone it serves the native route; the adapters' table adds theirs.
    assert set(StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0))).routes) == {"/v1/listen"}
    server = StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES)
    assert set(server.routes) == {"/v1/listen", "/v1/realtime", "/deepgram/v1/listen", "/v1/twilio"}
    assert set(ROUTES) == {"/v1/realtime", "/deepgram/v1/listen", "/v1/twilio"}


# ==== over real sockets, with the official SDKs ===============================================


async def test_openai_sdk_realtime_client_against_the_server():
    from openai import AsyncOpenAI

    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        client = AsyncOpenAI(api_key="sk-dummy", base_url=f"http://127.0.0.1:{server.port}/v1",
                             websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
            assert (await conn.recv()).type == "session.updated"
            data = pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.2, 24000), quiet(1.0, 24000)]))
            for i in range(0, len(data), 9600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + 9600]).decode())
            events = []
            async with asyncio.timeout(10):
                async for event in conn:
                    events.append(event)
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        break
            assert [e.type for e in events if not e.type.endswith(".delta")] == [
                "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"]
            assert events[-1].transcript.startswith("w0 w1 w2")
        await released(server)


async def test_deepgram_sdk_client_against_the_server():
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        base = f"127.0.0.1:{server.port}"
        client = AsyncDeepgramClient(api_key="dummy", environment=DeepgramClientEnvironment(
            base=f"http://{base}", production=f"ws://{base}/deepgram", agent=f"ws://{base}", agent_rest=f"http://{base}"))
        messages = []
        async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000",
                                            interim_results="true", smart_format="true") as conn:
            data = pcm16(np.concatenate([quiet(0.5), buzz(1.2), quiet(1.0)]))
            for i in range(0, len(data), 8000):
                await conn.send_media(data[i : i + 8000])
            await conn.send_close_stream()
            async with asyncio.timeout(10):
                async for message in conn:
                    messages.append(message)
        names = [type(m).__name__ for m in messages]
        assert names[-1] == "ListenV1Metadata" and "ListenV1Results" in names
        finals = [m for m in messages if type(m).__name__ == "ListenV1Results" and m.is_final]
        [final] = finals
        assert final.channel.alternatives[0].transcript.startswith("w0 w1 w2") and final.speech_final


async def test_twilio_over_the_socket_and_unknown_adapter_paths_404():
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps(twilio_start(tracks=("inbound",))))
            audio = encode_mulaw(np.concatenate([quiet(0.5, 8000), buzz(1.2, 8000), quiet(1.0, 8000)]))
            for i in range(0, len(audio), 160):
                await ws.send(json.dumps(twilio_media("inbound", audio[i : i + 160], i // 160 + 1, i // 8)))
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZ123"}))
            events = [json.loads(m) async for m in ws]
        [final] = [e for e in events if e["event"] == "transcript" and e["is_final"]]
        assert final["text"].startswith("w0 w1 w2") and final["track"] == "inbound"
        assert events[-1]["event"] == "end" and ws.close_code == 1000
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime/other"):
                pass
        assert info.value.response.status_code == 404


async def test_adapters_use_the_servers_api_keys_and_sdks_can_present_them():
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment
    from openai import AsyncOpenAI
    from websockets.exceptions import InvalidStatus

    from stream_server.server.auth import AccessPolicy

    key = "adapter-test-key-0123456789"
    settings = ServerSettings(network=NetworkSettings(port=0), access=AccessPolicy(api_keys=frozenset({key})))
    async with StreamServer(CountingEngine(), settings, routes=ROUTES) as server:
        base = f"127.0.0.1:{server.port}"
        for api_key, ok in ((key, True), ("wrong-key-0123456789", False)):
            client = AsyncOpenAI(api_key=api_key, base_url=f"http://{base}/v1", websocket_base_url=f"ws://{base}/v1")
            if ok:
                async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                    assert (await conn.recv()).type == "session.created"
            else:
                with pytest.raises(InvalidStatus) as info:
                    async with client.realtime.connect(extra_query={"intent": "transcription"}):
                        pass
                assert info.value.response.status_code == 403
        env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}/deepgram",
                                        agent=f"ws://{base}", agent_rest=f"http://{base}")
        client = AsyncDeepgramClient(access_token=key, environment=env)
        async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000") as conn:
            await conn.send_close_stream()
            messages = [m async for m in conn]
        assert type(messages[-1]).__name__ == "ListenV1Metadata"
        with pytest.raises(InvalidStatus):
            async with connect(f"ws://{base}/v1/twilio"):
                pass


async def test_drain_finishes_adapter_streams_and_a_translator_bug_closes_1011():
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0)), routes=ROUTES) as server:

        class Broken(TwilioTranslator):
            def client_text(self, text):
                raise RuntimeError("bug")

        server.add_route("/broken", lambda server_, ws: Broken(CountingEngine().capabilities))
        from websockets.exceptions import ConnectionClosedError

        async with connect(f"ws://127.0.0.1:{server.port}/broken") as ws:
            await ws.send("{}")
            with pytest.raises(ConnectionClosedError):
                await ws.recv()
        assert ws.close_code == 1011
        await released(server)

        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription") as ws:
            await ws.recv()  # session.created
            data = pcm16(np.concatenate([quiet(0.5, 24000), buzz(1.5, 24000)]))  # speech still going on
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}))
            await asyncio.sleep(0.3)
            draining = asyncio.create_task(server.drain(deadline_s=5))
            events = [json.loads(m) async for m in ws]
            assert await draining == 0
        kinds = [e["type"] for e in events if not e["type"].endswith(".delta")]
        assert kinds[-4:] == ["error", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                              "conversation.item.input_audio_transcription.completed"]
        [notice] = [e for e in events if e["type"] == "error"]
        assert notice["error"]["code"] == "shutting_down"
        assert ws.close_code == 1001


async def test_idle_adapter_connection_is_ended():
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(idle_timeout_s=0.3))
    async with StreamServer(CountingEngine(), settings, routes=ROUTES) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/twilio") as ws:
            await ws.send(json.dumps(twilio_start(tracks=("inbound",))))
            events = [json.loads(m) async for m in ws]
        assert [e["event"] for e in events] == ["error", "end"] and events[0]["code"] == "idle_timeout"
        assert ws.close_code == 1001
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            events = [json.loads(m) async for m in ws]
        assert [e["type"] for e in events] == ["session.created"] and ws.close_code == 1001
