"""Property-based fuzzing of the session core (≥ 1,000 cases) and of the server over a real socket (≥ 200).

Invariants, whatever the client sends and whatever the engine answers:
- nothing raises; every `error` event has a known code and a message;
- `stable_text` is never revised within an utterance: each partial's `stable_text` extends the previous
  one word for word, and it leads (word for word) the `text` of every later partial and the final;
- nothing is lost: once the stream ends, every `speech_started` has exactly one `speech_ended`, in
  utterance order, then exactly one `final` or one `error` naming its utterance, and `end` comes last.
"""

import asyncio
import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream_server.inference.types import InferenceResult
from stream_server.core.session import Close, Send, Session, SessionSettings, State, Submit
from tests.fakes import CountingEngine
from tests.vad.test_vad import voiced

ERROR_CODES = {
    "bad_json", "bad_message", "unknown_type", "bad_config", "bad_audio", "not_started", "already_started",
    "too_large", "overloaded", "internal", "session_limit", "idle_timeout", "shutting_down",
}

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=12)

config_fields = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from(["transcribe", "translate", "dance", 3]),
    "language": st.sampled_from(["en", "fr", "de", "EN", "english", None, 7]),
    "target_language": st.sampled_from(["en", "fr", None, "xx"]),
    "keywords": st.one_of(st.lists(st.text(max_size=70), max_size=5), st.text(max_size=5), st.none()),
    "partials": st.sampled_from([True, False, "llm", "ctc", "maybe", 1]),
    "partial_interval": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just("fast")),
    "vad": st.one_of(st.fixed_dictionaries({}, optional={
        "silence_ms": st.integers(-100, 10000), "aggressiveness": st.integers(-1, 5),
        "max_utterance_s": st.floats(-5, 100, allow_nan=False)}), json_values),
    "extra_field": json_values,
})
audio_fields = st.fixed_dictionaries({}, optional={
    "encoding": st.sampled_from(["pcm_s16le", "pcm_f32le", "mulaw", "opus", None]),
    "sample_rate": st.sampled_from([8000, 16000, 22050, 44100, 48000, 0, -1, 10**9, "16000", 16000.5]),
    "channels": st.sampled_from([1, 2, 0, 9, "1"]),
})


@st.composite
def text_messages(draw):
    kind = draw(st.sampled_from(["start", "configure", "finalize", "stop", "unknown", "garbage", "value"]))
    if kind == "garbage":
        return draw(st.text(max_size=60))
    if kind == "value":
        return json.dumps(draw(json_values))
    message = {"type": kind if kind != "unknown" else draw(st.text(max_size=12))}
    if kind in ("start", "configure"):
        message.update(draw(config_fields))
        if kind == "start" and draw(st.booleans()):
            message["audio"] = draw(st.one_of(audio_fields, json_values))
    return json.dumps(message)


@st.composite
def binary_frames(draw):
    choice = draw(st.sampled_from(["speech", "silence", "noise", "raw", "empty"]))
    if choice == "empty":
        return b""
    if choice == "raw":
        return draw(st.binary(max_size=301))
    seconds = draw(st.sampled_from([0.05, 0.3, 0.7, 1.2]))
    signal = {"speech": lambda: voiced(seconds), "silence": lambda: np.zeros(int(16000 * seconds), np.float32),
              "noise": lambda: np.random.default_rng(0).normal(0, 0.3, int(16000 * seconds)).astype(np.float32)}[choice]()
    data = (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


# Engine answers. A real recogniser's hypotheses of a growing utterance do not always extend each other:
# an early partial mishears a word, the final decoded freely (without the stable prefix) disagrees with
# what the partials agreed on. Each answer keeps some words of the utterance's previous hypothesis and
# replaces the rest, from a small vocabulary with case and punctuation variants ("ten," / "Ten" agree,
# "ten" / "10" do not), so runs of agreeing hypotheses make words stable and later ones contradict them.
VOCABULARY = ("go", "Go,", "forward", "for", "ward", "ten", "Ten.", "10", "meters", "metres.")
# Half the answers keep the whole previous hypothesis (so that words can become stable), half keep 0-2 words.
KEEP = (0, 1, 2, 99, 99, 99)
answers = st.tuples(st.sampled_from(KEEP), st.lists(st.sampled_from(VOCABULARY), max_size=3))


class Hypotheses:
    """Per-utterance answers built from (keep, tail) edits of the previous hypothesis."""

    def __init__(self):
        self.last: dict[tuple[str, int], list[str]] = {}

    def answer(self, request, edit) -> InferenceResult:
        keep, tail = edit
        key = (request.session_id, request.utterance_id)
        words = self.last.get(key, [])[:keep] + list(tail)
        self.last[key] = words
        return InferenceResult(text=" ".join(words), language=request.language)


class ContradictingEngine(CountingEngine):
    """The server-side counterpart of :class:`Hypotheses`: the edits come from a seeded generator."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.hypotheses = Hypotheses()
        self.rng = random.Random(seed)

    def transcribe_batch(self, requests):
        with self.lock:
            self.batches.append(list(requests))
            edits = [(self.rng.choice(KEEP), self.rng.choices(VOCABULARY, k=self.rng.randint(0, 3)))
                     for _ in requests]
            return [self.hypotheses.answer(r, e) for r, e in zip(requests, edits)]


# Most cases open with a valid start (with random options), so the audio path is exercised too.
operations = st.builds(
    lambda lead, ops: ([("text", json.dumps({"type": "start", **lead}))] if lead is not None else []) + ops,
    st.one_of(st.none(), st.just({}), config_fields.filter(lambda c: "extra_field" not in c)),
    st.lists(
        st.one_of(text_messages().map(lambda t: ("text", t)), binary_frames().map(lambda b: ("bytes", b)),
                  binary_frames().map(lambda b: ("bytes", b)), answers.map(lambda a: ("complete", a)),
                  st.just(("fail", None))),
        max_size=25,
    ),
)


def words_lead(prefix: str, text: str) -> bool:
    """Whether ``prefix``'s words are the first words of ``text`` (exactly: they were published)."""
    lead = prefix.split()
    return text.split()[: len(lead)] == lead


class Checker:
    def __init__(self):
        self.stable = {}
        self.started, self.ended, self.finished = [], [], []
        self.events = []
        self.stable_finals = 0  # finals of utterances whose partials had made words stable

    def see(self, event):
        self.events.append(event)
        kind = event["type"]
        if kind == "error":
            assert event["code"] in ERROR_CODES and event["message"]
            if "utterance_id" in event:
                self.finish(event["utterance_id"], event)
        elif kind == "speech_started":
            self.started.append(event["utterance_id"])
        elif kind == "speech_ended":
            uid = event["utterance_id"]
            assert uid in self.started and uid not in self.ended, ("speech_ended twice or unstarted", self.ended, event)
            assert all(uid > other for other in self.ended), ("speech_ended out of utterance order", self.ended, event)
            self.ended.append(uid)
        elif kind == "partial":
            uid = event["utterance_id"]
            assert words_lead(event["stable_text"], event["text"]), event
            assert words_lead(self.stable.get(uid, ""), event["stable_text"]), ("stable text revised", self.stable, event)
            self.stable[uid] = event["stable_text"]
        elif kind == "final":
            uid = event["utterance_id"]
            assert words_lead(self.stable.get(uid, ""), event["text"]), ("final drops stable words", self.stable, event)
            self.stable_finals += bool(self.stable.get(uid))
            self.finish(uid, event)
        for key in ("start", "end", "audio_seconds"):
            if key in event:
                assert math.isfinite(event[key]) and event[key] >= 0

    def finish(self, uid, event):
        assert uid in self.ended, ("a final or error before its speech_ended", self.ended, event)
        assert uid not in self.finished, ("a second final or error", self.finished, event)
        self.finished.append(uid)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(operations)
def test_session_core_survives_any_input(ops):
    check = drive_session(ops)
    event(f"utterances: {min(len(check.started), 3)}")
    event(f"errors: {min(sum(e['type'] == 'error' for e in check.events), 3)}")
    event(f"finals after stable words: {min(check.stable_finals, 2)}")


def drive_session(ops) -> Checker:
    """Feed ``ops`` to a session, answer its requests in order, end the stream; check every event."""
    engine = CountingEngine()
    hypotheses = Hypotheses()
    session = Session("fuzz", engine.capabilities, SessionSettings(max_frame_bytes=30000))
    check, pending = Checker(), []

    def run(actions):
        for action in actions:
            if isinstance(action, Send):
                check.see(action.event.to_wire())
            elif isinstance(action, Submit):
                pending.append(action.request)
            else:
                assert isinstance(action, Close)

    for op, payload in ops:
        if op == "text":
            run(session.receive_text(payload))
        elif op == "bytes":
            run(session.receive_bytes(payload))
        elif pending:
            request = pending.pop(0)
            if op == "complete":
                run(session.inference_done(request, hypotheses.answer(request, payload)))
            else:
                run(session.inference_done(request, None, "injected failure"))
    if session.state == State.STREAMING:
        run(session.receive_text('{"type":"stop"}'))
    while pending:  # the rest are answered with words unlike any before: they contradict what is stable
        request = pending.pop(0)
        run(session.inference_done(request, engine.transcribe_batch([request])[0]))
    if session.state == State.CLOSED and check.events and check.events[-1]["type"] == "end":
        assert sorted(check.finished) == sorted(check.ended) == sorted(check.started), (
            check.started, check.ended, check.finished)
        assert [e["type"] for e in check.events].count("end") == 1
    else:
        assert not check.started, ("a stream with speech must have ended with finals and `end`", session.state,
                                   [(e["type"], e.get("code")) for e in check.events])
    return check


def pcm16(signal: np.ndarray) -> bytes:
    return (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()


# The stable-text contract needs utterances whose partials agree for a while and are then contradicted:
# a valid start with partials, then rounds of audio (mostly speech, some pauses, a finalize now and
# then), each followed by up to two engine answers or failures for the oldest requests.
FRAMES = {"speech": lambda s: ("bytes", pcm16(voiced(s))), "pause": lambda s: ("bytes", bytes(int(32000 * s))),
          "finalize": lambda s: ("text", '{"type":"finalize"}')}
frame_ops = st.builds(lambda kind, seconds: FRAMES[kind](seconds),
                      st.sampled_from(["speech"] * 8 + ["pause", "finalize"]), st.sampled_from([0.2, 0.3, 0.5, 0.8]))
answer_ops = st.one_of(answers.map(lambda a: ("complete", a)), answers.map(lambda a: ("complete", a)),
                       answers.map(lambda a: ("complete", a)), st.just(("fail", None)))
stable_text_cases = st.builds(
    lambda interval, rounds: [("text", json.dumps({"type": "start", "partials": True, "partial_interval": interval}))]
    + [op for frame, replies in rounds for op in [frame, *replies]],
    st.sampled_from([0.2, 0.3, 0.5]),
    st.lists(st.tuples(frame_ops, st.lists(answer_ops, max_size=2)), min_size=4, max_size=30),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stable_text_cases)
def test_stable_text_is_never_revised_whatever_the_engine_answers(ops):
    check = drive_session(ops)
    event(f"finals after stable words: {min(check.stable_finals, 2)}")


def test_stable_words_survive_hypotheses_that_contradict_them():
    """The fuzz's contract on one hand-made case: partials agree on "go forward", then a partial and
    the final say otherwise; the published stable words stay, and lead both."""
    def speech(seconds):
        return ("bytes", pcm16(voiced(seconds)))

    # Partials every 1.6 s: the stabilizer counts those over 2 s of audio or more, and wants three
    # of them agreeing over 3 s (PartialStabilizer's defaults).
    ops = [("text", json.dumps({"type": "start", "partials": True, "partial_interval": 1.6})), speech(0.8), speech(0.8)]
    for words in (["go", "forward"], ["go", "forward", "ten"], ["Go,", "forward", "ten", "meters"],
                  ["go", "forward", "10"], ["go", "forward", "ten", "meters"], ["for", "ward", "ten", "metres."]):
        ops += [speech(0.8), speech(0.8), ("complete", (0, words))]
    # The first answer after stop goes to a partial still pending (ignored: the utterance ended).
    ops += [("text", '{"type":"stop"}')] + [("complete", (0, ["metres.", "for", "ward"]))] * 2
    check = drive_session(ops)
    partials = [(e["text"], e["stable_text"]) for e in check.events if e["type"] == "partial"]
    assert partials == [("go forward", ""), ("go forward ten", ""), ("Go, forward ten meters", ""),
                        ("go forward 10", "go forward"), ("go forward ten meters", "go forward"),
                        ("go forward ten metres.", "go forward")]
    # After the stable words, the final's own from the position they end at (it has none in common).
    assert [e["text"] for e in check.events if e["type"] == "final"] == ["go forward ward"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(text_messages().map(lambda t: ("text", t)), binary_frames().map(lambda b: ("bytes", b))),
                    max_size=12))
def test_server_survives_any_input_over_a_socket(socket_server, ops):
    server, loop = socket_server

    async def scenario():
        check = Checker()
        async with connect(server.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "partials": True}))
            for op, payload in ops:
                await ws.send(payload)
            await ws.send(json.dumps({"type": "stop"}))
            try:
                async with asyncio.timeout(20):
                    async for message in ws:
                        check.see(json.loads(message))
            except ConnectionClosed:
                pass
        assert check.events[0]["type"] == "ready"
        assert check.events[-1]["type"] == "end"
        assert sorted(check.finished) == sorted(check.ended) == sorted(check.started)

    loop.run_until_complete(scenario())
    assert server.worker.alive


@pytest.fixture(scope="module")
def socket_server():
    from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer

    loop = asyncio.new_event_loop()
    server = StreamServer(ContradictingEngine(), ServerSettings(network=NetworkSettings(port=0),
                                                                limits=LimitsSettings(realtime_factor=0)))
    loop.run_until_complete(server.start())
    yield server, loop
    loop.run_until_complete(server.close())
    loop.close()
