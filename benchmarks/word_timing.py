"""Word timings and confidence of finals, measured (``granite-stream bench word-timing``).

Three figures (issue 19's targets), each printed and saved as JSON:

* **Onset error**: dev clips laid on one stream with 0.5-1.5 s of silence between them, streamed at
  real time through the real ``granite-stream serve`` (subprocess, its defaults) over a socket.
  For each clip, the first timed word after the previous clip is compared with the clip's speech
  onset found from its energy (the first 10 ms frame within 35 dB of the clip's loudest). Also
  checked for every final: words in order, inside the final's span, and joined they give its text.
* **Cost**: the engine's compute for each clip's final with word timing on and off, alternated in
  one process (min of ``--repeats``), as the ratio of their sums.
* **Confidence**: each clip decoded as one final; its words aligned to the reference transcript;
  the mean confidence of words that are right and of words that are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from granite_stream_testing.datasets import load_set
from .loadgen import build_plan, clip_audio, run_streams
from .servers import granite_subprocess, machine_info
from granite_stream_testing.textnorm import normalizer_for

ONSET_DB = 35.0
FRAME_S = 0.01


def speech_onset(audio: np.ndarray, rate: int) -> float:
    """Seconds to the first 10 ms frame whose RMS is within ``ONSET_DB`` of the loudest frame's."""
    frame = max(1, int(rate * FRAME_S))
    usable = len(audio) - len(audio) % frame
    rms = np.sqrt(np.mean(audio[:usable].reshape(-1, frame).astype(np.float64) ** 2, axis=1) + 1e-12)
    threshold = rms.max() * 10 ** (-ONSET_DB / 20)
    return float(np.argmax(rms >= threshold) * FRAME_S)


def final_checks(finals: list[dict]) -> dict:
    """Count finals whose words break the protocol's promises (order, span, text)."""
    broken = {"unordered": 0, "outside_span": 0, "text_mismatch": 0, "untimed": 0}
    for final in finals:
        words = final.get("words")
        if words is None:
            broken["untimed"] += 1
            continue
        starts = [w["start"] for w in words]
        broken["unordered"] += starts != sorted(starts)
        broken["outside_span"] += any(not final["start"] <= w["start"] <= w["end"] <= final["end"] + 1e-6 for w in words)
        broken["text_mismatch"] += " ".join(w["word"] for w in words) != final["text"]
    return broken


async def onset_errors(clips, speed: float, seed: int) -> dict:
    plan = build_plan(0, clips, 16000, pause_range=(0.5, 1.5), rng=random.Random(seed))
    # Faster than real time on purpose: the server's real-time throttle would measure itself.
    with granite_subprocess("whisper", realtime_factor=0 if speed > 1 else None) as handle:
        [log] = await run_streams(handle.url, [plan], speed=speed)
        server = handle.label
    finals = [m for _, m in log.messages if m.get("type") == "final"]
    words = sorted((w for f in finals for w in f.get("words") or ()), key=lambda w: w["start"])
    errors, missing, per_clip = [], 0, []
    previous_end = 0.0
    for placed in plan.clips:
        onset = placed.start + speech_onset(clip_audio(placed.clip, 16000), 16000)
        first = next((w for w in words if w["start"] >= previous_end - 0.05), None)
        if first is None or first["start"] > placed.end:
            missing += 1
        else:
            errors.append(first["start"] - onset)
            per_clip.append({"clip": placed.clip.id, "onset": round(onset, 3), "word": first["word"],
                             "start": first["start"], "error_ms": round(1000 * (first["start"] - onset), 1)})
        previous_end = placed.end
    absolute = [abs(e) for e in errors]
    return {
        "server": server, "stream_seconds": round(plan.duration, 1), "clips": len(plan.clips), "finals": len(finals),
        "clips_without_a_timed_word": missing,
        "onset_error_median_ms": None if not absolute else round(1000 * float(np.median(absolute)), 1),
        "onset_error_p95_ms": None if not absolute else round(
            1000 * float(np.percentile(absolute, 95, method="nearest")), 1),
        "onset_error_signed_median_ms": None if not errors else round(1000 * float(np.median(errors)), 1),
        "finals_breaking_promises": final_checks(finals),
        "worst_clips": sorted(per_clip, key=lambda c: -abs(c["error_ms"]))[:5],
    }


def cost_and_confidence(clips, repeats: int) -> dict:
    from stream_server.inference.types import InferenceRequest
    from stream_server.engines.whisper import WhisperEngine

    timed, plain = WhisperEngine(cpu_threads=2), WhisperEngine(cpu_threads=2, word_timestamps=False)
    normalize = normalizer_for("en")
    on_s = off_s = 0.0
    right: list[float] = []
    wrong: list[float] = []
    for i, clip in enumerate(clips):
        request = InferenceRequest("bench", i, "final", clip_audio(clip, 16000))
        best = {"on": float("inf"), "off": float("inf")}
        result = None
        for _ in range(repeats):  # alternated, so load on the machine hits both alike
            for name, engine in (("on", timed), ("off", plain)):
                began = time.perf_counter()
                [out] = engine.transcribe_batch([request])
                best[name] = min(best[name], time.perf_counter() - began)
                if name == "on":
                    result = out
        on_s += best["on"]
        off_s += best["off"]
        if result is None or not result.words:
            continue
        hyp = [normalize(w.word) for w in result.words]
        ref = normalize(clip.text).split()
        matcher = difflib.SequenceMatcher(None, hyp, ref, autojunk=False)
        matched = {b.a + k for b in matcher.get_matching_blocks() for k in range(b.size)}
        for k, word in enumerate(result.words):
            if word.confidence is not None:
                (right if k in matched else wrong).append(word.confidence)
    return {
        "engine_seconds_with_words": round(on_s, 3), "engine_seconds_without": round(off_s, 3),
        "word_timing_cost_percent": round(100 * (on_s / off_s - 1), 1) if off_s else None,
        "words_right": len(right), "words_wrong": len(wrong),
        "mean_confidence_right": round(float(np.mean(right)), 3) if right else None,
        "mean_confidence_wrong": round(float(np.mean(wrong)), 3) if wrong else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-stream bench word-timing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="asterisk-en,librivox", help="dev sets (comma-separated)")
    parser.add_argument("--clips", type=int, default=40, help="clips per set at most (default 40)")
    parser.add_argument("--speed", type=float, default=1.0, help="streaming speed, x real time (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="cost: decodes per clip and setting (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("streaming", "engine"), default=None,
                        help="run one part: the streamed onset check, or the engine's cost and confidence")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    clips = [c for name in args.sets.split(",") if name for c in load_set(name.strip())[: args.clips]]
    results = {
        "benchmark": "word-timing", "machine": machine_info(), "sets": args.sets, "clips": len(clips),
        "argv": sys.argv[1:],
    }
    if args.only in (None, "streaming"):
        results["streaming"] = asyncio.run(onset_errors(clips, args.speed, args.seed))
    if args.only in (None, "engine"):
        results["engine"] = cost_and_confidence(clips, args.repeats)
    text = json.dumps(results, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
