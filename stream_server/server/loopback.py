"""A synchronous loopback: a session and an engine joined without sockets, threads or an event loop.

After the connection pair in h11's tests (one object drives both ends and hands back what came
out), :class:`Loopback` feeds a :class:`~stream_server.core.session.Session` (or a
``MultichannelSession``) typed commands and audio, runs every ``Submit`` through the engine's
``transcribe_batch`` inline, feeds each outcome back with ``inference_done``, and returns the
events that came out, in order. The whole pipeline from audio to ``final`` then runs in one call
stack: tests assert on typed events, and a file can be transcribed without a server.

The requests one input makes are run right after that input's actions, in order, up to
``max_batch`` at a time, through the worker's own failure isolation
(:func:`~stream_server.inference.worker.decode_isolated`: a failing batch is retried one request at
a time, so only the failing request's utterance gets the error). So no partial is ever still waiting when the
session asks for the next one: the engine keeps up, as an idle server's does, and the queue rules
that matter under load (a ``refresh_only`` partial replacing a waiting one) do not arise; one that
found nothing waiting would be dropped unrun, as the worker does.
"""

from __future__ import annotations

from typing import Protocol

from stream_server.core.events import Audio, Command, Event
from stream_server.core.session import Action, Close, Send, Submit
from stream_server.engines.base import Engine
from stream_server.inference.types import InferenceRequest, InferenceResult
from stream_server.inference.worker import decode_isolated


class SessionLike(Protocol):
    """What the loopback drives: a ``Session`` or a ``MultichannelSession``."""

    def handle(self, command: Command) -> list[Action]: ...

    def inference_done(self, request: InferenceRequest, result: InferenceResult | None,
                       error: str | None = None) -> list[Action]: ...


class Loopback:
    """Drives ``session`` with ``engine``, synchronously.

    Args:
        session: a fresh session (nothing sent to it yet).
        engine: runs the inference requests, on the caller's thread (bound to it here).
        max_batch: most requests handed to ``transcribe_batch`` at once.

    Attributes:
        events: every event the session sent so far, in order.
        requests: every request the engine was asked to run, in order.
        closed: the close the session asked for, once it did.
    """

    def __init__(self, session: SessionLike, engine: Engine, max_batch: int = 1):
        self.session = session
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.events: list[Event] = []
        self.requests: list[InferenceRequest] = []
        self.closed: Close | None = None
        self._queue: list[InferenceRequest] = []
        engine.bind_thread()

    def send(self, *commands: Command) -> list[Event]:
        """Hand the session ``commands`` in order, running inference after each; returns the new events."""
        before = len(self.events)
        for command in commands:
            self._dispatch(self.session.handle(command))
            self._run_queue()
        return self.events[before:]

    def audio(self, data: bytes, frame_bytes: int = 3200) -> list[Event]:
        """Send ``data`` as audio frames of at most ``frame_bytes`` (a client sends small frames:
        partials are scheduled on the audio clock between them); returns the new events."""
        step = max(1, frame_bytes)
        return self.send(*(Audio(data[i : i + step]) for i in range(0, len(data), step)))

    # ---- internals ----------------------------------------------------------------------------

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.events.append(action.event)
            elif isinstance(action, Close):
                self.closed = action
            elif isinstance(action, Submit):
                self._enqueue(action.request)

    def _enqueue(self, request: InferenceRequest) -> None:
        if request.refresh_only:
            self._dispatch(self.session.inference_done(request, None, None))  # nothing waits to be refreshed
            return
        self._queue.append(request)

    def _run_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.requests += batch
            outcomes, _ = decode_isolated(self.engine, batch)
            for request, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    # The engine's failure becomes this utterance's error, worded as the driver words it.
                    self._dispatch(self.session.inference_done(request, None, f"{type(outcome).__name__}: {outcome}"))
                else:
                    self._dispatch(self.session.inference_done(request, outcome))


__all__ = ["Loopback", "SessionLike"]
