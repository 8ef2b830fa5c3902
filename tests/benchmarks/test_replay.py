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


def _plan_result(wer: float, dropped: int, stable_share: float) -> dict:
    causes = {"cut": 0, "boundary": 0, "loop_guard": 0, "decode": dropped, "stable": 0, "splice": 0}
    return {"clips": 88, "wer": wer, "offline_wer": 0.0324, "ratio": round(wer / 0.0324, 3),
            "dropped_words": {"offline_words": 1239, "dropped": dropped, "by_cause": causes,
                              "right_by_cause": dict(causes, decode=dropped // 2),
                              "stable_ledger": {"saved": dropped // 5, "lost": 1}},
            "stable_revisions": 0, "partials": 400, "stable_at_last_partial": stable_share}


def test_plans_pool_into_one_figure_per_set_and_each_is_printed():
    from benchmarks.replay import format_table, pool_plans

    # Seeds 0 and 1 of the ninth session's asterisk-en replay: 3.48 % and 4.29 %.
    pooled = pool_plans({0: _plan_result(0.0348, 13, 0.39), 1: _plan_result(0.0429, 15, 0.37)})
    assert pooled["wer"] == (0.0348 + 0.0429) / 2 and pooled["ratio"] == round(pooled["wer"] / 0.0324, 3)
    assert pooled["dropped_words"]["dropped"] == 28 and pooled["dropped_words"]["offline_words"] == 2478
    assert pooled["dropped_words"]["by_cause"]["decode"] == 28 and pooled["dropped_words"]["right_by_cause"]["decode"] == 13
    assert pooled["partials"] == 800 and pooled["stable_at_last_partial"] == 0.38
    assert pooled["dropped_words"]["stable_ledger"] == {"saved": 5, "lost": 2}
    table = format_table({"asterisk-en": pooled}).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| asterisk-en, seed 0", "| asterisk-en, seed 1",
                                                           "| asterisk-en, 2 plans"]
    assert "| 1.199 |" in table[-1] and "| 5/2 |" in table[-1]
    # One plan prints as before: one row named by the set.
    assert format_table({"asterisk-en": _plan_result(0.0348, 13, 0.39)}).splitlines()[2].startswith("| asterisk-en |")


def test_a_split_the_set_lacks_is_a_usage_error_before_any_model_loads(capsys, monkeypatch):
    import pytest

    from benchmarks import common, replay

    monkeypatch.setattr(common, "offline_engine", lambda args: pytest.fail("the engine loaded"))
    with pytest.raises(SystemExit) as exit_:
        replay.main(["--sets", "librivox", "--split", "eval"])
    assert exit_.value.code == 2
    assert "only a 'dev' split" in capsys.readouterr().err
