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
  the previous ``stable_text`` of the same utterance, or a final whose text does not extend the
  last ``stable_text`` (:func:`stream_server.core.stabilizer.extends`: word for word, except that the
  last word may gain trailing punctuation).
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
from stream_server.core.stabilizer import extends
from granite_stream_testing.textnorm import wer_cer


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
    stable: dict[int, str] = {}
    texts: dict[int, list[str]] = {i: [] for i in range(len(clips))}
    stream_text: list[str] = []
    for t, ev in slog.messages:
        kind = ev.get("type")
        if kind == "partial":
            uid = ev["utterance_id"]
            k = utterance_clip.setdefault(uid, assign(ev["start"], ev["end"]))
            result.partials += 1
            result.partial_lags.append(t - slog.sent_at(ev["end"]))
            new = ev.get("stable_text", "")
            if not extends(stable.get(uid, ""), new):
                clips[k].revisions += 1
                result.revisions += 1
            stable[uid] = new
            if clips[k].first_partial_latency is None:
                clips[k].first_partial_latency = t - slog.sent_at(plan.clips[k].start)
        elif kind == "final":
            uid = ev["utterance_id"]
            k = utterance_clip[uid]
            if not extends(stable.get(uid, ""), ev.get("text", "")):
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
    out: dict[str, float | str | None] = {}
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


# ---- dropped words: streaming finals against the offline decode of the same audio ---------------

DROP_CAUSES = ("cut", "boundary", "loop_guard", "decode", "stable", "splice")
"""Why a word of the offline decode is missing (deleted or changed) in the streaming finals.

Segmentation causes (the free decode of each utterance's own audio, joined, already lacks it):

* ``cut``: within two words of a ``max_utterance_s`` split (an utterance starting where the
  previous one ended);
* ``boundary``: the first or last word of a silence-ended utterance (context lost at the edge);
* ``loop_guard``: inside an utterance whose free decode tripped Whisper's repetition guard;
* ``decode``: elsewhere inside an utterance (its decode without the rest of the clip differs).

Streaming-path causes (the free decode of the utterance has it, the final does not):

* ``stable``: inside the published ``stable_text`` (a stable word was wrong, or skipped it);
* ``splice``: at or after the end of the stable prefix (the stable words and the final were
  joined badly).

The partial window (partials encode in a shorter window than finals) acts only through the
stable words, so it counts under ``stable``.
"""


@dataclass
class UtteranceTrace:
    """One utterance of a stream as the client saw it, plus its free decode (filled in later)."""

    utterance_id: int
    start: float
    end: float
    final: str
    stable: str = ""  # the last stable_text published before the final
    cut_before: bool = False  # started where the previous utterance was split
    cut_after: bool = False  # split at max_utterance_s
    free: str | None = None  # the engine's decode of [start, end) alone (with the server's context), no splice
    loop_guard: bool = False  # that decode tripped the repetition guard


def utterance_traces(slog: StreamLog) -> dict[int, list[UtteranceTrace]]:
    """The finals of a granite-protocol stream grouped by clip index, in order, with their last
    ``stable_text`` and whether they were split at ``max_utterance_s``."""
    if not slog.messages:
        return {}
    assign = _assigner(slog)
    stable: dict[int, str] = {}
    cut: set[int] = set()  # utterances the server ended at max_utterance_s
    ordered: list[UtteranceTrace] = []
    for _, ev in slog.messages:
        kind = ev.get("type")
        if kind == "partial":
            stable[ev["utterance_id"]] = ev.get("stable_text", "")
        elif kind == "speech_ended" and ev.get("reason") == "max_length":
            cut.add(ev["utterance_id"])
        elif kind == "final":
            ordered.append(UtteranceTrace(ev["utterance_id"], float(ev["start"]), float(ev["end"]),
                                          ev.get("text", ""), stable.get(ev["utterance_id"], "")))
    ordered.sort(key=lambda u: u.utterance_id)
    for prev, nxt in zip(ordered, ordered[1:]):
        if nxt.utterance_id == prev.utterance_id + 1 and prev.utterance_id in cut:
            prev.cut_after = nxt.cut_before = True
    out: dict[int, list[UtteranceTrace]] = {}
    for u in ordered:
        out.setdefault(assign(u.start, u.end), []).append(u)
    return out


def _hits(reference: list[str], hypothesis: list[str]) -> tuple[list[bool], list[int]]:
    """For each reference word: whether the alignment matches it, and the hypothesis position it
    aligns to (for a deletion, the position where it would have been)."""
    import jiwer

    hit = [False] * len(reference)
    where = [0] * len(reference)
    if not reference:
        return hit, where
    if not hypothesis:
        return hit, where
    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    for chunk in out.alignments[0]:
        for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
            offset = i - chunk.ref_start_idx
            if chunk.type == "equal":
                hit[i] = True
                where[i] = chunk.hyp_start_idx + offset
            elif chunk.type == "substitute":
                where[i] = chunk.hyp_start_idx + offset
            elif chunk.type == "delete":
                where[i] = chunk.hyp_start_idx
    return hit, where


def _locate(lengths: list[int], j: int) -> tuple[int, int]:
    """Hypothesis word index ``j`` of utterances joined word-wise -> (utterance, index within it);
    one past the end of an utterance stays with it (a word missing at its end)."""
    for u, n in enumerate(lengths):
        if j < n or (j == n and u == len(lengths) - 1):
            return u, j
        j -= n
    return max(0, len(lengths) - 1), lengths[-1] if lengths else 0


def _streamed_words(utterances: Sequence[UtteranceTrace], norm) -> tuple[list[list[str]], list[list[str]], list[int]]:
    """Each utterance's final and free decode as normalised words, and how many of the final's
    words its stable prefix covers."""
    finals = [norm(u.final).split() for u in utterances]
    frees = [norm(u.free if u.free is not None else u.final).split() for u in utterances]
    stables = [min(len(norm(u.stable).split()), len(f)) for u, f in zip(utterances, finals)]
    return finals, frees, stables


def attribute_drops(offline: str, utterances: Sequence[UtteranceTrace], language: str | None = "en",
                    truth: str | None = None) -> dict:
    """Count the words of ``offline`` that the streaming finals of ``utterances`` drop or change,
    per cause in :data:`DROP_CAUSES` (each such word counts once). Needs ``free`` on each trace.

    Args:
        truth: the clip's reference transcript, when known: each dropped word is then also marked
            right or wrong in the offline decode (aligned to the reference), because a streaming
            final that "drops" a word the offline decode misheard ("start" for "star") has lost
            nothing the speaker said.

    Returns:
        ``{"offline_words", "dropped", "by_cause": {cause: n}, "examples": [...]}``; ``dropped`` is
        the sum of ``by_cause``. With ``truth``, also ``right_by_cause`` (the dropped words the
        offline decode had right), ``offline_right`` on each example, and ``stable_ledger``
        (:func:`stable_ledger`: what the stable words won and lost against the reference).
    """
    from granite_stream_testing.textnorm import normalizer_for

    norm = normalizer_for(language)
    reference = norm(offline).split()
    right = _hits(reference, norm(truth).split())[0] if truth is not None else None
    finals, frees, stables = _streamed_words(utterances, norm)
    hit_final, at_final = _hits(reference, [w for f in finals for w in f])
    hit_free, at_free = _hits(reference, [w for f in frees for w in f])
    by_cause = {c: 0 for c in DROP_CAUSES}
    right_by_cause = {c: 0 for c in DROP_CAUSES}
    examples = []
    for i, word in enumerate(reference):
        if hit_final[i]:
            continue
        if not utterances:
            cause = "boundary"
        elif hit_free[i]:
            u, k = _locate([len(f) for f in finals], at_final[i])
            cause = "stable" if k < stables[u] else "splice"
        else:
            u, k = _locate([len(f) for f in frees], at_free[i])
            n = len(frees[u])
            trace = utterances[u]
            if (trace.cut_before and k <= 1) or (trace.cut_after and k >= n - 2):
                cause = "cut"
            elif k <= 0 or k >= n - 1:
                cause = "boundary"
            elif trace.loop_guard:
                cause = "loop_guard"
            else:
                cause = "decode"
        by_cause[cause] += 1
        example: dict[str, object] = {"word": word, "cause": cause,
                                      "context": " ".join(reference[max(0, i - 3): i + 4])}
        if right is not None:
            example["offline_right"] = right[i]
            right_by_cause[cause] += right[i]
        examples.append(example)
    out = {"offline_words": len(reference), "dropped": sum(by_cause.values()), "by_cause": by_cause,
           "examples": examples}
    if right is not None:
        out["right_by_cause"] = right_by_cause
        out["stable_ledger"] = stable_ledger(truth or "", utterances, language)
    return out


def stable_ledger(truth: str, utterances: Sequence[UtteranceTrace], language: str | None = "en") -> dict:
    """What the stable words did to the words the speaker said, both ways. Needs ``free`` on each trace.

    A final keeps its published stable words where its free decode (the same audio, nothing forced)
    hears them differently. Against the clip's reference ``truth``, a word inside the stable prefix
    of a final is

    * ``saved`` when the final has it right and the free decode, joined, does not (the stable
      words agreed over several partials heard it better than the one decode of the whole
      utterance: "to switch to record mode" kept where the decode says "does which to record mode");
    * ``lost`` when the free decode has it right and the final does not (tiny.en's partials say
      "read" for a word that the whole utterance shows is "reach").

    ``lost`` are the stabilizer's dropped words that the speaker said (``right_by_cause["stable"]``
    counts them against the offline decode instead); ``saved`` is the other side of the same
    promise, which a dropped-word count cannot see. Returns ``{"saved": n, "lost": m}``.
    """
    from granite_stream_testing.textnorm import normalizer_for

    norm = normalizer_for(language)
    reference = norm(truth).split()
    finals, frees, stables = _streamed_words(utterances, norm)
    hit_final, at_final = _hits(reference, [w for f in finals for w in f])
    hit_free, _ = _hits(reference, [w for f in frees for w in f])
    ledger = {"saved": 0, "lost": 0}
    final_lengths = [len(f) for f in finals]
    for i in range(len(reference)):
        if hit_final[i] == hit_free[i]:
            continue
        u, k = _locate(final_lengths, at_final[i])
        if k < stables[u]:
            ledger["saved" if hit_final[i] else "lost"] += 1
    return ledger


def summarize_drops(per_clip: Iterable[dict]) -> dict:
    """Totals of :func:`attribute_drops` over clips (``right_by_cause`` when every clip has it)."""
    per_clip = list(per_clip)
    by_cause = {c: sum(d["by_cause"][c] for d in per_clip) for c in DROP_CAUSES}
    out = {"clips": len(per_clip), "offline_words": sum(d["offline_words"] for d in per_clip),
           "dropped": sum(by_cause.values()), "by_cause": by_cause}
    if per_clip and all("right_by_cause" in d for d in per_clip):
        out["right_by_cause"] = {c: sum(d["right_by_cause"][c] for d in per_clip) for c in DROP_CAUSES}
        out["stable_ledger"] = {side: sum(d["stable_ledger"][side] for d in per_clip) for side in ("saved", "lost")}
    return out
