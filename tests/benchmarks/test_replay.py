"""``granite-stream bench replay``: the one-stream accuracy pass through the real session and the
public loopback, every request decoded at once (deterministic, no clock)."""

import numpy as np

from benchmarks import scoring
from benchmarks.loadgen import PlannedClip, StreamPlan
from benchmarks.replay import replay_stream, stable_share
from granite_stream_testing.datasets import Clip
from stream_server.core.events import ConfigChange, Start
from stream_server.core.session import Session, SessionSettings
from stream_server.server.loopback import Loopback
from tests.fakes import CountingEngine
from tests.vad.test_vad import silence, voiced


def plan() -> StreamPlan:
    """Two clips of synthetic speech (5 s and 2 s) with pauses, as the load generator lays them out."""
    parts = [silence(0.5), voiced(5.0), silence(1.5), voiced(2.0), silence(1.5)]
    audio = np.concatenate(parts)
    clips = [PlannedClip(Clip("fake/a", None, " ".join(f"w{i}" for i in range(13)), "en", 16000, "fake"), 0.5, 5.5),  # type: ignore[arg-type]
             PlannedClip(Clip("fake/b", None, "w0 w1 w2 w3 w4", "en", 16000, "fake"), 7.0, 9.0)]  # type: ignore[arg-type]
    return StreamPlan(0, 16000, audio, clips, "en")


def finals(slog) -> list[str]:
    return [ev["text"] for _, ev in slog.messages if ev["type"] == "final"]


def test_the_replay_gives_the_finals_transcribe_gives():
    from stream_server.cli import stream_audio

    p = plan()
    replayed = replay_stream(CountingEngine(), p)
    engine = CountingEngine()
    # `granite-stream transcribe`'s path: float frames of 0.1 s through a Loopback.
    events = stream_audio(Loopback(Session("t", engine.capabilities, SessionSettings()), engine), p.audio,
                          Start(options=ConfigChange(language="en")))
    assert finals(replayed) == [e["text"] for e in events if e["type"] == "final"]
    assert len(finals(replayed)) == 2 and replayed.messages[-1][1]["type"] == "end"
    # It scores as a real pass does: one final per clip, in its clip.
    result = scoring.score(replayed)
    assert [c.finals for c in result.clips] == [1, 1]
    assert all(c.hypothesis for c in result.clips)


def test_partials_run_at_their_full_cadence_and_the_replay_is_deterministic():
    p = plan()
    first = replay_stream(CountingEngine(), p, partial_interval=0.5)
    partials = [ev for _, ev in first.messages if ev["type"] == "partial" and ev["utterance_id"] == 0]
    # No queueing: a partial every 0.5 s of the utterance's audio, each answered before the next frame.
    gaps = np.diff([ev["end"] for ev in partials])
    assert len(partials) >= 4 and np.allclose(gaps, 0.5, atol=0.05)
    assert [ev for _, ev in replay_stream(CountingEngine(), p, partial_interval=0.5).messages] == \
        [ev for _, ev in first.messages]
    # What the user saw early: the stable words at each utterance's last partial, against its final.
    stable, words = stable_share(first)
    assert 0 < stable <= words == sum(len(f.split()) for f in finals(first))


def test_finals_only_asks_for_no_partials():
    slog = replay_stream(CountingEngine(), plan(), partials=False)
    assert not [ev for _, ev in slog.messages if ev["type"] == "partial"]
    assert finals(slog) == finals(replay_stream(CountingEngine(), plan()))
    assert stable_share(slog)[0] == 0
