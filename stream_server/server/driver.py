"""Carries out a session's actions against an inference worker (the glue every shell shares).

The WebSocket server and the ``transcribe`` command both drive :class:`~stream_server.core.session.Session`
the same way: ``Submit`` goes to the worker and its outcome is fed back into the session; ``Send``
and ``Close`` go to an ``emit`` callback that each shell implements (a socket writer, a printer).
Must be used on the event loop that the worker delivers results to.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from stream_server.core.events import Command
from stream_server.inference.types import InferenceRequest
from stream_server.core.protocol import OVERLOADED
from stream_server.core.multichannel import MultichannelSession
from stream_server.core.session import Action, Close, Send, Session, State, Submit
from stream_server.inference.worker import InferencePool, QueueFull, Superseded

Emit = Callable[[Send | Close], None]
InferenceObserver = Callable[[InferenceRequest, float], None]


class SessionDriver:
    """Drives one session.

    Args:
        session: the state machine.
        worker: where inference requests go.
        emit: receives ``Send`` and ``Close`` actions in the order the session produced them.
        on_inference: optional ``(request, seconds from submit to result)`` observer.
    """

    def __init__(self, session: Session | MultichannelSession, worker: InferencePool, emit: Emit,
                 on_inference: InferenceObserver | None = None):
        self.session = session
        self.worker = worker
        self.emit = emit
        self.on_inference = on_inference
        self._inflight: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self.abandoned = False
        self.client_ip = ""

    def text(self, message: str) -> None:
        self.dispatch(self.session.receive_text(message))

    def command(self, command: Command) -> None:
        self.dispatch(self.session.handle(command))

    def audio(self, data: bytes) -> None:
        self.dispatch(self.session.receive_bytes(data))

    def dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Submit):
                self._submit(action.request)
            else:
                self.emit(action)
                if isinstance(action, Close):
                    self.closed.set()
        if self.session.state == State.CLOSED:
            self.closed.set()

    def abandon(self) -> None:
        """The client is gone: forget the session, its queued requests and pending results."""
        self.abandoned = True
        if self.session.state != State.CLOSED:
            self.session.connection_lost()
        # A multichannel session submits under one id per channel (see multichannel.py).
        for session_id in self.session.session_ids:
            self.worker.cancel_session(session_id)
        for task in self._inflight:
            task.cancel()
        self.closed.set()

    def _submit(self, request: InferenceRequest) -> None:
        try:
            future = self.worker.submit(request)
        except QueueFull as exc:
            self.dispatch(self.session.inference_done(request, None, str(exc), code=OVERLOADED))
            return
        submitted = time.monotonic()

        async def wait() -> None:
            try:
                result = await future
            except Superseded:
                self.dispatch(self.session.inference_done(request, None, None))
            except Exception as exc:  # noqa: BLE001 - the engine's failure becomes this utterance's error
                self.dispatch(self.session.inference_done(request, None, f"{type(exc).__name__}: {exc}"))
            else:
                if self.on_inference is not None:
                    self.on_inference(request, time.monotonic() - submitted)
                self.dispatch(self.session.inference_done(request, result))

        task = asyncio.create_task(wait())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
