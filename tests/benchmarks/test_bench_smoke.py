"""Smoke test of ``granite-stream bench``: two real clips, one stream, the in-process server.

Runs the whole harness end to end (offline references, accuracy pass, a one-level sweep, JSON,
table, plots) on the bundled Whisper tiny.en; well under a minute on two idle CPU cores.
"""

from __future__ import annotations

import json
import math
import time

import pytest

pytestmark = pytest.mark.slow

REQUIRED_LEVEL_FIELDS = {
    "streams", "clips", "clips_finalized", "final_latency", "first_partial_latency", "partial_lag",
    "stable_revisions", "wer", "cer", "stream_wer", "lag_growth_s", "sustained", "verdict", "server_resources",
}


def test_bench_smoke(librivox_clips, tmp_path, capsys):
    pytest.importorskip("jiwer")
    from benchmarks.cli import main

    out = tmp_path / "bench"
    began = time.monotonic()
    status = main([
        "--sets", "librivox", "--limit", "2", "--server", "inprocess", "--accuracy-streams", "1", "--accuracy-plans", "2",
        "--speed", "2", "--pause", "0.8,1.0", "--levels", "1", "--level-seconds", "4",
        "--offline", "engine,faster_whisper", "--out", str(out),
    ])
    elapsed = time.monotonic() - began
    assert status == 0
    # Only a hang fails on time: under 60 s on an idle 2-core machine, but CI's share of one varies.
    assert elapsed < 600, f"smoke benchmark took {elapsed:.0f} s"

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "granite-stream-bench/1"
    assert {"nproc", "cpu_model", "ram_gb"} <= set(results["machine"])
    entry = results["sets"]["librivox"]
    streaming = entry["streaming"]
    # Two stream plans (seeds 0 and 1) of the two clips, pooled: the WER is the plans' mean (the
    # same reference words in each), and each plan's own WER is kept.
    assert streaming["clips"] == 4 and streaming["clips_finalized"] == 4
    assert list(streaming["plans"]) == ["0", "1"]
    assert streaming["wer"] == pytest.approx(sum(streaming["plans"].values()) / 2)
    assert (out / "logs-accuracy-librivox-seed1.json.gz").stat().st_size > 0
    assert REQUIRED_LEVEL_FIELDS - {"sustained", "verdict", "server_resources"} <= set(streaming)
    for key in ("p50", "p95"):
        assert math.isfinite(float(streaming["final_latency"][key]))
    assert streaming["stable_revisions"] == 0
    assert isinstance(streaming["wer"], float) and math.isfinite(streaming["wer"]) and streaming["wer"] < 0.5
    for mode in ("engine", "faster_whisper"):
        wer = entry["offline"][mode]["wer"]
        assert math.isfinite(wer) and wer < 0.5
        assert entry["wer_ratio"][mode] is None or math.isfinite(entry["wer_ratio"][mode])
    detail = streaming["clips_detail"]
    assert all(c["hypothesis"] for c in detail)
    # Words of the offline decode the finals dropped, per cause; they add up, clip by clip.
    drops = entry["dropped_words"]
    assert drops["clips"] == 4 and drops["offline_words"] > 20
    assert drops["dropped"] == sum(drops["by_cause"].values()) == sum(c["dropped"] for c in drops["clips_detail"])
    assert "dropped_words_stable_or_splice" in results["targets"]
    # ... and of them, those the offline decode had right against the reference (what the target counts).
    right = drops["right_by_cause"]
    assert all(0 <= right[c] <= drops["by_cause"][c] for c in drops["by_cause"])
    assert "dropped_right_words_stable_or_splice" in results["targets"]
    # The other side: reference words the stable words saved and lost, summed over the clips.
    assert drops["stable_ledger"] == {side: sum(c["stable_ledger"][side] for c in drops["clips_detail"])
                                      for side in ("saved", "lost")}
    assert results["targets"]["stable_words_saved_lost"] == [drops["stable_ledger"]["saved"], drops["stable_ledger"]["lost"]]

    system = results["sweep"]["systems"]["granite-stream"]
    level = system["levels"][0]
    assert REQUIRED_LEVEL_FIELDS <= set(level)
    assert level["server_resources"]["rss_peak_mb"] > 0
    assert system["sustained_streams"] in (0, 1)
    assert "targets" in results

    printed = capsys.readouterr().out
    assert "stream WER" in printed and "capacity sweep" in printed and "stable saved/lost" in printed
    assert "2 plan(s) pooled" in printed and "stream WER per plan" in printed and "  librivox: 0: " in printed
    pytest.importorskip("matplotlib")  # the bench extra; under CI a skip fails the run (tests/conftest.py)
    assert (out / "latency_vs_streams.png").stat().st_size > 0
    assert (out / "wer_streaming_vs_offline.png").stat().st_size > 0
