"""Offline references: the same weights on each whole clip, no streaming.

* ``engine``: the serving engine's own ``transcribe_batch`` on the whole clip (one request, kind
  ``final``, greedy, the engine's window rules; a clip over 29.8 s in pieces cut where it is
  quiet) — isolates what streaming (VAD cuts, partials, the stable-prefix rule) costs.
* ``faster_whisper``: faster-whisper's standard ``WhisperModel(path).transcribe(audio,
  language=…)`` with its defaults (beam 5, temperature fallback, previous-text conditioning,
  no VAD) on the same CTranslate2 directory — the conventional offline reference.
* ``faster_whisper_greedy``: the same with ``beam_size=1`` (what the engine decodes with).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from granite_stream_testing.datasets import Clip
from stream_server.engines.whisper import LONGEST_AUDIO_S

from .loadgen import clip_audio

OFFLINE_MODES = ("engine", "faster_whisper", "faster_whisper_greedy")


def quiet_pieces(audio: np.ndarray, rate: int, longest_s: float = LONGEST_AUDIO_S) -> list[np.ndarray]:
    """``audio`` cut into consecutive pieces of at most ``longest_s``, each cut at the quietest
    100 ms (lowest mean square, 10 ms steps) of the last third of the longest piece that fits
    there: an offline decoder's cut between words, as the VAD's at ``max_utterance_s``."""
    longest = int(longest_s * rate)
    frame, hop = rate // 10, rate // 100
    pieces = []
    start = 0
    while len(audio) - start > longest:
        lo, hi = start + 2 * longest // 3, start + longest - frame
        energy = [float(np.mean(np.square(audio[a : a + frame]))) for a in range(lo, hi + 1, hop)]
        cut = lo + hop * int(np.argmin(energy)) + frame // 2
        pieces.append(audio[start:cut])
        start = cut
    return [*pieces, audio[start:]]


def transcribe_engine(engine, clips: Sequence[Clip]) -> tuple[list[str], float]:
    """Each whole clip through the engine; a clip longer than Whisper keeps in one decode
    (:data:`~stream_server.engines.whisper.LONGEST_AUDIO_S`) in :func:`quiet_pieces`, each piece
    with the text before it as its context (as the session decodes speech it cut), the texts
    joined. Whole, such a clip would be charged with words the engine never heard: asterisk-en
    dev's ``priv-callee-options`` (31.1 s) lost its "Dial 1"."""
    from stream_server.inference.types import SAMPLE_RATE, InferenceRequest

    texts = []
    began = time.perf_counter()
    for i, clip in enumerate(clips):
        language = clip.language if clip.language in engine.capabilities.languages else None
        said: list[str] = []
        for piece in quiet_pieces(clip_audio(clip, SAMPLE_RATE), SAMPLE_RATE):
            request = InferenceRequest("offline", i, "final", piece, language=language, context=" ".join(said))
            said.append(engine.transcribe_batch([request])[0].text)
        texts.append(" ".join(t for t in said if t))
    return texts, time.perf_counter() - began


def transcribe_faster_whisper(model_path: str, clips: Sequence[Clip], cpu_threads: int = 2, beam_size: int = 5,
                              device: str = "cpu") -> tuple[list[str], float]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_path), device=device, compute_type="int8" if device == "cpu" else "float16",
                         cpu_threads=cpu_threads)
    multilingual = model.model.is_multilingual
    texts = []
    began = time.perf_counter()
    for clip in clips:
        audio = clip_audio(clip, 16_000)
        segments, _info = model.transcribe(audio, language=clip.language if multilingual else "en",
                                           beam_size=beam_size)
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts, time.perf_counter() - began


def audio_seconds(clips: Sequence[Clip]) -> float:
    return float(sum(len(clip_audio(c, 16_000)) for c in clips) / 16_000)


def run_offline(engine, model_path: str, clips: Sequence[Clip], modes: Sequence[str] = OFFLINE_MODES,
                cpu_threads: int = 2) -> dict[str, dict]:
    """Transcribe ``clips`` with each mode; returns ``{mode: {"texts", "seconds", "rtf"}}``."""
    total = audio_seconds(clips)
    out: dict[str, dict] = {}
    for mode in modes:
        if mode == "engine":
            texts, seconds = transcribe_engine(engine, clips)
        elif mode == "faster_whisper":
            texts, seconds = transcribe_faster_whisper(model_path, clips, cpu_threads, beam_size=5)
        elif mode == "faster_whisper_greedy":
            texts, seconds = transcribe_faster_whisper(model_path, clips, cpu_threads, beam_size=1)
        else:
            raise ValueError(f"unknown offline mode {mode!r}")
        out[mode] = {"texts": texts, "seconds": round(seconds, 2),
                     "rtf": round(seconds / total, 4) if total else None}
    return out


__all__ = ["OFFLINE_MODES", "run_offline", "transcribe_engine", "transcribe_faster_whisper", "audio_seconds"]
