"""Soak benchmark: several real-speech streams for a long time against a server in its own process.

Checks what a service running for weeks needs: no lost utterance (every ``speech_started`` ends in
exactly one ``final`` or one ``error`` naming it), and no memory growth. RSS is sampled every few
seconds; growth is the mean of the last quarter of samples over the mean of the first quarter
after a warm-up (the first 10 % of the run, while allocators and caches fill).

Usage::

    python -m benchmarks.soak --minutes 60 --streams 4 --out bench-results/soak.json   # the manual run
    python -m benchmarks.soak --minutes 2 --streams 2                                  # the CI version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from granite_stream_testing.datasets import load_set
from benchmarks.loadgen import build_plan, run_streams
from benchmarks.servers import ResourceMonitor, granite_subprocess, machine_info


def lost_utterances(messages: list[dict]) -> list[int]:
    """Utterances announced by ``speech_started`` without exactly one ``final`` or ``error`` for them."""
    started = [m["utterance_id"] for m in messages if m.get("type") == "speech_started"]
    answered = [m["utterance_id"] for m in messages
                if m.get("type") == "final" or (m.get("type") == "error" and "utterance_id" in m)]
    return sorted(u for u in set(started) if answered.count(u) != 1)


def rss_growth(samples: list[int]) -> float | None:
    """Relative growth of RSS from the start (after warm-up) to the end of the run."""
    if len(samples) < 8:
        return None
    body = samples[len(samples) // 10:]
    quarter = max(1, len(body) // 4)
    first = sum(body[:quarter]) / quarter
    last = sum(body[-quarter:]) / quarter
    return (last - first) / first


async def soak(minutes: float, streams: int, seed: int = 0, log_path: Path | None = None) -> dict:
    clips = load_set("librivox") + load_set("asterisk-en")[:40]
    rng = random.Random(seed)
    deadline = time.monotonic() + minutes * 60
    totals = {"rounds": 0, "streams": 0, "utterances": 0, "finals": 0, "errors": 0, "lost": 0, "audio_seconds": 0.0}
    with granite_subprocess("whisper", log_path=log_path) as handle:
        with ResourceMonitor(handle.pid, interval=2.0) as monitor:
            while time.monotonic() < deadline:
                # Rounds of ~1 minute each: every stream replays a shuffled set of clips in real time.
                plans = []
                for index in range(streams):
                    chosen, seconds = [], 0.0
                    while seconds < 50:
                        clip = rng.choice(clips)
                        chosen.append(clip)
                        seconds += 4.0
                    plans.append(build_plan(index, chosen, 16000, rng=rng, start_delay=index * 0.37))
                logs = await run_streams(handle.url, plans, speed=1.0)
                totals["rounds"] += 1
                for log in logs:
                    messages = [m for _, m in log.messages]
                    totals["streams"] += 1
                    totals["utterances"] += sum(m.get("type") == "speech_started" for m in messages)
                    totals["finals"] += sum(m.get("type") == "final" for m in messages)
                    totals["errors"] += sum(m.get("type") == "error" for m in messages)
                    totals["lost"] += len(lost_utterances(messages)) + (0 if messages and messages[-1].get("type") == "end" else 1)
                    totals["audio_seconds"] += log.plan.duration
        resources = monitor.summary()
        growth = rss_growth(monitor.rss_samples)
    return {
        "benchmark": "soak",
        "minutes": minutes,
        "streams": streams,
        "machine": machine_info(),
        "server": handle.label,
        **totals,
        "rss_growth": None if growth is None else round(growth, 4),
        "rss_first_mb": round(monitor.rss_samples[len(monitor.rss_samples) // 10] / 2**20, 1) if monitor.rss_samples else None,
        "rss_last_mb": round(monitor.rss_samples[-1] / 2**20, 1) if monitor.rss_samples else None,
        "resources": resources,
        # One RSS figure per ~20 s, to see whether memory plateaus or keeps climbing.
        "rss_series_mb": [round(v / 2**20, 1) for v in monitor.rss_samples[::10]],
        "rss_first_half_peak_mb": round(max(monitor.rss_samples[: len(monitor.rss_samples) // 2] or [0]) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.01, help="fail (exit 1) above this relative growth")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--server-log", type=Path, default=None)
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args.minutes, args.streams, args.seed, args.server_log))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    ok = report["lost"] == 0 and (report["rss_growth"] is None or report["rss_growth"] <= args.max_rss_growth)
    print(f"soak: {report['streams']} streams, {report['utterances']} utterances, {report['lost']} lost, "
          f"RSS growth {report['rss_growth']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
