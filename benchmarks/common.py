"""Pieces the benchmark's subcommands share (``bench``, ``bench replay``): argument types, the engine
under test loaded in process, and the dropped-word count. Kept apart from :mod:`benchmarks.cli` so a
subcommand that uses them does not import the dispatcher that imports it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np


BUILTIN_SETS = ("asterisk-en", "asterisk-es", "asterisk-fr", "librivox", "stress-en")
DEFAULT_SETS = ["asterisk-en", "librivox", "stress-en"]


def add_clip_options(group) -> None:
    """Which clips a pass plays: ``--sets``, ``--limit``, ``--seed`` (an argparse parser or group)."""
    group.add_argument("--sets", type=csv_list, default=DEFAULT_SETS,
                       help=f"built-in dev sets, comma-separated ({', '.join(BUILTIN_SETS)}; stress-en: dev "
                            "phrases joined by short pauses into 12-29 s monologues); '' for none")
    group.add_argument("--limit", type=int, default=0, help="use at most this many clips per set (0: all)")
    group.add_argument("--seed", type=int, default=0, help="seed for pauses and clip order")


def add_engine_options(group) -> None:
    """The engine under test: ``--engine``, ``--model``, ``--device``, ``--cpu-threads``."""
    group.add_argument("--engine", default="whisper", choices=("auto", "whisper", "granite"))
    group.add_argument("--model", default=None, help="engine model (whisper: tiny.en [default], base, or a CT2 dir)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    group.add_argument("--cpu-threads", type=int, default=None,
                       help="engine CPU threads (default: serve's, 0: Whisper one per core)")


def add_send_options(group) -> None:
    """How a client sends a stream: ``--frame-ms``, ``--pause``, ``--send-rate``, ``--partial-interval``."""
    group.add_argument("--frame-ms", type=float, default=40.0, help="audio per WebSocket frame (20–100 ms)")
    group.add_argument("--pause", type=pause_range, default=(1.0, 2.0),
                       help="silence between utterances: MIN,MAX seconds")
    group.add_argument("--send-rate", default="native",
                       help="'native' sends each clip at its own rate (8 kHz for asterisk), or a rate in Hz to resample")
    group.add_argument("--partial-interval", type=float, default=None,
                       help="ask for a partial every this many seconds of audio (protocol field; server default 0.5)")


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def pause_range(value: str) -> tuple[float, float]:
    parts = [float(v) for v in csv_list(value)]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError("--pause takes MIN,MAX seconds, e.g. 1,2")
    return parts[0], parts[1]


def engine_options(args) -> dict:
    options = {}
    for item in args.engine_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"granite-stream bench: --engine-option wants KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def offline_engine(args):
    """The engine under test, loaded in this process (the offline references and the drop count use it)."""
    from stream_server.engines import load_engine
    from stream_server.inference.types import WorkerSettings
    from stream_server.settings import EngineSettings

    threads = EngineSettings.cpu_threads if args.cpu_threads is None else args.cpu_threads

    if args.engine_option:
        from stream_server.engines.whisper import WhisperEngine

        dev = "cuda" if args.device == "cuda" else "cpu"
        return WhisperEngine(args.model, device=dev, compute_type="int8" if dev == "cpu" else "float16",
                             cpu_threads=threads, max_batch=args.max_batch or WorkerSettings.max_batch,
                             **engine_options(args))
    engine, _reason = load_engine(args.engine, args.model, args.device, threads, args.max_batch)
    return engine


def session_audio(plan) -> "np.ndarray":
    """A stream's audio as the server's session decoded it (16 kHz float32, the same resampler), so
    that a slice ``[start, end)`` of a final is the audio its decode saw."""
    import numpy as np

    from stream_server.core.audio import AudioDecoder
    from stream_server.core.protocol import AudioFormat

    pcm = (np.clip(plan.audio, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()
    decoder = AudioDecoder(AudioFormat("pcm_s16le", plan.sample_rate, 1))
    return np.concatenate([decoder.decode(pcm), decoder.flush()])


def count_drops(engine, logs: Sequence, offline: dict[str, str]) -> dict:
    """Words of the offline decode (``offline``: clip id -> text) that the streaming finals of the
    stream ``logs`` drop or change, per cause (:func:`benchmarks.scoring.attribute_drops`):
    :func:`benchmarks.scoring.summarize_drops` plus ``clips_detail`` (per clip, with examples), and
    per cause how many of them the offline decode had right against the clip's reference
    (``right_by_cause``).

    Each final's audio is decoded again alone by ``engine``, nothing forced (what the server decoded
    before joining it to the stable words; a piece after a cut with the text before it, as the
    server does), to tell the segmentation's losses from the stabilizer's and the splice's.
    """
    from stream_server.inference.types import SAMPLE_RATE, InferenceRequest

    from benchmarks import scoring

    per_clip = []
    for slog in logs:
        traces = scoring.utterance_traces(slog)
        audio = session_audio(slog.plan)
        language = slog.plan.language if slog.plan.language in engine.capabilities.languages else None
        ordered = sorted((t for ts in traces.values() for t in ts), key=lambda t: t.utterance_id)
        for previous, trace in zip([None, *ordered], ordered):
            piece = audio[round(trace.start * SAMPLE_RATE): round(trace.end * SAMPLE_RATE)]
            before = engine.stats().get("repetition_retries", 0)
            # As the server does: a piece after a cut is decoded with the text before the cut.
            context = previous.final if previous is not None and trace.cut_before else ""
            request = InferenceRequest("drops", trace.utterance_id, "final", piece, language=language,
                                       context=context)
            trace.free = engine.transcribe_batch([request])[0].text if len(piece) else ""
            trace.loop_guard = engine.stats().get("repetition_retries", 0) > before
        for k, planned in enumerate(slog.plan.clips):
            drops = scoring.attribute_drops(offline.get(planned.clip.id, ""), traces.get(k, []),
                                            planned.clip.language, truth=planned.clip.text)
            per_clip.append({"clip_id": planned.clip.id, **drops})
    summary = scoring.summarize_drops(per_clip)
    summary["clips_detail"] = per_clip
    return summary
