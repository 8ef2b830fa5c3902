"""The synchronous loopback: a session and an engine end to end, in one call stack, on typed events."""

import numpy as np

from stream_server.core.events import AudioFormat, ConfigChange, End, Error, Final, Finalize, Partial, Ready, SpeechEnded, SpeechStarted, Start, Stop
from stream_server.server.loopback import Loopback
from stream_server.core.multichannel import MultichannelSession
from stream_server.core.session import Close, Session, SessionSettings
from tests.fakes import CountingEngine
from tests.vad.test_vad import silence, voiced

F32 = AudioFormat("pcm_f32le", 16000, 1)


def f32(*parts: np.ndarray) -> bytes:
    return np.concatenate(parts).astype("<f4").tobytes()


def loop(engine=None, **options) -> Loopback:
    engine = engine or CountingEngine()
    session = Session("s", engine.capabilities, SessionSettings())
    looped = Loopback(session, engine)
    [ready] = looped.send(Start(F32, ConfigChange(**options)))
    assert isinstance(ready, Ready) and ready.session_id == "s"
    return looped


def test_speech_then_silence_gives_its_final_after_speech_ended():
    looped = loop(partials=False)
    events = looped.audio(f32(silence(0.5), voiced(2.0), silence(1.5)))
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStarted, SpeechEnded, Final]
    final = events[-1]
    assert isinstance(final, Final) and final.utterance_id == 0
    assert final.start <= 0.5 <= 2.5 <= final.end  # the speech, with the VAD's pre- and post-roll
    # The fake engine's hypothesis of exactly that audio: one word per 0.4 s.
    assert final.text == " ".join(f"w{i}" for i in range(int((final.end - final.start) / 0.4)))
    assert [r.kind for r in looped.requests][-1] == "final"


def test_partials_grow_and_the_final_keeps_their_stable_words():
    looped = loop()
    events = looped.audio(f32(silence(0.3), voiced(3.0), silence(1.5)))
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) >= 3
    assert all(p.text.startswith(p.stable_text) for p in partials)
    [final] = [e for e in events if isinstance(e, Final)]
    assert final.text.startswith(partials[-1].stable_text)


def test_finalize_ends_the_open_utterance_now():
    looped = loop(partials=False)
    assert not [e for e in looped.audio(f32(silence(0.3), voiced(1.2))) if isinstance(e, Final)]
    events = looped.send(Finalize())
    assert [type(e) for e in events] == [SpeechEnded, Final]
    assert isinstance(events[0], SpeechEnded) and events[0].reason == "forced"
    assert looped.closed is None


def test_stop_sends_the_finals_then_end_and_closes():
    looped = loop(partials=False)
    looped.audio(f32(silence(0.3), voiced(1.2)))
    events = looped.send(Stop())
    assert [type(e) for e in events] == [SpeechEnded, Final, End]
    end = events[-1]
    assert isinstance(end, End) and end.utterances == 1
    assert looped.closed == Close(1000, "end of stream")


def test_an_engine_failure_becomes_the_utterances_error():
    looped = loop(CountingEngine(fail_on={0}), partials=False)
    looped.audio(f32(silence(0.3), voiced(1.2)))
    events = looped.send(Stop())
    errors = [e for e in events if isinstance(e, Error)]
    assert len(errors) == 1 and errors[0].utterance_id == 0 and "injected" in errors[0].message
    assert isinstance(events[-1], End) and events[-1].utterances == 1


def test_a_multichannel_session_runs_through_the_same_loop():
    engine = CountingEngine()
    looped = Loopback(MultichannelSession("mc", engine.capabilities, SessionSettings()), engine, max_batch=4)
    [ready] = looped.send(Start(AudioFormat("pcm_f32le", 16000, 2), ConfigChange(partials=False), multichannel=True))
    assert isinstance(ready, Ready) and ready.multichannel and ready.audio.channels == 2
    left = np.concatenate([silence(0.3), voiced(1.2), silence(1.5)])
    right = np.concatenate([silence(1.5), voiced(0.8), silence(0.7)])
    looped.audio(np.stack([left, right], axis=1).astype("<f4").tobytes())
    looped.send(Stop())
    finals = [e for e in looped.events if isinstance(e, Final)]
    assert sorted(f.channel for f in finals) == [0, 1]
    assert isinstance(looped.events[-1], End) and looped.events[-1].utterances == 2
