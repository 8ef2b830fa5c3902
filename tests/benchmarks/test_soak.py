"""The CI version of the soak benchmark: 2 minutes, 2 real-time real-speech streams, server in its own process."""

import pytest

from benchmarks.soak import lost_utterances, rss_growth, soak

pytestmark = pytest.mark.slow


def test_lost_utterance_accounting():
    ok = [{"type": "speech_started", "utterance_id": 0}, {"type": "final", "utterance_id": 0},
          {"type": "speech_started", "utterance_id": 1}, {"type": "error", "code": "internal", "utterance_id": 1}]
    assert lost_utterances(ok) == []
    assert lost_utterances(ok + [{"type": "speech_started", "utterance_id": 2}]) == [2]
    assert lost_utterances(ok + [{"type": "final", "utterance_id": 0}]) == [0]
    assert rss_growth([100] * 20 + [110] * 20) == pytest.approx(0.10, abs=0.06)


async def test_two_minute_soak_loses_nothing_and_does_not_grow():
    report = await soak(minutes=2, streams=2)
    print(report)
    assert report["rounds"] >= 1 and report["utterances"] >= 20
    assert report["lost"] == 0
    assert report["finals"] + report["errors"] >= report["utterances"]
    # Two minutes are mostly warm-up: RSS swings by ±40 % between rounds as CTranslate2 and glibc
    # caches fill (seen here), so the 1 % growth bound belongs to the 1-hour manual run
    # (docs/operations.md). What two minutes can show: memory stays within its early peak.
    assert report["rss_last_mb"] <= 1.25 * report["rss_first_half_peak_mb"]
