"""The one interface every speech engine implements.

An engine is a blocking, thread-confined object: the inference worker calls
:meth:`Engine.transcribe_batch` from its own thread, never from the event loop,
and never from two threads at once. Engines declare what they can do in
:class:`~stream_server.inference.types.EngineCapabilities`; the session validates client requests
against those declarations instead of guessing from the model name.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stream_server.inference.types import SAMPLE_RATE, EngineCapabilities, InferenceRequest, InferenceResult

ResultHook = Callable[[int, InferenceResult], None]
"""``(index in the batch, result)``: a result handed on before its batch ends."""


class Engine(abc.ABC):
    """A speech model that turns batches of utterance audio into text.

    Implementations are used from a single worker thread. They must not keep
    references to request audio after returning.
    """

    capabilities: EngineCapabilities
    model_path: Path | None = None
    """The model's directory on disk where the engine loaded one from there (Whisper's CTranslate2
    directory, which the benchmarks' offline references read), else ``None``."""

    @abc.abstractmethod
    def transcribe_batch(self, requests: Sequence[InferenceRequest],
                         on_result: ResultHook | None = None) -> list[InferenceResult]:
        """Decode a batch.

        Args:
            requests: at most ``capabilities.max_batch`` requests, each already validated with
                :meth:`EngineCapabilities.check`.
            on_result: for engines that declare ``capabilities.early_results``: called (from the
                worker thread) as ``on_result(index, result)`` for results ready before the whole
                batch is. Other engines ignore it; the worker passes it only to those that declare it.

        Returns:
            One result per request, in the same order.

        Raises:
            Exception: any failure fails the whole batch; the worker reports it per request.

        The returned list holds every result, those handed to ``on_result`` too.
        """

    def placement(self) -> str:
        """Where the engine computes: ``"cpu"`` or ``"cuda[:N]"`` (helpers that run beside it, such
        as the speaker encoder, go there too)."""
        return "cpu"

    def bind_thread(self) -> None:
        """Called on the inference worker's thread before its first batch (and after a restart).

        The default does nothing; an engine whose library keeps per-thread state (the current CUDA
        device: CUDA-graph capture and replay use its streams, and a new thread's is cuda:0) sets it
        here.
        """

    def warmup(self) -> None:
        """Run one tiny decode so the first real request does not pay for lazy initialisation."""
        self.transcribe_batch(
            [InferenceRequest("warmup", 0, "final", np.zeros(SAMPLE_RATE // 2, np.float32),
                              language=self.capabilities.languages[0] if self.capabilities.languages else None)]
        )

    def stats(self) -> dict:
        """Counters the engine exposes (e.g. speculative-decoding paths); empty by default."""
        return {}

    def close(self) -> None:
        """Free the model; the engine is unusable afterwards."""
