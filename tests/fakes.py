"""A deterministic test double for the engine interface (for session/worker/server logic tests).

It "recognises" one word per 0.4 s of audio, named by the audio's position, so hypotheses of a
growing utterance extend each other like a real recogniser's do. Real engines are tested elsewhere.
"""

from __future__ import annotations

import threading
import time

from stream_server.engines.base import Engine
from stream_server.inference.types import EngineCapabilities, InferenceResult, Word


class CountingEngine(Engine):
    def __init__(self, delay: float = 0.0, max_batch: int = 8, fail_on: set[int] | None = None,
                 timed: bool = False, **caps):
        self.capabilities = EngineCapabilities(
            name="fake", model="counting", languages=caps.pop("languages", ("en", "fr")),
            tasks=caps.pop("tasks", ("transcribe", "translate")),
            translation_pairs=caps.pop("translation_pairs", (("fr", "en"),)), keywords=True,
            max_batch=max_batch, **caps,
        )
        self.delay = delay
        self.batches: list[list] = []
        self.fail_on = fail_on or set()
        self.timed = timed  # finals of transcriptions carry words: "w<i>" over [0.4 i, 0.4 i + 0.4), scored
        self.lock = threading.Lock()

    def text_for(self, request) -> str:
        words = [f"w{i}" for i in range(int(request.duration / 0.4))]
        if request.task == "translate":
            words = [w.upper() for w in words]
        return " ".join(words)

    def transcribe_batch(self, requests):
        with self.lock:
            self.batches.append(list(requests))
        if self.delay:
            time.sleep(self.delay)
        for r in requests:
            if r.utterance_id in self.fail_on and r.kind == "final":
                raise RuntimeError("injected engine failure")
        out = []
        for r in requests:
            text = self.text_for(r)
            if r.prefix and not text.startswith(r.prefix):
                text = (r.prefix + " " + " ".join(text.split()[len(r.prefix.split()):])).strip()
            out.append(InferenceResult(text=text, language=r.language, **self.timing(r, text)))
        return out

    def timing(self, request, text: str) -> dict:
        """Words and confidence like a real engine's, for finals of transcriptions when ``timed``."""
        if not self.timed or request.kind != "final" or request.task != "transcribe":
            return {}
        words = tuple(Word(w, 0.4 * i, 0.4 * i + 0.4, 0.5 + 0.1 * (i % 5)) for i, w in enumerate(text.split()))
        return {"words": words, "confidence": round(sum(w.confidence for w in words) / len(words), 3) if words else None}


class GatedEngine(CountingEngine):
    """Holds every batch until ``gate`` is set; ``entered`` says that a batch is being held."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.entered, self.gate = threading.Event(), threading.Event()

    def transcribe_batch(self, requests):
        self.entered.set()
        self.gate.wait(60)
        return super().transcribe_batch(requests)


class WorkerCrash(BaseException):
    """Kills the worker thread itself (not an engine error that the worker handles per batch)."""


class CrashOnceEngine(CountingEngine):
    """Kills the worker thread on its first batch, then behaves."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.crashed = False

    def transcribe_batch(self, requests):
        if not self.crashed:
            self.crashed = True
            raise WorkerCrash("simulated thread death")
        return super().transcribe_batch(requests)


class PoisonEngine(CountingEngine):
    """Fails any batch that contains a request of utterance 13 (like a bad input or an OOM on big batches)."""

    def transcribe_batch(self, requests):
        if any(r.utterance_id == 13 for r in requests):
            self.batches.append(list(requests))
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().transcribe_batch(requests)
