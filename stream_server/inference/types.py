"""What the session asks of an engine and what it gets back: the neutral types of the inference layer.

The session (:mod:`stream_server.core.session`) builds :class:`InferenceRequest`s and reads
:class:`InferenceResult`s; the worker carries them; every engine consumes and produces them and
announces what it can serve in :class:`EngineCapabilities`. Living here, below both, they let the
session validate requests without importing any engine package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

SAMPLE_RATE = 16_000
"""Every engine consumes mono float32 audio at this rate, in [-1, 1]."""

Task = Literal["transcribe", "translate"]
RequestKind = Literal["partial", "final"]


@dataclass(frozen=True)
class WorkerSettings:
    """How requests are batched and queued: the ``worker`` section of the server's settings.

    One object serves the local worker's scheduler (:meth:`BatchScheduler.from_settings
    <stream_server.inference.worker.BatchScheduler.from_settings>`), the Ray pool's gateway and
    replicas, and the engines' announced batch bound; their defaults are these.

    Attributes:
        max_batch: most requests in one engine call, across sessions.
        max_wait_ms: how long the oldest queued request may wait for a batch to fill.
        max_queue: queued requests past which partials are shed and new sessions refused.
        final_reserve: queue places beyond ``max_queue`` that only finals may take (not a user
            setting), so that a flood of partials cannot starve endpoints.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 512
    final_reserve: int = 64


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can serve, as announced in the protocol's ``ready`` message.

    Attributes:
        name: engine family, ``"whisper"`` or ``"granite"``.
        model: model identifier or path actually loaded.
        languages: spoken languages it can transcribe (ISO 639-1 codes).
        tasks: subset of ``("transcribe", "translate")``.
        translation_pairs: allowed ``(source, target)`` language pairs for ``translate``.
        keywords: whether keyword biasing is honoured.
        partial_modes: how partial hypotheses can be produced, e.g. ``("llm",)`` or ``("llm", "ctc")``.
        prefix: whether a forced text prefix is honoured (used to keep ``stable_text`` stable).
        max_batch: the largest batch :meth:`Engine.transcribe_batch` accepts.
        language_detection: whether ``language=None`` (auto-detect) is allowed.
        early_results: whether :meth:`Engine.transcribe_batch` accepts ``on_result`` and reports
            results that are ready before the rest of the batch (Granite's CTC partials, which would
            otherwise wait for the batch's LLM decode of finals).
        diarization: whether finals can carry speaker embeddings (``InferenceRequest.diarize``): set
            by :class:`~stream_server.speakers.engine.SpeakerEmbeddingEngine`, which wraps any engine.
        concurrency: how many :meth:`Engine.transcribe_batch` calls may run at once, each from its own
            thread; the worker runs that many lanes and keeps one of them for finals.
    """

    name: str
    model: str
    languages: tuple[str, ...]
    tasks: tuple[str, ...] = ("transcribe",)
    translation_pairs: tuple[tuple[str, str], ...] = ()
    keywords: bool = False
    partial_modes: tuple[str, ...] = ("llm",)
    prefix: bool = True
    max_batch: int = WorkerSettings.max_batch
    language_detection: bool = False
    early_results: bool = False
    diarization: bool = False
    concurrency: int = 1

    def check(
        self,
        task: str,
        language: str | None,
        target_language: str | None,
        keywords: Sequence[str] = (),
        partial_mode: str | None = None,
    ) -> str | None:
        """Say why a request cannot be served, or ``None`` when it can.

        Returns:
            A human-readable sentence naming the missing capability, or ``None``.
        """
        if task not in self.tasks:
            return f"engine {self.name} ({self.model}) does not support task {task!r}; it supports {list(self.tasks)}"
        if language is None:
            if not self.language_detection:
                return f"engine {self.name} ({self.model}) needs an explicit language"
        elif language not in self.languages:
            return (
                f"engine {self.name} ({self.model}) does not recognise language {language!r}; "
                f"it supports {list(self.languages)}"
            )
        if task == "translate":
            target = target_language or "en"
            if language is not None and (language, target) not in self.translation_pairs:
                return (
                    f"engine {self.name} ({self.model}) cannot translate {language!r} to {target!r}; "
                    f"supported pairs: {[f'{s}->{t}' for s, t in self.translation_pairs]}"
                )
            if language is None and not any(t == target for _, t in self.translation_pairs):
                return f"engine {self.name} ({self.model}) cannot translate into {target!r}"
        if keywords and not self.keywords:
            return f"engine {self.name} ({self.model}) does not support keyword biasing"
        if partial_mode is not None and partial_mode not in self.partial_modes:
            return (
                f"engine {self.name} ({self.model}) cannot produce {partial_mode!r} partials; "
                f"it supports {list(self.partial_modes)}"
            )
        return None

    def to_wire(self) -> dict:
        """The ``engine`` object of the protocol's ``ready`` message."""
        return {
            "name": self.name,
            "model": self.model,
            "languages": list(self.languages),
            "tasks": list(self.tasks),
            "translation_pairs": [list(p) for p in self.translation_pairs],
            "keywords": self.keywords,
            "partial_modes": list(self.partial_modes),
            "diarization": self.diarization,
        }


@dataclass
class InferenceRequest:
    """One decode of one utterance's audio.

    Attributes:
        session_id: the owning session.
        utterance_id: the utterance within the session; with ``session_id`` it keys partial replacement.
        kind: ``"final"`` requests are served before ``"partial"`` ones.
        audio: mono float32 samples at :data:`SAMPLE_RATE`.
        task, language, target_language, keywords: the effective config of the utterance.
        prefix: text the hypothesis must start with (the already published ``stable_text``).
        partial_mode: ``"llm"`` or ``"ctc"`` for partials; ignored for finals.
        request_id: unique per session, assigned by the session.
        refresh_only: a partial that only replaces its utterance's partial while that one still waits
            in the queue (the same work, on fresher audio); if none is queued (it has started, or
            finished) the scheduler drops this one unrun, as superseded. Engines ignore it.
        diarize: the session asks for speakers: a final's result should carry speaker embeddings
            (``InferenceResult.speaker``; partials get none, but the first request loads the
            encoder); engines ignore it, the speaker wrapper acts on it.
        context: what was said just before this audio, when it continues the same speech (the
            utterance before it was cut at ``max_utterance_s``); never part of the result. Engines
            may condition on it (Whisper: its previous-text prompt) or ignore it.
    """

    session_id: str
    utterance_id: int
    kind: RequestKind
    audio: np.ndarray
    task: str = "transcribe"
    language: str | None = "en"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    prefix: str = ""
    partial_mode: str = "llm"
    request_id: int = 0
    refresh_only: bool = False
    diarize: bool = False
    context: str = ""

    @property
    def duration(self) -> float:
        """Seconds of audio in the request."""
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Word:
    """One word of a result, timed within the request's audio.

    Attributes:
        word: the word as it appears in the text, punctuation attached (``"Hello,"``).
        start, end: seconds from the start of the request's audio.
        confidence: the model's probability for the word (0-1; for a word of several tokens, the
            mean of its tokens'), or ``None`` when the model did not score it.
    """

    word: str
    start: float
    end: float
    confidence: float | None = None


@dataclass
class InferenceResult:
    """What an engine returns for one request.

    Attributes:
        text: the full hypothesis (it starts with the request's ``prefix`` when the engine honours prefixes).
        language: the language that was recognised or assumed.
        info: engine-specific facts, e.g. ``{"path": "ctc_accept"}`` for Granite's speculative decoding.
        truncated: the decode used its whole new-token budget without ending, so the text may be cut
            short (the final event then says ``"truncated": true``).
        words: ``text``'s words in order, timed and scored (joined with spaces they give ``text``),
            or ``None`` where the engine cannot time words (a translation, a partial).
        confidence: the utterance's confidence (0-1), or ``None``.
        speaker: the utterance's :class:`~stream_server.speakers.encoder.SpeakerEmbeddings` for a
            ``diarize`` final, else ``None``. Session memory only: never sent, never logged (no repr).
    """

    text: str
    language: str | None = None
    info: dict = field(default_factory=dict)
    truncated: bool = False
    words: tuple[Word, ...] | None = None
    confidence: float | None = None
    speaker: Any = field(default=None, repr=False, compare=False)
