"""The session core, fed audio and commands directly: no socket, no thread, no model."""

import json

import numpy as np
import pytest

from granite_stream_testing.datasets import read_audio
from stream_server.inference.types import EngineCapabilities, InferenceResult
from stream_server.core.session import Close, Send, Session, SessionSettings, State, Submit
from tests.fakes import CountingEngine

RATE = 16000


def start(session, **fields):
    msg = {"type": "start", "audio": {"encoding": "pcm_s16le", "sample_rate": RATE}, **fields}
    return session.receive_text(json.dumps(msg))


def pcm(samples):
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class Harness:
    """Executes Submit actions on the fake engine immediately (or holds them) and records events.

    Held requests stand for queued ones: a ``refresh_only`` partial replaces the held partial of its
    utterance, or is dropped when none is held, as the worker's scheduler does.
    """

    def __init__(self, session, engine, hold=False):
        self.session, self.engine, self.hold = session, engine, hold
        self.events, self.closed, self.held = [], None, []
        self.dropped_refreshes = []  # refresh_only partials that found nothing held to replace
        self.deferred = None  # a list: "superseded" answers wait there until deliver_deferred()

    def run(self, actions):
        for action in actions:
            if isinstance(action, Send):
                self.events.append(action.event.to_wire())
            elif isinstance(action, Close):
                self.closed = action
            elif isinstance(action, Submit):
                if self.hold:
                    self._queue(action.request)
                else:
                    result = self.engine.transcribe_batch([action.request])[0]
                    self.run(self.session.inference_done(action.request, result))

    def _queue(self, request):
        if request.refresh_only:
            waiting = [r for r in self.held if r.kind == "partial" and r.utterance_id == request.utterance_id]
            if not waiting:
                self.dropped_refreshes.append(request)
                self._superseded(request)  # nothing to refresh
                return
            self.held.remove(waiting[0])
            self._superseded(waiting[0])  # replaced by the refresh
        self.held.append(request)

    def _superseded(self, request):
        # The worker answers "superseded" through the event loop, i.e. a little later; deferred
        # answers let a test look at the session in between.
        if self.deferred is not None:
            self.deferred.append(request)
        else:
            self.run(self.session.inference_done(request, None))

    def deliver_deferred(self):
        deferred, self.deferred = self.deferred or [], None
        for request in deferred:
            self.run(self.session.inference_done(request, None))

    def release(self):
        held, self.held = self.held, []
        for request in held:
            self.run(self.session.inference_done(request, self.engine.transcribe_batch([request])[0]))

    def feed(self, samples, chunk=1600):
        data = pcm(samples)
        for i in range(0, len(data), chunk * 2):
            self.run(self.session.receive_bytes(data[i : i + chunk * 2]))

    def of(self, kind):
        return [e for e in self.events if e["type"] == kind]


@pytest.fixture
def engine():
    return CountingEngine()


@pytest.fixture
def speech(librivox_clips):
    """Two real utterances separated by 1.5 s of silence, with silence around them."""
    a, rate_a = read_audio(librivox_clips[0])
    b, rate_b = read_audio(librivox_clips[1])
    assert rate_a == rate_b == RATE
    gap = np.zeros(int(1.5 * RATE), np.float32)
    return np.concatenate([gap[: RATE // 2], a, gap, b, gap])


def new_session(engine, **settings):
    return Session("s1", engine.capabilities, SessionSettings(**settings))


def test_start_returns_ready_with_engine_and_effective_config(engine):
    session = new_session(engine)
    [action] = start(session, language="fr", keywords=["Granite"])
    ready = action.event.to_wire()
    assert ready["type"] == "ready" and ready["protocol"] == 1 and ready["session_id"] == "s1"
    assert ready["engine"]["name"] == "fake" and "transcribe" in ready["engine"]["tasks"]
    assert ready["config"]["language"] == "fr" and ready["config"]["keywords"] == ["Granite"]
    assert ready["config"]["audio"] == {"encoding": "pcm_s16le", "sample_rate": RATE, "channels": 1}
    assert session.state == State.STREAMING


def test_audio_before_start_is_an_error_and_start_still_works(engine):
    session = new_session(engine)
    [action] = session.receive_bytes(b"\x00\x01" * 100)
    assert action.event.to_wire()["code"] == "not_started" and not action.event.to_wire()["fatal"]
    assert start(session)[0].event.to_wire()["type"] == "ready"


@pytest.mark.parametrize(
    "message, code",
    [("{oops", "bad_json"), ('{"type":"jump"}', "unknown_type"), ('{"type":"start","language":3}', "bad_config"),
     ('{"type":"configure"}', "not_started"), ('{"type":"finalize"}', "not_started")],
)
def test_bad_messages_before_start_leave_session_usable(engine, message, code):
    session = new_session(engine)
    [action] = session.receive_text(message)
    assert action.event.to_wire()["type"] == "error" and action.event.to_wire()["code"] == code
    assert start(session)[0].event.to_wire()["type"] == "ready"


def test_second_start_and_bad_configure_are_non_fatal(engine):
    session = new_session(engine)
    start(session)
    [action] = start(session)
    assert action.event.to_wire()["code"] == "already_started"
    [action] = session.receive_text('{"type":"configure","task":1}')
    assert action.event.to_wire()["code"] == "bad_config"
    assert session.state == State.STREAMING


def test_a_malformed_field_is_refused_after_the_state_and_audio_checks_as_before_typing(engine):
    """Configuration fields are typed at the JSON edge, yet a message still meets the session's
    checks in their order: its state (not_started, already_started), a start's audio ranges, then
    its fields."""
    session = new_session(engine)
    [action] = session.receive_text('{"type":"configure","keywords":"IBM"}')
    assert action.event.to_wire()["code"] == "not_started"
    [action] = start(session, language=7, audio={"sample_rate": 4000})
    assert action.event.to_wire()["code"] == "bad_config" and "sample_rate" in action.event.to_wire()["message"]
    [action] = start(session, vad={"silence_ms": "long"})
    assert action.event.to_wire()["message"] == "vad.silence_ms must be an integer, got 'long'"
    start(session)
    [action] = start(session, language=7)
    assert action.event.to_wire()["code"] == "already_started"
    [action] = session.receive_text('{"type":"configure","colour":"blue","vad":{"volume":3}}')
    assert action.event.to_wire()["message"] == "unknown field(s) in configure: colour"
    # a vad change invalid only with the settings it keeps comes before a later malformed field
    [action] = session.receive_text('{"type":"configure","vad":{"silence_ms":10},"diarize":"yes"}')
    assert action.event.to_wire()["message"].startswith("vad: ")
    assert session.state == State.STREAMING


def test_a_mono_session_refuses_multichannel_as_an_unknown_field(engine):
    session = new_session(engine)
    [action] = start(session, multichannel=False)
    assert action.event.to_wire()["message"] == "unknown field(s) in start: multichannel"
    assert session.state == State.AWAITING_START


def test_missing_capability_is_bad_config_naming_it():
    caps = EngineCapabilities(name="whisper", model="tiny.en", languages=("en",), tasks=("transcribe",))
    session = Session("s", caps)
    [action] = start(session, task="translate", language="en", target_language="de")
    assert action.event.to_wire()["code"] == "bad_config" and "translate" in action.event.to_wire()["message"]
    assert session.state == State.AWAITING_START
    [action] = start(session, language="de")
    assert "'de'" in action.event.to_wire()["message"]
    assert start(session)[0].event.to_wire()["type"] == "ready"
    [action] = session.receive_text('{"type":"configure","task":"translate"}')
    assert action.event.to_wire()["code"] == "bad_config" and not action.event.to_wire()["fatal"]
    assert session.state == State.STREAMING


@pytest.mark.slow
def test_real_speech_gives_partials_finals_and_end(engine, speech):
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session))
    h.feed(speech)
    h.run(session.receive_text('{"type":"stop"}'))
    kinds = [e["type"] for e in h.events]
    assert kinds[0] == "ready" and kinds[-1] == "end"
    assert h.closed == Close(1000, "end of stream")
    started, finals = h.of("speech_started"), h.of("final")
    assert len(started) == len(finals) == 2
    assert [f["utterance_id"] for f in finals] == [s["utterance_id"] for s in started] == [0, 1]
    assert all(f["text"] for f in finals)
    assert h.of("partial"), "partials are produced while speech is open"
    end = h.events[-1]
    assert end["utterances"] == 2 and abs(end["audio_seconds"] - len(speech) / RATE) < 0.05
    # Each partial's stable_text is a prefix of its text, and within an utterance stable text only grows
    # and is a prefix of the final.
    for final in finals:
        partials = [p for p in h.of("partial") if p["utterance_id"] == final["utterance_id"]]
        previous = ""
        for p in partials:
            assert p["text"].startswith(p["stable_text"])
            assert p["stable_text"].startswith(previous)
            # A partial covers audio up to when it was asked, which can run into the closing silence.
            assert p["start"] == final["start"] and p["end"] <= final["end"] + 0.5 + 0.1
            previous = p["stable_text"]
        assert final["text"].startswith(previous)


@pytest.mark.slow
def test_every_voiced_second_lands_in_a_final(engine, speech, librivox_clips):
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session))
    h.feed(speech, chunk=777)  # odd-sized frames
    h.run(session.receive_text('{"type":"stop"}'))
    finals = h.of("final")
    a_len = len(read_audio(librivox_clips[0])[0]) / RATE
    b_start = 0.5 + a_len + 1.5
    b_len = len(read_audio(librivox_clips[1])[0]) / RATE
    # The voiced regions lie inside the clips; each clip's speech must be inside one final.
    first, second = finals
    assert first["start"] <= 0.5 + 0.3 and first["end"] >= 0.5 + a_len - 0.3
    assert second["start"] <= b_start + 0.3 and second["end"] >= b_start + b_len - 0.3
    assert first["end"] <= second["start"]


def test_finalize_ends_the_utterance_now_and_stop_flushes(engine):
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session, partials=False))
    voiced = _buzz(2.0)
    h.feed(np.concatenate([np.zeros(RATE // 2, np.float32), voiced]))
    assert len(h.of("speech_started")) == 1 and not h.of("final")
    h.run(session.receive_text('{"type":"finalize"}'))
    [final] = h.of("final")
    assert final["end"] == pytest.approx(2.5, abs=0.02)
    assert not h.of("partial")
    h.feed(voiced)
    h.run(session.receive_text('{"type":"stop"}'))
    assert len(h.of("final")) == 2 and h.events[-1]["type"] == "end"


def test_finals_are_sent_in_utterance_order_even_if_answered_out_of_order(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session, partials=False))
    for _ in range(2):
        h.feed(_buzz(1.0))
        h.run(session.receive_text('{"type":"finalize"}'))
        h.feed(np.zeros(RATE, np.float32))
    first, second = h.held
    h.held = [second, first]
    h.release()
    assert [f["utterance_id"] for f in h.of("final")] == [0, 1]


def test_configure_applies_from_the_next_utterance(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session, language="fr", partials=False))
    h.feed(_buzz(1.2))
    h.run(session.receive_text('{"type":"configure","task":"translate","target_language":"en"}'))
    assert h.events[-1]["type"] == "configured"
    h.run(session.receive_text('{"type":"finalize"}'))
    h.feed(np.zeros(RATE, np.float32))
    h.feed(_buzz(1.2))
    h.run(session.receive_text('{"type":"finalize"}'))
    assert [r.task for r in h.held] == ["transcribe", "translate"]
    h.release()
    first, second = h.of("final")
    assert first["task"] == "transcribe" and second["task"] == "translate" and second["text"].isupper()


def test_failed_final_becomes_an_error_naming_the_utterance():
    engine = CountingEngine(fail_on={0})
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session, partials=False))
    h.feed(_buzz(1.0))
    h.run(session.receive_text('{"type":"stop"}'))
    [request] = h.held
    h.run(session.inference_done(request, None, "RuntimeError: boom"))
    error = h.of("error")[0]
    assert error["utterance_id"] == 0 and "boom" in error["message"] and not error["fatal"]
    assert h.events[-1]["type"] == "end"


def _answer_partials(h, session, count):
    """Answer ``count`` held partials by hand, 0.5 s of audio apart, with growing agreeing hypotheses
    ("w0 w1 w2", then one word more each time)."""
    for n in range(3, 3 + count):
        [request] = [r for r in h.held if r.kind == "partial"]
        h.held.remove(request)
        h.run(session.inference_done(request, InferenceResult(" ".join(f"w{i}" for i in range(n)))))
        h.feed(_buzz(0.5))


def test_final_contradicting_stable_text_keeps_the_stable_words(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session))
    h.feed(_buzz(2.0))
    # Answer the partials by hand so "w0 w1 w2" becomes stable (agreeing hypotheses over at least
    # 2 s of audio, spanning 3 s of it: seven, one every 0.5 s).
    _answer_partials(h, session, 7)
    assert h.of("partial")[-1]["stable_text"] == "w0 w1 w2"
    h.held.clear()
    h.run(session.receive_text('{"type":"finalize"}'))
    [final_request] = h.held
    assert final_request.prefix == ""  # decoded freely, not forced
    # The free decode disagrees on a published word: the published words stand for the words of
    # the decode they align with, and the rest of the decode follows them (no second decode).
    h.run(session.inference_done(final_request, InferenceResult("v0 w1 w2 w3 w4")))
    assert h.of("final")[0]["text"] == "w0 w1 w2 w3 w4"
    assert len(h.held) == 1, "no second decode"


def test_stable_agreement_setting_sets_how_much_audio_stable_words_need(engine):
    """Four agreeing partials 0.5 s apart span 1.5 s: stable at stable_agreement_s=1.5, not at the default."""

    def stable_after_four(**settings) -> str:
        session = new_session(engine, **settings)
        h = Harness(session, engine, hold=True)
        h.run(start(session))
        h.feed(_buzz(2.0))
        _answer_partials(h, session, 4)
        return h.of("partial")[-1]["stable_text"]

    assert stable_after_four() == ""
    assert stable_after_four(stable_agreement_s=1.5) == "w0 w1 w2"


def test_too_large_frame_and_nonfinite_audio_are_reported(engine):
    session = Session("s", engine.capabilities, SessionSettings(max_frame_bytes=1000))
    start(session)
    [action] = session.receive_bytes(b"\0" * 1002)
    assert action.event.to_wire()["code"] == "too_large"
    session2 = new_session(engine)
    session2.receive_text(json.dumps({"type": "start", "audio": {"encoding": "pcm_f32le"}}))
    actions = session2.receive_bytes(np.array([np.nan, 0.0], "<f4").tobytes())
    assert actions[0].event.to_wire()["code"] == "bad_audio" and not actions[0].event.to_wire()["fatal"]


def test_connection_lost_ignores_late_results(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session, partials=False))
    h.feed(_buzz(1.0))
    h.run(session.receive_text('{"type":"finalize"}'))
    session.connection_lost()
    [request] = h.held
    assert session.inference_done(request, InferenceResult("late")) == []


def _buzz(seconds):
    """A harmonic-rich, amplitude-modulated pulse train that webrtcvad reliably calls speech."""
    from tests.vad.test_vad import voiced  # the VAD tests own the synthetic speech-like signal

    return voiced(seconds).astype(np.float32)


# ---- early finals: decode when the pause starts, publish when the VAD decides -------------------


def _final_requests(engine):
    return [r for batch in engine.batches for r in batch if r.kind == "final"]


def _feed_tracking(h, samples, chunk=480):
    """Feed in 30 ms frames; return, per final event, how many final decodes were asked in its frame."""
    asked_in_frame = []
    data = pcm(samples)
    for i in range(0, len(data), chunk * 2):
        finals_before, asked_before = len(h.of("final")), len(_final_requests(h.engine))
        h.run(h.session.receive_bytes(data[i : i + chunk * 2]))
        for _ in h.of("final")[finals_before:]:
            asked_in_frame.append(len(_final_requests(h.engine)) - asked_before)
    return asked_in_frame


def test_early_final_is_published_the_moment_the_silence_ends_speech():
    on, off = CountingEngine(), CountingEngine()
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), _buzz(2.0), np.zeros(RATE, np.float32)])
    h_on = Harness(new_session(on, early_final_s=0.2), on)
    h_off = Harness(new_session(off, early_final_s=0), off)
    for h in (h_on, h_off):
        h.run(start(h.session, partials=False))
    asked_on = _feed_tracking(h_on, audio)
    asked_off = _feed_tracking(h_off, audio)
    # Without early finals the decode is asked when the end is decided; with them it was done before,
    # so the frame that ends speech publishes the final without waiting for a decode.
    assert asked_off == [1] and asked_on == [0]
    [final_on], [final_off] = h_on.of("final"), h_off.of("final")
    assert {k: final_on[k] for k in ("text", "start", "end")} == {k: final_off[k] for k in ("text", "start", "end")}
    assert len(_final_requests(on)) == 1  # a single unbroken pause costs no extra decode


def test_early_final_is_discarded_when_speech_resumes_and_nothing_is_lost():
    engine = CountingEngine()
    # A 350 ms pause: past early_final_s (200 ms), short of silence_ms (500 ms), so one utterance.
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), _buzz(1.6), np.zeros(int(0.35 * RATE), np.float32),
                            _buzz(1.2), np.zeros(RATE, np.float32)])
    session = new_session(engine, early_final_s=0.2)
    h = Harness(session, engine, hold=True)  # the early answer arrives late, after speech resumed
    h.run(start(session, partials=False))
    h.feed(audio[: int((0.5 + 1.6 + 0.3) * RATE)], chunk=480)
    [early] = h.held
    # Pre-roll (0.3 s) + the first stretch + post-roll (0.15 s): the audio the pause would cut.
    assert early.kind == "final" and early.duration < 0.3 + 1.6 + 0.2
    h.feed(audio[int((0.5 + 1.6 + 0.3) * RATE):], chunk=480)
    h.release()
    h.release()  # the real final, asked after the long silence
    [final] = h.of("final")
    assert len(h.of("speech_started")) == 1
    assert final["end"] - final["start"] > 0.3 + 1.6 + 0.35 + 1.2  # both stretches of speech, not the early cut
    assert final["text"] == engine.text_for(_final_requests(engine)[-1])
    h.run(session.receive_text('{"type":"stop"}'))
    assert h.events[-1]["type"] == "end" and h.events[-1]["utterances"] == 1


def test_failed_early_final_is_asked_again_at_the_end():
    engine = CountingEngine()
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), _buzz(1.5), np.zeros(RATE, np.float32)])
    session = new_session(engine, early_final_s=0.2)
    h = Harness(session, engine, hold=True)
    h.run(start(session, partials=False))
    h.feed(audio[: int((0.5 + 1.5 + 0.3) * RATE)], chunk=480)
    [early] = h.held
    h.held = []
    assert session.inference_done(early, None, "CUDA out of memory (simulated)") == []
    h.feed(audio[int((0.5 + 1.5 + 0.3) * RATE):], chunk=480)
    [again] = h.held
    assert again is not early and len(again.audio) == len(early.audio)
    h.release()
    [final] = h.of("final")
    assert final["text"] == engine.text_for(again) and not [e for e in h.events if e["type"] == "error"]


# ---- partials under load: a waiting partial is refreshed, not left to go stale -------------------


def _until_partial_asked(h):
    """Feed speech 100 ms at a time until the session asks for its first partial; return it."""
    buzz = _buzz(3.0)
    for i in range(0, len(buzz), RATE // 10):
        h.feed(buzz[i : i + RATE // 10])
        asked = [r for r in h.held if r.kind == "partial"]
        if asked:
            [request] = asked
            return request
    raise AssertionError("no partial was asked for in 3 s of speech")


def test_a_partial_still_waiting_in_the_queue_is_refreshed_with_newer_audio(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)  # held = queued: the worker is busy with others
    h.run(start(session))
    first = _until_partial_asked(h)
    assert not first.refresh_only
    h.feed(_buzz(1.0))  # two more intervals of audio while it waits
    [waiting] = [r for r in h.held if r.kind == "partial"]
    assert waiting.refresh_only and len(waiting.audio) >= len(first.audio) + RATE
    h.release()
    [partial] = h.of("partial")
    assert partial["end"] - partial["start"] == pytest.approx(len(waiting.audio) / RATE, abs=1e-3)


def test_a_refresh_of_a_started_partial_is_dropped_and_the_cadence_resumes_when_it_answers(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session))
    running = _until_partial_asked(h)
    h.held.remove(running)  # the worker took it: a refresh finds nothing queued
    h.feed(_buzz(1.0))
    assert not [r for r in h.held if r.kind == "partial"], "no second partial runs beside the first"
    h.run(session.inference_done(running, InferenceResult("w0")))
    # Its answer is a second of audio old: the next partial is asked for at once, on all the audio.
    [following] = [r for r in h.held if r.kind == "partial"]
    assert not following.refresh_only and len(following.audio) >= len(running.audio) + RATE
    assert [p["text"] for p in h.of("partial")] == ["w0"]



def test_without_refreshes_a_waiting_partial_keeps_the_audio_it_was_asked_with(engine):
    session = new_session(engine, refresh_waiting_partials=False)
    h = Harness(session, engine, hold=True)
    h.run(start(session))
    first = _until_partial_asked(h)
    h.feed(_buzz(1.0))
    assert [r for r in h.held if r.kind == "partial"] == [first]


def test_a_running_partial_gets_one_refresh_attempt_per_interval_not_one_per_frame(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session))
    running = _until_partial_asked(h)
    h.held.remove(running)  # started: every refresh is dropped until it answers
    h.feed(_buzz(2.0))  # 20 frames of 100 ms, 4 intervals of 0.5 s
    assert 3 <= len(h.dropped_refreshes) <= 4


def test_no_third_partial_is_asked_for_while_a_replacement_is_unconfirmed(engine):
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session))
    first = _until_partial_asked(h)
    h.deferred = []  # the queue's answers lag: the replaced one is not yet reported superseded
    h.feed(_buzz(0.6))
    [refresh] = [r for r in h.held if r.kind == "partial"]
    assert refresh.refresh_only and h.deferred == [first]
    h.feed(_buzz(1.0))  # two more intervals: no further refresh while two are unaccounted for
    assert [r for r in h.held if r.kind == "partial"] == [refresh] and h.deferred == [first]
    h.deliver_deferred()
    h.feed(_buzz(0.6))
    [newest] = [r for r in h.held if r.kind == "partial"]
    assert newest is not refresh and newest.refresh_only and len(newest.audio) > len(refresh.audio)


def test_an_utterance_cut_at_max_length_is_decoded_with_the_text_before_the_cut(engine):
    """Speech longer than vad.max_utterance_s is cut into pieces; each piece after the first is
    decoded knowing what the piece before it said (its final), and an utterance after a real pause
    is not."""
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session, partials=False, vad={"max_utterance_s": 2.0}))
    h.feed(_buzz(3.5))
    h.feed(np.zeros(RATE, np.float32))
    h.feed(_buzz(1.2))
    h.run(session.receive_text('{"type":"stop"}'))
    finals = h.of("final")
    assert len(finals) == 3 and finals[0]["end"] == finals[1]["start"]  # cut, then a pause
    reasons = [e["reason"] for e in h.of("speech_ended")]
    assert reasons[0] == "max_length" and reasons[-1] == "forced"  # the cut, and the stop
    requests = {r.utterance_id: r for r in _final_requests(engine)}  # the last request per utterance
    assert requests[0].context == ""
    assert requests[1].context == finals[0]["text"] != ""
    assert requests[2].context == ""


class EchoingEngine(CountingEngine):
    """Says the last two words of its context again before the piece's own words, as Whisper does
    when the cut lies behind audio the piece before already transcribed."""

    def text_for(self, request) -> str:
        echo = " ".join(request.context.split()[-2:])
        return f"{echo} {super().text_for(request)}".strip()


def test_a_piece_after_a_cut_does_not_say_again_what_the_piece_before_published():
    engine = EchoingEngine()
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session, vad={"max_utterance_s": 2.0}))
    h.feed(_buzz(4.5))
    h.run(session.receive_text('{"type":"stop"}'))
    finals = h.of("final")
    assert len(finals) >= 2 and finals[0]["end"] == finals[1]["start"]
    before_words = finals[0]["text"].split()
    echoed = [r for r in _final_requests(engine) if r.context]
    assert echoed and engine.text_for(echoed[0]).split()[:2] == before_words[-2:]  # the engine echoed
    assert finals[1]["text"].split()[:2] != before_words[-2:]
    assert finals[1]["text"] == CountingEngine().text_for(echoed[0])  # its own words, all of them
    later = [p for p in h.of("partial") if p["utterance_id"] == finals[1]["utterance_id"]]
    assert all(p["text"].split()[:2] != before_words[-2:] for p in later)


@pytest.mark.parametrize("how", ["silence", "finalize"])
def test_an_utterance_right_after_a_short_pause_or_a_finalize_gets_no_context(engine, how):
    """With a short silence_ms the VAD floors the next start at the previous end (a pause shorter than
    pre-roll + post-roll), exactly as after a cut; it is new speech all the same, decoded without the
    text before it."""
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session, partials=False, vad={"silence_ms": 200}))
    h.feed(_buzz(1.2))
    if how == "finalize":
        h.run(session.receive_text('{"type":"finalize"}'))
    else:
        h.feed(np.zeros(int(0.3 * RATE), np.float32))
    h.feed(_buzz(1.2))
    h.run(session.receive_text('{"type":"stop"}'))
    finals = h.of("final")
    assert len(finals) == 2 and finals[0]["end"] == finals[1]["start"]  # the case that looks like a cut
    requests = {r.utterance_id: r for r in _final_requests(engine)}
    assert requests[1].context == ""
    assert [e["reason"] for e in h.of("speech_ended")] == ["forced" if how == "finalize" else "silence", "forced"]
