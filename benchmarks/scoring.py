"""Turn load-generator logs into per-clip measurements and per-run summaries.

Definitions (all wall-clock times are ``time.perf_counter`` in the load generator's process):

* **clip span**: where the clip's audio lies on the stream's audio clock (from the send plan).
  Server results carry ``start``/``end`` on the same clock; a result belongs to the clip whose
  span, widened to the middle of the neighbouring pauses, holds the result's midpoint. Partials
  belong to the clip of their utterance's final.
* **final latency**: arrival of the last final that belongs to the clip minus the moment the
  clip's last sample had been sent (end of speech = end of the clip's audio). A clip that gets no
  final at all has infinite latency: it counts against the percentiles.
* **first-partial latency**: arrival of the first partial (or final) of the clip minus the moment
  the clip's first sample had been sent.
* **partial lag**: arrival of a partial minus the moment the audio up to its ``end`` had been
  sent.
* **stable-text revisions** (granite protocol): a partial whose ``stable_text`` does not extend
  the previous ``stable_text`` of the same utterance word for word, or a final whose text does
  not start with the last ``stable_text``.
* **lag growth**: median final latency of the last third of the run's clips (by end time) minus
  that of the first third; a server that falls behind shows a positive, growing value.

WhisperLive (protocol ``whisperlive``): its ``segments`` messages repeat the last completed
segments plus one open segment. A completed segment is its final (first arrival counts, and,
as WhisperLive's own client does, a completed segment starting before the previous one's end is
ignored); the open segment is its partial. At the end of a stream the open segment's text counts
for the clip it belongs to, as WhisperLive's client writes it out too. Whisper's segments do not
follow the clips (one segment often ends one clip and starts the next), so a clip's final
latency is taken from coverage instead of assignment: the first moment the committed transcript
(completed segments, which WhisperLive commits in audio order) reaches the clip's end, within
``WHISPERLIVE_END_TOLERANCE_S``; for the same reason its WER is best read as stream WER.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .loadgen import StreamLog
from .textnorm import wer_cer


@dataclass
class ClipResult:
    clip_id: str
    set: str
    language: str
    stream: int
    start: float
    end: float
    reference: str
    hypothesis: str = ""
    finals: int = 0
    final_latency: float | None = None  # None: no final
    first_partial_latency: float | None = None
    end_sent_at: float = 0.0
    revisions: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class StreamResult:
    clips: list[ClipResult]
    text: str = ""  # every final of the stream, in order (for stream-level WER)
    partial_lags: list[float] = field(default_factory=list)
    partials: int = 0
    revisions: int = 0
    errors: list[dict] = field(default_factory=list)
    error: str | None = None


def _assigner(slog: StreamLog):
    """A function mapping an audio-clock interval to the index of the clip it belongs to."""
    spans = [(c.start, c.end) for c in slog.plan.clips]
    bounds = [(spans[i][1] + spans[i + 1][0]) / 2 for i in range(len(spans) - 1)]

    def assign(start: float, end: float) -> int:
        mid = (float(start) + float(end)) / 2
        return int(np.searchsorted(bounds, mid, side="right"))

    return assign


def _words(text: str) -> list[str]:
    return text.split()


def _new_clip_results(slog: StreamLog) -> list[ClipResult]:
    out = []
    for pc in slog.plan.clips:
        out.append(ClipResult(pc.clip.id, pc.clip.set, pc.clip.language, slog.plan.index, round(pc.start, 3),
                              round(pc.end, 3), pc.clip.text, end_sent_at=slog.sent_at(pc.end)))
    return out


def _begin_scoring(slog: StreamLog):
    """A stream's clip results, its :class:`StreamResult`, and the clip assigner (``None``: nothing to score)."""
    clips = _new_clip_results(slog)
    return clips, StreamResult(clips, error=slog.error), (_assigner(slog) if slog.messages else None)


def score_granite(slog: StreamLog) -> StreamResult:
    clips, result, assign = _begin_scoring(slog)
    if assign is None:
        return result
    plan = slog.plan
    # Which clip each utterance belongs to: decided by its final (or its error event), else its first partial.
    utterance_clip: dict[int, int] = {}
    for _, ev in slog.messages:
        if ev.get("type") in ("final", "error") and "utterance_id" in ev and "start" in ev:
            utterance_clip[ev["utterance_id"]] = assign(ev["start"], ev["end"])
    stable: dict[int, list[str]] = {}
    texts: dict[int, list[str]] = {i: [] for i in range(len(clips))}
    stream_text: list[str] = []
    for t, ev in slog.messages:
        kind = ev.get("type")
        if kind == "partial":
            uid = ev["utterance_id"]
            k = utterance_clip.setdefault(uid, assign(ev["start"], ev["end"]))
            result.partials += 1
            result.partial_lags.append(t - slog.sent_at(ev["end"]))
            new = _words(ev.get("stable_text", ""))
            old = stable.get(uid, [])
            if new[: len(old)] != old:
                clips[k].revisions += 1
                result.revisions += 1
            stable[uid] = new
            if clips[k].first_partial_latency is None:
                clips[k].first_partial_latency = t - slog.sent_at(plan.clips[k].start)
        elif kind == "final":
            uid = ev["utterance_id"]
            k = utterance_clip[uid]
            old = stable.get(uid, [])
            if _words(ev.get("text", ""))[: len(old)] != old:
                clips[k].revisions += 1
                result.revisions += 1
            c = clips[k]
            c.finals += 1
            if ev.get("text"):
                texts[k].append(ev["text"])
                stream_text.append(ev["text"])
            c.final_latency = t - c.end_sent_at
            if c.first_partial_latency is None:
                c.first_partial_latency = t - slog.sent_at(plan.clips[k].start)
        elif kind == "error":
            result.errors.append(ev)
    for k, c in enumerate(clips):
        c.hypothesis = " ".join(texts[k])
    result.text = " ".join(stream_text)
    return result


WHISPERLIVE_END_TOLERANCE_S = 0.5
"""Whisper's segment end timestamps often fall a little before the true end of speech."""


def score_whisperlive(slog: StreamLog) -> StreamResult:
    clips, result, assign = _begin_scoring(slog)
    if assign is None:
        return result
    plan = slog.plan
    committed: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    texts: dict[int, list[str]] = {i: [] for i in range(len(clips))}
    stream_text: list[str] = []
    last_open: dict | None = None
    for t, ev in slog.messages:
        segments = ev.get("segments")
        if not segments:
            if ev.get("status") in ("ERROR", "WARNING"):
                result.errors.append(ev)
            continue
        for i, seg in enumerate(segments):
            start, end = float(seg["start"]), float(seg["end"])
            k = assign(start, end)
            if clips[k].first_partial_latency is None and seg.get("text", "").strip():
                clips[k].first_partial_latency = t - slog.sent_at(plan.clips[k].start)
            if seg.get("completed"):
                key = (seg["start"], seg["end"], seg["text"])
                if key in seen:
                    continue
                seen.add(key)
                if committed and start < float(committed[-1]["end"]):
                    continue  # WhisperLive's client ignores these too
                committed.append(seg)
                c = clips[k]
                c.finals += 1
                if seg["text"].strip():
                    texts[k].append(seg["text"].strip())
                    stream_text.append(seg["text"].strip())
                for pc, cr in zip(plan.clips, clips):
                    if cr.final_latency is None and end >= pc.end - WHISPERLIVE_END_TOLERANCE_S:
                        cr.final_latency = t - cr.end_sent_at
            elif i == len(segments) - 1:
                if last_open is None or (seg["text"], seg["end"]) != (last_open["text"], last_open["end"]):
                    # A repeat of the same open segment is not a new partial (the server re-sends it).
                    result.partials += 1
                    result.partial_lags.append(t - slog.sent_at(end))
                last_open = seg
    if last_open is not None and last_open.get("text", "").strip():
        start = float(last_open["start"])
        if not committed or start >= float(committed[-1]["end"]):
            texts[assign(start, float(last_open["end"]))].append(last_open["text"].strip())
            stream_text.append(last_open["text"].strip())
    for k, c in enumerate(clips):
        c.hypothesis = " ".join(texts[k])
    result.text = " ".join(stream_text)
    return result


def score(slog: StreamLog) -> StreamResult:
    return score_granite(slog) if slog.protocol == "granite" else score_whisperlive(slog)


# ---- summaries ----------------------------------------------------------------------------------


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 90, 95, 99)) -> dict:
    """Percentiles (nearest-rank on sorted data, ``inf`` allowed) plus mean/max and count."""
    arr = np.sort(np.asarray([v for v in values], dtype=float))
    if len(arr) == 0:
        return {f"p{int(q)}": None for q in qs} | {"max": None, "mean": None, "n": 0}
    out = {}
    for q in qs:
        rank = max(1, math.ceil(q / 100 * len(arr)))
        out[f"p{int(q)}"] = _jsonable(arr[rank - 1])
    out["max"] = _jsonable(arr[-1])
    finite = arr[np.isfinite(arr)]
    out["mean"] = _jsonable(float(finite.mean())) if len(finite) else None
    out["n"] = int(len(arr))
    return out


def _jsonable(x: float) -> float | str:
    x = float(x)
    if math.isinf(x):
        return "inf"
    return round(x, 4)


def as_float(x) -> float:
    """Inverse of :func:`_jsonable` for comparisons (``"inf"`` → ``inf``, ``None`` → ``nan``)."""
    if x is None:
        return float("nan")
    return float("inf") if x == "inf" else float(x)


def lag_growth(clips: Sequence[ClipResult]) -> float | None:
    """Median final latency of the last third of clips (by when their speech ended) minus the first third's."""
    timed = sorted((c.end_sent_at, c.final_latency if c.final_latency is not None else math.inf) for c in clips)
    if len(timed) < 6:
        return None
    third = len(timed) // 3
    first = np.median([v for _, v in timed[:third]])
    last = np.median([v for _, v in timed[-third:]])
    if not (math.isfinite(first) and math.isfinite(last)):
        return math.inf if math.isfinite(first) else None
    return float(last - first)


def latency_summary(results: Sequence[StreamResult]) -> dict:
    """What every benchmark reports of a set of streams: clip counts, latency and lag percentiles, errors."""
    clips = [c for r in results for c in r.clips]
    errors = [e for r in results for e in r.errors]
    return {
        "streams": len(results),
        "clips": len(clips),
        "clips_finalized": sum(1 for c in clips if c.final_latency is not None),
        "speech_seconds": round(sum(c.end - c.start for c in clips), 2),
        "final_latency": percentiles([c.final_latency if c.final_latency is not None else math.inf for c in clips]),
        "first_partial_latency": percentiles([c.first_partial_latency for c in clips
                                              if c.first_partial_latency is not None]),
        "partial_lag": percentiles([x for r in results for x in r.partial_lags]),
        "partials": sum(r.partials for r in results),
        "errors": len(errors),
        "error_codes": sorted({str(e.get("code") or e.get("status")) for e in errors}),
    }


def summarize(results: Sequence[StreamResult], language: str | None = None) -> dict:
    """Aggregate stream results: latency percentiles, lag, revisions, WER/CER, errors."""
    clips = [c for r in results for c in r.clips]
    language = language or (clips[0].language if clips else "en")
    growth = lag_growth(clips)
    return {
        **latency_summary(results),
        "lag_growth_s": None if growth is None else _jsonable(growth),
        "stable_revisions": sum(r.revisions for r in results),
        "stream_failures": [r.error for r in results if r.error],
        **{k: v for k, v in wer_cer(((c.reference, c.hypothesis) for c in clips), language).items()},
        # Assignment-free: each stream's finals joined vs its references joined.
        "stream_wer": wer_cer(((" ".join(c.reference for c in r.clips), r.text) for r in results), language)["wer"],
    }
