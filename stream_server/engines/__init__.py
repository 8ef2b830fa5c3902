"""Speech engines behind one interface, and the rule that picks one.

``auto`` serves Granite when a CUDA GPU is present and its weights load locally; otherwise the
bundled Whisper tiny.en on the CPU. :func:`load_engine` returns the reason with the engine so the
startup log and the ``ready`` message can say what is serving and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from stream_server.engines.granite.options import GraniteOptions
from stream_server.inference.types import SAMPLE_RATE, EngineCapabilities, InferenceRequest, InferenceResult
from stream_server.engines.base import Engine

log = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "whisper", "granite")
DEFAULT_GRANITE_MODEL = "ibm-granite/granite-4.0-1b-speech"


@dataclass(frozen=True)
class EngineSettings:
    """Which engine serves and where: the ``engine`` section of the server's settings.

    Its defaults are :func:`load_engine`'s; ``granite-stream transcribe`` reads the same section.

    Attributes:
        name: one of :data:`ENGINE_NAMES`.
        model: model id or directory; empty for the engine's own default.
        device: ``auto``, ``cpu`` or ``cuda``.
        gpus: one worker per GPU 0..N-1, each with its own engine; 0 for one worker on ``device``.
        preset: ``auto``, ``gpu`` or ``cpu``: which configuration fills the settings no source gave
            (``stream_server.settings.resolve_preset``).
        cpu_threads: engine CPU threads (0: Whisper one per core, shared by its lanes; Granite torch's default).
    """

    name: str = "auto"
    model: str = ""
    device: str = "auto"
    gpus: int = 0
    preset: str = "auto"
    cpu_threads: int = 0


def cuda_available() -> bool:
    """Whether torch is importable and sees a CUDA device (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def load_engine(
    name: str = EngineSettings.name,
    model: str | None = None,
    device: str = EngineSettings.device,
    cpu_threads: int = EngineSettings.cpu_threads,
    max_batch: int | None = None,
    granite_options: GraniteOptions | None = None,
    speakers: bool = True,
    preload_speakers: bool | None = None,
) -> tuple[Engine, str]:
    """Build the engine a server or command should use.

    Args:
        name: ``auto``, ``whisper`` or ``granite``.
        model: model id or directory; engine-specific default when ``None``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cpu_threads: CPU threads for the engine (0: Whisper one per core, shared by its lanes; Granite torch's default).
        max_batch: override the engine's batch bound.
        granite_options: the Granite engine's options when Granite serves (default
            :class:`~stream_server.engines.granite.options.GraniteOptions`; ``max_batch``, when given, replaces theirs).
        speakers: wrap the engine in :class:`~stream_server.speakers.engine.SpeakerEmbeddingEngine`
            (speaker labels on request; the encoder loads, on the engine's device, when the first
            diarizing request arrives) when torch and the encoder's weights are installed.
        preload_speakers: load that encoder at warm-up instead; the caller that owns the speaker
            settings passes theirs (``SpeakerSettings.preload``), ``None`` leaves that default to them.

    Returns:
        ``(engine, reason)`` where ``reason`` says why this engine was chosen.

    Raises:
        ValueError: unknown engine name.
        Exception: an explicitly requested engine failed to load (``auto`` falls back instead).
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {ENGINE_NAMES}")
    engine, reason = _load(name, model, device, cpu_threads, max_batch, granite_options)
    if not speakers:
        return engine, reason
    from stream_server.speakers.engine import wrap

    return (wrap(engine) if preload_speakers is None else wrap(engine, preload=preload_speakers)), reason


def _load(name, model, device, cpu_threads, max_batch, granite_options) -> tuple[Engine, str]:
    if name == "granite":
        return _granite(model, device, max_batch, granite_options), "requested with --engine granite"
    if name == "whisper":
        return _whisper(model, device, cpu_threads, max_batch), "requested with --engine whisper"
    if cuda_available() and (device == "auto" or device.startswith("cuda")):
        try:
            cuda = device if device.startswith("cuda") else "cuda"
            return _granite(model, cuda, max_batch, granite_options), "auto: a CUDA GPU is present and Granite weights loaded"
        except Exception as exc:  # noqa: BLE001 - any load failure means: fall back
            log.warning("auto: Granite could not be loaded (%s); falling back to Whisper", exc)
            reason = f"auto: Granite failed to load ({type(exc).__name__}: {str(exc)[:200]}); bundled Whisper serves"
    else:
        reason = "auto: no CUDA GPU, so the bundled Whisper serves on the CPU"
    whisper_model = None if model is None or "granite" in model else model
    return _whisper(whisper_model, "cpu" if device == "auto" else device, cpu_threads, max_batch), reason


def _whisper(model, device, cpu_threads, max_batch) -> Engine:
    from stream_server.engines.whisper import WhisperEngine

    kwargs = {} if max_batch is None else {"max_batch": max_batch}
    dev, _, index = device.partition(":")
    dev = "cuda" if dev == "cuda" else "cpu"
    return WhisperEngine(model, device=dev, device_index=int(index or 0),
                         compute_type="int8" if dev == "cpu" else "float16", cpu_threads=cpu_threads, **kwargs)


def _granite(model, device, max_batch, options: GraniteOptions | None = None) -> Engine:
    from stream_server.engines.granite.engine import GraniteEngine

    options = options or GraniteOptions()
    if max_batch is not None:
        options = replace(options, max_batch=max_batch)
    return GraniteEngine(model or DEFAULT_GRANITE_MODEL, device=None if device == "auto" else device, options=options)


__all__ = [
    "DEFAULT_GRANITE_MODEL",
    "ENGINE_NAMES",
    "EngineSettings",
    "Engine",
    "EngineCapabilities",
    "InferenceRequest",
    "InferenceResult",
    "SAMPLE_RATE",
    "cuda_available",
    "load_engine",
]
