"""``granite-stream bench diarization``: speaker labels on single-channel conversations (docs/diarization.md).

Conversations are built from real speech of distinct dev voices: the Asterisk prompts (one voice
per language: ``en``, ``es``, ``fr``), the LibriVox reader (``librivox``) and the goforward speaker
(``goforward``). Each has turns of 2–8 s by randomly chosen speakers (never the same twice in a
row) with gaps of 0.3–1.5 s, and is band-limited to telephone bandwidth (8 kHz, 300–3400 Hz) so the
recording channel is no cue: the Asterisk voices are 8 kHz studio prompts, the others 16 kHz.

Each conversation streams at real time through a real socket (``benchmarks.loadgen``) to the real
server (in this process, Whisper on the CPU unless told otherwise), once with ``"diarize": true``
and once without, a few conversations at a time. Scored per reference turn: the hypothesis speaker
is the label covering most of the turn's time (``speaker_turns`` where a final has them, else the
final's ``speaker``); accuracy is taken under the best one-to-one mapping of labels to true
speakers. Also: the number of labels against the true number of speakers, the encoder's time per
final (from the speaker wrapper's counters), and final latency and WER with and without ``diarize``.

``--tune`` instead embeds each reference turn offline and prints attribution accuracy over a grid of
clustering thresholds (no server): how the defaults of ``SpeakerSettings`` were chosen; with
``--precision`` it does so for each of the encoder's arithmetics. ``--cost`` times the encoder per
final on the utterances' audio, float32 (Resemblyzer's own arithmetic, the baseline) against
``auto`` (bfloat16 where the CPU computes it) windowed over the whole utterance and between pauses
(the server's default), in the same run, or any variants (``--cost-variants``: precision, pauses,
window rate, threads), in wall and CPU time. ``--offline`` scores the conversations' turns joined
as the server's VAD mostly joins them (:func:`vad_like_utterances`), labelled as the session labels
finals, for each window rate (``--rates``) over pooled seeds (``--seeds``): the stand-in for the
streamed run that settings are compared on. Every mode prints where attribution is lost
(:func:`breakdown`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from granite_stream_testing.datasets import Clip, load_set
from .loadgen import PlannedClip, StreamPlan, clip_audio, run_granite_stream

log = logging.getLogger("granite_stream.bench.diarization")

VOICES = {  # voice name -> data set: one speaker each
    "en": "asterisk-en", "es": "asterisk-es", "fr": "asterisk-fr", "librivox": "librivox", "goforward": "goforward",
}
SEND_RATE = 8000  # telephone
BAND = (300.0, 3400.0)
TURN_S = (2.0, 8.0)
GAP_S = (0.3, 1.5)


@dataclass(frozen=True)
class Turn:
    speaker: str
    clip: Clip
    start: float  # seconds on the conversation's clock
    end: float


@dataclass
class Conversation:
    index: int
    speakers: tuple[str, ...]
    turns: list[Turn]
    audio: np.ndarray  # float32 at SEND_RATE, band-limited

    def plan(self) -> StreamPlan:
        clips = [PlannedClip(t.clip, t.start, t.end) for t in self.turns]
        return StreamPlan(self.index, SEND_RATE, self.audio, clips, "en")


def telephone(audio: np.ndarray, rate: int) -> np.ndarray:
    """``audio`` at ``rate`` as a telephone line carries it: 8 kHz, only 300–3400 Hz."""
    import soxr

    x = soxr.resample(audio, rate, SEND_RATE, quality="HQ").astype(np.float32) if rate != SEND_RATE else audio
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / SEND_RATE)
    spectrum[(freqs < BAND[0]) | (freqs > BAND[1])] = 0
    return np.fft.irfft(spectrum, len(x)).astype(np.float32)


def voice_clips(voices: Sequence[str] = tuple(VOICES)) -> dict[str, list[Clip]]:
    """Each voice's dev clips lasting 2–8 s (turn length)."""
    out = {}
    for voice in voices:
        clips = load_set(VOICES[voice], "dev", progress=False)
        out[voice] = [c for c in clips if TURN_S[0] <= len(clip_audio(c, 16000)) / 16000 <= TURN_S[1]]
        if not out[voice]:
            raise RuntimeError(f"voice {voice} has no clip of {TURN_S[0]}-{TURN_S[1]} s")
    return out


def build_conversation(index: int, n_speakers: int, n_turns: int, clips: dict[str, list[Clip]],
                       rng: random.Random) -> Conversation:
    """A conversation of ``n_turns`` turns among ``n_speakers`` voices drawn from ``clips``."""
    speakers = tuple(rng.sample(sorted(clips), n_speakers))
    order = list(speakers)
    rng.shuffle(order)  # everyone speaks once early, in random order; then random, no immediate repeat
    while len(order) < n_turns:
        order.append(rng.choice([s for s in speakers if s != order[-1]]))
    pieces, turns, at = [np.zeros(int(0.5 * SEND_RATE), np.float32)], [], 0.5
    for speaker in order[:n_turns]:
        clip = rng.choice(clips[speaker])
        audio = telephone(clip_audio(clip, 16000), 16000)
        turns.append(Turn(speaker, clip, at, at + len(audio) / SEND_RATE))
        gap = rng.uniform(*GAP_S)
        pieces += [audio, np.zeros(int(gap * SEND_RATE), np.float32)]
        at += len(audio) / SEND_RATE + int(gap * SEND_RATE) / SEND_RATE
    pieces.append(np.zeros(SEND_RATE, np.float32))
    audio = np.concatenate(pieces)
    return Conversation(index, speakers, turns, audio / max(1.0, float(np.max(np.abs(audio))) / 0.9))


def conversations(count: int, n_speakers: int, n_turns: int, seed: int,
                  clips: dict[str, list[Clip]]) -> list[Conversation]:
    rng = random.Random(f"diarization-{seed}-{n_speakers}")
    return [build_conversation(i, n_speakers, n_turns, clips, rng) for i in range(count)]


# ---- scoring ----------------------------------------------------------------------------------------


def hypothesis_segments(finals: Sequence[dict]) -> list[tuple[int, float, float]]:
    """``(speaker, start, end)`` stretches of the finals: their ``speaker_turns``, else the whole final."""
    segments = []
    for f in finals:
        if f.get("speaker") is None:
            continue
        turns = f.get("speaker_turns") or [{"speaker": f["speaker"], "start": f["start"], "end": f["end"]}]
        segments += [(t["speaker"], t["start"], t["end"]) for t in turns]
    return segments


def score(turns: Sequence[Turn], finals: Sequence[dict]) -> dict:
    """Attribution of the reference turns (best one-to-one label mapping) and the speaker count."""
    segments = hypothesis_segments(finals)
    labels = []
    for t in turns:
        overlap: dict[int, float] = {}
        for speaker, a, b in segments:
            shared = min(b, t.end) - max(a, t.start)
            if shared > 0:
                overlap[speaker] = overlap.get(speaker, 0.0) + shared
        labels.append(max(overlap, key=overlap.__getitem__) if overlap else None)
    truth = sorted({t.speaker for t in turns})
    found = sorted({s for s, _, _ in segments})
    best, best_mapping = -1, {}
    hyp = found + [None] * max(0, len(truth) - len(found))
    for perm in itertools.permutations(hyp, len(truth)):
        mapping = dict(zip(truth, perm))
        right = sum(1 for t, label in zip(turns, labels) if label is not None and mapping[t.speaker] == label)
        if right > best:
            best, best_mapping = right, mapping
    owner = {label: speaker for speaker, label in best_mapping.items() if label is not None}
    per_turn: list[dict] = []
    seen: dict[str, int] = {}
    for index, (t, label) in enumerate(zip(turns, labels)):
        seen[t.speaker] = seen.get(t.speaker, 0) + 1
        if label is not None and best_mapping[t.speaker] == label:
            error = None
        elif label is None:
            error = "unlabelled"
        else:  # another true speaker's label, or a label no true speaker got (a wrong new speaker)
            error = "other_speaker" if label in owner else "extra_label"
        # Whether one final joins this turn and another (a change of speaker inside an utterance):
        # a final overlapping this turn by over 0.2 s and some other reference turn by over 0.2 s.
        mixed = any(min(f["end"], t.end) - max(f["start"], t.start) > 0.2
                    and any(min(f["end"], u.end) - max(f["start"], u.start) > 0.2 for u in turns if u is not t)
                    for f in finals)
        pieces = sum(1 for f in finals if min(f["end"], t.end) - max(f["start"], t.start) > 0.2)
        per_turn.append({"index": index, "duration": t.end - t.start, "nth": seen[t.speaker], "mixed": mixed,
                         "pieces": pieces, "error": error})
    return {"turns": len(turns), "correct": best, "accuracy": best / len(turns), "speakers_true": len(truth),
            "speakers_found": len(found), "per_turn": per_turn}


DURATION_BINS = (2.0, 3.0, 4.0, 6.0, 8.01)
MARGIN_BINS = (-1.0, 0.0, 0.03, 0.06, 0.1, 2.0)


def breakdown(scores: Sequence[dict]) -> dict:
    """Where attribution is lost: the error rate of the reference turns by duration, by the
    speaker's n-th turn (the first ones meet a young centroid), by whether one final joined the turn
    with another speaker's, and by the similarity margin where the offline run recorded it
    (``margin``: similarity to the assigned speaker minus that to the next nearest one); and the
    kinds of error (another true speaker's label, a label no true speaker got, none)."""
    rows = [t for s in scores for t in s["per_turn"]]

    def rate(selected: list[dict]) -> dict:
        wrong = sum(1 for t in selected if t["error"])
        return {"turns": len(selected), "wrong": wrong, "error_rate": round(wrong / max(1, len(selected)), 3)}

    out: dict = {"all": rate(rows)}
    out["by_duration_s"] = {f"{a:g}-{b:.0f}": rate([t for t in rows if a <= t["duration"] < b])
                            for a, b in zip(DURATION_BINS, DURATION_BINS[1:])}
    out["by_nth_turn_of_speaker"] = {str(n): rate([t for t in rows if min(t["nth"], 4) == n]) for n in (1, 2, 3)}
    out["by_nth_turn_of_speaker"]["4+"] = rate([t for t in rows if t["nth"] >= 4])
    out["joined_with_another_turn"] = {"yes": rate([t for t in rows if t["mixed"]]),
                                       "no": rate([t for t in rows if not t["mixed"]])}
    out["finals_over_turn"] = {str(n): rate([t for t in rows if min(t["pieces"], 3) == n]) for n in (0, 1, 2)}
    out["finals_over_turn"]["3+"] = rate([t for t in rows if t["pieces"] >= 3])
    if rows and "margin" in rows[0]:
        out["by_margin"] = {f"{a:g}..{b:g}": rate([t for t in rows if a <= t["margin"] < b])
                            for a, b in zip(MARGIN_BINS, MARGIN_BINS[1:])}
    kinds: dict = {}
    for t in rows:
        if t["error"]:
            kinds[t["error"]] = kinds.get(t["error"], 0) + 1
    out["errors_by_kind"] = kinds
    return out


def print_breakdown(title: str, table: dict) -> None:
    print(f"{title}: {table['all']['wrong']} of {table['all']['turns']} turns wrong; kinds {table['errors_by_kind']}")
    for key in ("by_duration_s", "by_nth_turn_of_speaker", "joined_with_another_turn", "finals_over_turn",
                "by_margin"):
        if key in table:
            cells = "  ".join(f"{k}: {v['wrong']}/{v['turns']}" for k, v in table[key].items())
            print(f"  {key:26s} {cells}")


def summarize(scores: Sequence[dict]) -> dict:
    turns = sum(s["turns"] for s in scores)
    return {
        "conversations": len(scores),
        "turns": turns,
        "accuracy": round(sum(s["correct"] for s in scores) / max(1, turns), 4),
        "accuracy_per_conversation": {"min": round(min(s["accuracy"] for s in scores), 3),
                                      "median": round(statistics.median(s["accuracy"] for s in scores), 3)},
        "speaker_count_right": round(sum(s["speakers_found"] == s["speakers_true"] for s in scores) / len(scores), 3),
        "speakers_found": [s["speakers_found"] for s in scores],
        "breakdown": breakdown(scores),
    }


# ---- offline tuning -------------------------------------------------------------------------------


def embed_turns(convs: Sequence[Conversation], precision: str = "auto") -> list[list]:
    """Each reference turn's audio embedded as one utterance (``SpeakerEmbeddings`` per turn)."""
    import soxr

    from stream_server.speakers.encoder import SpeakerEncoder

    encoder = SpeakerEncoder("cpu", threads=1, precision=precision)
    embedded = []
    for conv in convs:
        wavs = [soxr.resample(conv.audio[int(t.start * SEND_RATE):int(t.end * SEND_RATE)], SEND_RATE, 16000)
                for t in conv.turns]
        embedded.append(encoder.embed(wavs))
    return embedded


def label_offline(convs: Sequence[Conversation], embedded: Sequence[list], settings) -> list[dict]:
    """Score each conversation with its turns labelled in order by a fresh ``SpeakerTracker``; each
    turn also gets ``margin``: its embedding's similarity to the nearest speaker centroid minus that
    to the next nearest (minus the new-speaker threshold where only one speaker exists yet), taken
    before the turn is folded in (the first turn of a conversation gets 1)."""
    from stream_server.speakers.clustering import SpeakerTracker

    scores = []
    for conv, embs in zip(convs, embedded):
        tracker = SpeakerTracker(settings)
        finals, margins = [], []
        for t, e in zip(conv.turns, embs):
            sims = sorted(tracker.clusterer.similarities(e.utterance).values(), reverse=True)
            margins.append(1.0 if not sims else sims[0] - (sims[1] if len(sims) > 1 else settings.threshold))
            a = tracker.attribute(e, t.start, t.end)
            finals.append({"start": t.start, "end": t.end, "speaker": a.speaker,
                           "speaker_turns": [x.to_wire() for x in a.turns]})
        scored = score(conv.turns, finals)
        for row, margin in zip(scored["per_turn"], margins):
            row["margin"] = margin
        scores.append(scored)
    return scores


def tune(convs: Sequence[Conversation], grid: Sequence[float], precision: str = "auto") -> dict:
    """Attribution accuracy per clustering threshold, each reference turn embedded as one utterance
    by the encoder in ``precision``."""
    from stream_server.speakers.clustering import SpeakerSettings

    embedded = embed_turns(convs, precision)
    out = {}
    for threshold in grid:
        settings = replace(SpeakerSettings(), threshold=threshold, merge_threshold=max(threshold + 0.05, 0.9))
        out[threshold] = summarize(label_offline(convs, embedded, settings))
    return out


JOIN_S = 0.55  # turns closer than this come out of the server's VAD as one utterance (mostly)


def vad_like_utterances(conv: Conversation) -> list[tuple[float, float]]:
    """The conversation's utterances as the server's VAD mostly cuts them: turns separated by less
    than ``JOIN_S`` joined into one (offline stand-in, for timing the encoder on such audio)."""
    spans: list[list[float]] = []
    for t in conv.turns:
        if spans and t.start - spans[-1][1] < JOIN_S:
            spans[-1][1] = t.end
        else:
            spans.append([t.start, t.end])
    return [(a, b) for a, b in spans]


def embed_utterances(convs: Sequence[Conversation], encoder) -> list[list]:
    """Each conversation's :func:`vad_like_utterances` embedded by ``encoder``, one call per
    conversation: ``((start, end), SpeakerEmbeddings)`` per utterance."""
    import soxr

    out = []
    for conv in convs:
        spans = vad_like_utterances(conv)
        wavs = [soxr.resample(conv.audio[int(a * SEND_RATE):int(b * SEND_RATE)], SEND_RATE, 16000) for a, b in spans]
        out.append(list(zip(spans, encoder.embed(wavs))))
    return out


def label_utterances(convs: Sequence[Conversation], embedded: Sequence[list], settings) -> list[dict]:
    """Score each conversation with its VAD-like utterances labelled in order by a fresh
    ``SpeakerTracker`` (``speaker_turns`` where it cuts one), as the session labels finals."""
    from stream_server.speakers.clustering import SpeakerTracker

    scores = []
    for conv, utterances in zip(convs, embedded):
        tracker = SpeakerTracker(settings)
        finals = []
        for (a, b), embeddings in utterances:
            attribution = tracker.attribute(embeddings, a, b)
            finals.append({"start": a, "end": b, "speaker": attribution.speaker,
                           "speaker_turns": [t.to_wire() for t in attribution.turns] if attribution.changes else None})
        scores.append(score(conv.turns, finals))
    return scores


def offline(seeds: Sequence[int], speakers: Sequence[int], count: int, n_turns: int, rates: Sequence[float],
            settings) -> dict:
    """Attribution on VAD-like utterances (turns under ``JOIN_S`` apart joined, as the server's VAD
    mostly joins them), offline, for each encoder window rate: the stand-in for the streamed run
    that settings are tuned on (tune on some seeds, report others). Also the windows per utterance,
    which the encoder's time follows."""
    from stream_server.speakers.encoder import SpeakerEncoder

    clips = voice_clips()
    sets = {k: [c for seed in seeds for c in conversations(count, k, n_turns, seed, clips)] for k in speakers}
    out: dict = {}
    for rate in rates:
        encoder = SpeakerEncoder("cpu", threads=1, rate=rate)
        for k, convs in sets.items():
            embedded = embed_utterances(convs, encoder)
            row = summarize(label_utterances(convs, embedded, settings))
            row["windows_per_utterance"] = round(float(np.mean([len(e.partials) for u in embedded for _, e in u])), 2)
            row["utterance_s"] = round(float(np.mean([b - a for u in embedded for (a, b), _ in u])), 2)
            out[f"rate {rate:g}, {k} speakers"] = row
    return out


def cost(convs: Sequence[Conversation], batches: Sequence[int] = (1, 8), repeats: int = 3,
         precisions: Sequence[str] = ("float32", "auto", "auto+pauses")) -> list[dict]:
    """Encoder time per final on the utterances' audio (:func:`vad_like_utterances`; one torch
    thread, as the server's CPU encoder uses, unless a variant says ``xT``), for each variant
    (``precision[+pauses][@rate][xT]``; ``+pauses``: windowed between pauses, as the server does)
    and each number of finals per call, with the encoder windows per final: the best of ``repeats`` passes,
    and its median call. The passes of the precisions alternate, so that a change in the machine's
    load reaches all of them alike; the first precision is the baseline, and each row says how its
    embeddings compare with the baseline's (lowest cosine over the turns)."""
    import soxr

    from stream_server.speakers.encoder import SpeakerEncoder

    # "+pauses": each stretch between pauses windowed on its own (SpeakerEncoder.split_pauses);
    # "@R": R encoder windows per second (default 1.3); "xT": T torch threads (default 1, as served).
    import torch

    encoders, threads = [], []
    for spec in precisions:
        spec, _, count = spec.partition("x")
        name, _, rate = spec.partition("@")
        threads.append(int(count or 1))
        encoders.append(SpeakerEncoder("cpu", precision=name.split("+")[0], split_pauses=name.endswith("+pauses"),
                                       rate=float(rate or 1.3)))
    wavs = [soxr.resample(c.audio[int(a * SEND_RATE):int(b * SEND_RATE)], SEND_RATE, 16000)
            for c in convs for a, b in vad_like_utterances(c)]
    utterances, windows = [], []
    torch.set_num_threads(1)
    for encoder in encoders:
        encoder.embed(wavs[:2])  # warm-up
        embedded = encoder.embed(wavs)
        utterances.append(np.stack([e.utterance for e in embedded]))
        windows.append(float(np.mean([len(e.partials) for e in embedded])))
    # Wall time, and CPU time: the calling thread's with one torch thread (the work runs on it), the
    # process's with more; on a machine others load, CPU time is the steadier measure of a final's cost.
    best: dict[tuple[int, int], tuple[float, list[float]]] = {}
    best_cpu: dict[tuple[int, int], float] = {}
    for _ in range(repeats):
        for batch in batches:
            for k, encoder in enumerate(encoders):
                torch.set_num_threads(threads[k])
                per_call = []
                clock = time.thread_time if threads[k] == 1 else time.process_time
                cpu_started = clock()
                for i in range(0, len(wavs), batch):
                    started = time.perf_counter()
                    encoder.embed(wavs[i:i + batch])
                    per_call.append((time.perf_counter() - started) / len(wavs[i:i + batch]))
                cpu = (clock() - cpu_started) / len(wavs)
                best_cpu[(k, batch)] = min(cpu, best_cpu.get((k, batch), cpu))
                total = sum(per_call)
                if (k, batch) not in best or total < best[(k, batch)][0]:
                    best[(k, batch)] = (total, per_call)
    rows = []
    for (k, batch), (_, per_final) in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        rows.append({"precision": precisions[k], "resolved": encoders[k].precision, "finals": len(wavs),
                     "batch": batch, "mean_audio_s": round(float(np.mean([len(w) for w in wavs])) / 16000, 2),
                     "threads": threads[k], "windows_per_final": round(windows[k], 2),
                     "ms_per_final_mean": round(1000 * float(np.mean(per_final)), 2),
                     "ms_per_final_median": round(1000 * float(np.median(per_final)), 2),
                     "cpu_ms_per_final": round(1000 * best_cpu[(k, batch)], 2),
                     "min_cosine_to_baseline": round(float(np.min(np.sum(utterances[k] * utterances[0], axis=1))), 5)})
    return rows


# ---- streaming run ----------------------------------------------------------------------------------


async def stream_all(url: str, convs: Sequence[Conversation], diarize: bool, concurrency: int) -> list:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(conv: Conversation):
        async with semaphore:
            return await run_granite_stream(url, conv.plan(), partials=False,
                                            extra_start={"diarize": True} if diarize else {})

    return await asyncio.gather(*(one(c) for c in convs))


def _finals(slog) -> list[dict]:
    return [m for _, m in slog.messages if m.get("type") == "final"]


def _latencies(slog) -> list[float]:
    # Final latency: arrival of the final minus the moment its utterance's last audio was sent.
    out = []
    for arrived, m in slog.messages:
        if m.get("type") == "final":
            out.append(arrived - slog.sent_at(m["end"]))
    return out


def _wer(logs, convs) -> float | None:
    """WER of the English turns' text (reference: the clips' transcripts; hypothesis: the finals
    overlapping them), joined per conversation."""
    from granite_stream_testing.textnorm import wer_cer

    pairs = []
    for slog, conv in zip(logs, convs):
        finals = _finals(slog)
        for t in conv.turns:
            if t.clip.language != "en":
                continue
            hyp = " ".join(f["text"] for f in finals if min(f["end"], t.end) - max(f["start"], t.start) > 0.5 * (f["end"] - f["start"]))
            pairs.append((t.clip.text, hyp))
    return wer_cer(pairs, "en").get("wer") if pairs else None


def _embedding_totals(engine) -> tuple[int, float]:
    """Finals embedded and seconds spent, from the engine's declared counters (Engine.stats)."""
    stats = engine.stats()
    return int(stats.get("speaker_embeddings", 0)), float(stats.get("speaker_embed_seconds", 0.0))


async def run(args) -> dict:
    from stream_server.engines import load_engine
    from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
    from stream_server.core.session import SessionSettings

    from .servers import machine_info

    clips = voice_clips()
    sets = {k: conversations(args.conversations, k, args.turns, args.seed, clips) for k in args.speakers}
    loop = asyncio.get_running_loop()
    engine, reason = await loop.run_in_executor(None, lambda: load_engine(args.engine, None, args.device, args.cpu_threads))
    await loop.run_in_executor(None, engine.warmup)
    settings = ServerSettings(network=NetworkSettings(port=0), limits=LimitsSettings(max_sessions_per_ip=4096),
                              session=SessionSettings())
    results: dict = {"schema": "granite-stream-bench-diarization/1", "machine": machine_info(), "reason": reason,
                     "engine": engine.capabilities.to_wire(), "args": {k: str(v) for k, v in vars(args).items()},
                     "speaker_settings": dataclasses.asdict(settings.session.speakers)}
    async with StreamServer(engine, settings, reason) as server:
        for k, convs in sets.items():
            entry: dict = {}
            for diarize in (True, False):
                before = _embedding_totals(engine)
                started = time.perf_counter()
                logs = await stream_all(server.url, convs, diarize, args.concurrency)
                errors = [s.error for s in logs if s.error]
                lat = [x for s in logs for x in _latencies(s)]
                run = {"wall_s": round(time.perf_counter() - started, 1), "errors": errors,
                       "finals": len(lat), "final_latency_s": {"median": round(statistics.median(lat), 3),
                                                               "p95": round(float(np.percentile(lat, 95)), 3)},
                       "wer_en": _wer(logs, convs)}
                if diarize:
                    scores = [score(c.turns, _finals(s)) for c, s in zip(convs, logs)]
                    run |= summarize(scores)
                    after = _embedding_totals(engine)
                    embedded, seconds = after[0] - before[0], after[1] - before[1]
                    run["embed_ms_per_final"] = round(1000 * seconds / max(1, embedded), 2)
                    run["finals_embedded"] = embedded
                    run["finals_with_turns"] = sum(1 for s in logs for f in _finals(s) if f.get("speaker_turns"))
                    # What was published, for reading the errors against the reference turns.
                    run["labels"] = [[[f["start"], f["end"], f.get("speaker"), f.get("speaker_turns")] for f in _finals(s)]
                                     for s in logs]
                entry["diarize" if diarize else "off"] = run
                log.info("%d speakers, diarize=%s: %s", k, diarize, json.dumps(run))
            results[f"speakers_{k}"] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="granite-stream bench diarization", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--speakers", type=lambda v: [int(x) for x in v.split(",")], default=[2, 4],
                   help="speakers per conversation, comma-separated (at most 5 voices)")
    p.add_argument("--conversations", type=int, default=10, help="conversations per speaker count")
    p.add_argument("--turns", type=int, default=8, help="turns per conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=5, help="conversations streamed at once (real time each)")
    p.add_argument("--engine", default="whisper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--tune", action="store_true", help="offline threshold grid instead of the streaming run")
    p.add_argument("--cost", action="store_true",
                   help="only time the encoder per final (batches of 1 and 8), float32 against the default")
    p.add_argument("--precision", default="auto", type=lambda v: v.split(","),
                   help="--tune: the encoder's arithmetic(s), comma-separated (auto, float32, bfloat16)")
    p.add_argument("--offline", action="store_true",
                   help="attribution on VAD-like utterances offline (no server), per window rate and seed set")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="--offline: conversation seeds pooled (default: --seed)")
    p.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[1.3],
                   help="--offline: encoder windows per second to compare, comma-separated")
    p.add_argument("--cost-variants", type=lambda v: v.split(","), default=["float32", "auto", "auto+pauses"],
                   help="--cost: encoders to time, the first the baseline: precision[+pauses][@windows per second]")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if any(not 1 <= k <= len(VOICES) for k in args.speakers):
        p.error(f"--speakers must be within 1-{len(VOICES)}")
    results: dict
    if args.cost:
        convs = [c for k in args.speakers for c in conversations(args.conversations, k, args.turns, args.seed,
                                                                   voice_clips())]
        results = {"cost": cost(convs, precisions=args.cost_variants)}
        print(json.dumps(results, indent=1))
    elif args.offline:
        from stream_server.speakers.clustering import SpeakerSettings

        results = offline(args.seeds or [args.seed], args.speakers, args.conversations, args.turns, args.rates,
                          SpeakerSettings())
        for key, row in results.items():
            print(f"{key}: accuracy {row['accuracy']:.3f} count right {row['speaker_count_right']:.2f} "
                  f"windows/utterance {row['windows_per_utterance']} ({row['utterance_s']} s)")
    elif args.tune:
        from stream_server.speakers.clustering import SpeakerSettings

        clips = voice_clips()
        grid = [round(x, 2) for x in np.arange(0.70, 0.92, 0.02)]
        results = {f"{precision} {k}": tune(conversations(args.conversations, k, args.turns, args.seed, clips), grid,
                                            precision)
                   for precision in args.precision for k in args.speakers}
        for key, rows in results.items():
            precision, k = key.split()
            for threshold, row in rows.items():
                print(f"{precision}: {k} speakers threshold {threshold:.2f}: accuracy {row['accuracy']:.3f} "
                      f"count right {row['speaker_count_right']:.2f} found {row['speakers_found']}")
            default = SpeakerSettings().threshold
            print_breakdown(f"{precision}: {k} speakers, each turn alone, threshold {default:.2f}",
                            rows[min(rows, key=lambda x: abs(x - default))]["breakdown"])
    else:
        results = asyncio.run(run(args))
        print(json.dumps(results, indent=1, default=str))
        for k in args.speakers:
            print_breakdown(f"{k} speakers, streamed", results[f"speakers_{k}"]["diarize"]["breakdown"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
