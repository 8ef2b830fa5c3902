"""The batching hook: speaker embeddings computed on the inference worker, beside the transcription.

:class:`SpeakerEmbeddingEngine` wraps any :class:`~stream_server.engines.base.Engine`. It runs the
inner engine's batch, then embeds the audio of the batch's final requests that ask for speaker labels
(``InferenceRequest.diarize``) in one batched encoder call, and attaches the embeddings to their
results (``InferenceResult.speaker``, never serialised to clients, never logged). It therefore runs
wherever the engine runs: on the worker thread, never on the event loop; on the engine's device.
The encoder (and torch with it) loads when the first request of a diarizing session reaches the
engine, on a thread of its own, so a server whose sessions never ask for speakers never imports
torch; the first diarized final of the process waits for that load (``preload=True`` loads it at
warm-up instead). docs/diarization.md has the trade-off.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from stream_server.inference.types import SAMPLE_RATE, InferenceRequest, InferenceResult
from stream_server.engines.base import Engine, ResultHook
from stream_server.speakers.clustering import SpeakerSettings
from stream_server.speakers.encoder import SpeakerEncoder

log = logging.getLogger(__name__)


class SpeakerEmbeddingEngine(Engine):
    """``inner`` plus speaker embeddings for diarized finals.

    Args:
        inner: the speech engine.
        encoder_factory: builds the encoder on first use (tests pass a fake); default
            :class:`~stream_server.speakers.encoder.SpeakerEncoder` where the inner engine computes
            (:meth:`Engine.placement`).
        preload: load the encoder in :meth:`warmup` (every server start pays for it) instead of
            when the first diarizing request arrives (that session's first final waits for it).
    """

    def __init__(self, inner: Engine, encoder_factory: Callable[[], Any] | None = None,
                 preload: bool = SpeakerSettings.preload):
        self.inner = inner
        self.model_path = inner.model_path  # the inner engine's (Engine.model_path); anything else engine-specific is read from inner
        self._factory = encoder_factory or self._default_encoder
        self.preload = preload
        self._encoder = None
        self._lock = threading.Lock()  # held while the encoder loads: a caller meanwhile waits for it
        self._start_lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._closed = False
        self.embedded = 0  # finals embedded
        self.embed_seconds = 0.0  # time spent embedding them

    def _default_encoder(self) -> SpeakerEncoder:
        device = self.inner.placement()
        return SpeakerEncoder(device, threads=self._cpu_threads(device))

    def _cpu_threads(self, device: str) -> int:
        # torch's thread count is the process's: one thread beside Whisper (CTranslate2 has its own
        # pool, and two torch threads contending with it measured far slower on 2 cores); a torch
        # engine's own setting (Granite on the CPU) is left alone.
        return 1 if device == "cpu" and self.inner.capabilities.name == "whisper" else 0

    @property
    def capabilities(self):
        """The inner engine's (read when asked: the inner engine owns them), with ``diarization``, and
        ``early_results``: results that need no embedding are handed on before the encoder runs."""
        return dataclasses.replace(self.inner.capabilities, diarization=True, early_results=True)

    @property
    def encoder(self):
        """The speaker encoder, loaded on first use (by the loader thread, or :meth:`warmup` with
        ``preload``; a caller arriving during the load waits for it).

        Raises:
            RuntimeError: the engine is closed (nothing loads after :meth:`close`).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the speaker engine is closed")
            if self._encoder is None:
                started = time.perf_counter()
                self._encoder = self._factory()
                log.info("speaker encoder loaded in %.2f s", time.perf_counter() - started)
            return self._encoder

    def transcribe_batch(self, requests: Sequence[InferenceRequest],
                         on_result: ResultHook | None = None) -> list[InferenceResult]:
        """The inner engine's results, with ``speaker`` embeddings on diarized finals.

        With ``on_result`` (the worker passes it: this wrapper declares ``early_results``), every
        result that needs no embedding is handed on as soon as the inner batch returns, before the
        encoder runs, so sessions without ``diarize`` (and partials) never wait for it; an early
        result of the inner engine that needs an embedding gets it before it is handed on. The
        returned list holds every result, embeddings attached.
        """
        if self._encoder is None and any(r.diarize for r in requests):
            self._start_loading()
        hooks: dict[str, ResultHook] = {}
        handed: set[int] = set()

        def hand_on(index: int, result: InferenceResult) -> None:
            if on_result is not None and index not in handed:
                handed.add(index)
                on_result(index, result)

        if on_result is not None and self.inner.capabilities.early_results:
            def early(index: int, result: InferenceResult) -> None:
                if _wants(requests[index]) and result.speaker is None:
                    self._attach([requests[index]], [result])
                hand_on(index, result)

            hooks["on_result"] = early
        results = self.inner.transcribe_batch(requests, **hooks)
        pending = [i for i, (r, res) in enumerate(zip(requests, results)) if _wants(r) and res.speaker is None]
        if pending:
            for index, result in enumerate(results):
                if index not in pending:
                    hand_on(index, result)
            self._attach([requests[i] for i in pending], [results[i] for i in pending])
        return results

    def _attach(self, requests: Sequence[InferenceRequest], results: Sequence[InferenceResult]) -> None:
        try:
            encoder = self.encoder  # waits for a load under way; not counted as embedding time
            started = time.perf_counter()
            embeddings = encoder.embed([r.audio for r in requests])
        except Exception as exc:  # noqa: BLE001 - the transcripts stand; the finals go out unlabelled
            log.warning("speaker embedding failed for %d finals (%s)", len(requests), type(exc).__name__)
            return
        for result, embedding in zip(results, embeddings):
            result.speaker = embedding
        self.embedded += len(requests)
        self.embed_seconds += time.perf_counter() - started

    def _load_and_warm(self, warm: bool = True) -> None:
        # Load, and with ``warm`` embed one window of silence so that the first real call does not
        # pay for the kernels' first-call setup either (the on-demand loader does not: a final may
        # be waiting, and a call of its own would only queue in front of it). A failure is logged
        # and left to the first diarized final to retry (its transcript goes out unlabelled).
        try:
            encoder = self.encoder
            if warm:
                encoder.embed([np.zeros(SAMPLE_RATE, np.float32)])
        except Exception as exc:  # noqa: BLE001 - speaker labels are optional; transcription goes on
            log.warning("speaker encoder failed to load (%s: %s)", type(exc).__name__, exc)

    def _start_loading(self) -> None:
        # On a thread of its own, so that a request announcing a diarizing session ahead of its
        # first final lets the load overlap speech; whoever needs the encoder meanwhile waits on
        # the lock the loader holds.
        with self._start_lock:  # not self._lock: the loader holds that one while it loads
            if self._loader is not None or self._closed:
                return
            self._loader = threading.Thread(target=self._load_and_warm, args=(False,), name="speaker-encoder-load",
                                            daemon=True)
            # Started under the lock, so that close() never finds a loader it cannot join yet.
            self._loader.start()

    def warmup(self, *args, **kwargs) -> None:
        """Warm the inner engine (its own options, e.g. Granite's ``graph_seconds``, pass through);
        with ``preload``, also load the encoder and make its first call here, so that the first
        diarized final waits for neither."""
        self.inner.warmup(*args, **kwargs)
        if self.preload:
            self._load_and_warm()

    def bind_thread(self) -> None:
        self.inner.bind_thread()

    def placement(self) -> str:
        return self.inner.placement()

    def stats(self) -> dict:
        stats = dict(self.inner.stats())
        if self.embedded:  # totals: the server adds them up over its workers
            stats["speaker_embeddings"] = self.embedded
            stats["speaker_embed_seconds"] = round(self.embed_seconds, 3)
        return stats

    def close(self) -> None:
        """Close the inner engine and the encoder. A load under way is waited for (it cannot be
        interrupted inside torch) and its encoder closed too; no load starts afterwards."""
        with self._start_lock:
            self._closed = True  # no new loader thread, and the encoder property refuses to load
            loader = self._loader
        self.inner.close()
        with self._lock:  # the loader holds this lock while it loads: wait for it
            if self._encoder is not None:
                self._encoder.close()
                self._encoder = None
        if loader is not None and loader is not threading.current_thread():
            loader.join()  # it has nothing left to do once the lock was free


def _wants(request: InferenceRequest) -> bool:
    return request.kind == "final" and request.diarize


def wrap(engine: Engine, preload: bool = SpeakerSettings.preload) -> Engine:
    """``engine`` wrapped for speaker labels when the encoder can load here, else ``engine`` itself
    (its capabilities then say ``diarization: false`` and ``diarize`` requests get ``bad_config``);
    ``preload``: see :class:`SpeakerEmbeddingEngine`."""
    from stream_server.speakers.encoder import available

    problem = available()
    if problem is not None:
        log.info("speaker labels unavailable: %s", problem)
        return engine
    return SpeakerEmbeddingEngine(engine, preload=preload)
