"""The one connection shell: every WebSocket route, native or foreign, runs through :func:`serve_connection`.

A route is a **translator** (sans-I/O, one per connection) that turns the client's frames into
inputs for one or more native sessions, and the sessions' events into the client's messages. The
native protocol v1 is the identity translator (:class:`NativeTranslator`); the OpenAI, Deepgram and
Twilio adapters (:mod:`stream_server.adapters`) are the others. Everything that concerns the
connection rather than the protocol exists once, here: the idle timeout, real-time throttling, the
bounded outbox and its slow-reader close, metrics, session limits (through
:meth:`StreamServer.open_session`) and release when the connection ends.

Native sessions are addressed by a *key* chosen by the translator (``"main"``, a Twilio track
name, …), so one connection may drive several sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from websockets.exceptions import ConnectionClosed

from stream_server.core.events import Command, Error, Event
from stream_server.core.protocol import IDLE_TIMEOUT
from stream_server.core.session import Close, Send

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from stream_server.server.driver import SessionDriver
    from stream_server.server.app import StreamServer

log = logging.getLogger(__name__)


# ---- translator outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send ``message`` to the client: a dict goes out as a JSON text frame, a str as is."""

    message: dict | str


@dataclass(frozen=True)
class Hangup:
    """Close the client connection (after the replies that precede it)."""

    code: int
    reason: str


@dataclass(frozen=True)
class OpenStream:
    """Open a native session under ``key`` (its events come back through :meth:`Translator.native_event`)."""

    key: str


@dataclass(frozen=True)
class StreamText:
    """Feed a protocol v1 control message (JSON text, as a native client sent it) to the session
    under ``key``: the session's JSON edge parses it and answers a malformed one with ``error``."""

    key: str
    text: str


@dataclass(frozen=True)
class StreamCommand:
    """Hand a typed command (``Start``, ``Configure``, ``Finalize``, ``Stop``) to the session under ``key``."""

    key: str
    command: Command


@dataclass(frozen=True)
class StreamAudio:
    """Feed audio bytes, in the encoding its ``start`` declared, to the session under ``key``."""

    key: str
    data: bytes


Out = Reply | Hangup | OpenStream | StreamText | StreamCommand | StreamAudio


class Translator(Protocol):
    """One connection's protocol translation. Every method returns outputs to carry out, in order."""

    def opened(self) -> list[Out]:
        """The connection is open (before any client frame)."""
        ...

    def client_text(self, text: str) -> list[Out]:
        """A text frame from the client."""
        ...

    def client_bytes(self, data: bytes) -> list[Out]:
        """A binary frame from the client."""
        ...

    def native_event(self, key: str, event: Event) -> list[Out]:
        """A typed event of the session under ``key`` (:class:`~stream_server.core.events.SpeechEnded`
        marks the end of speech)."""
        ...

    def native_closed(self, key: str, code: int, reason: str) -> list[Out]:
        """The session under ``key`` ended (after its ``end``, or on a fatal error)."""
        ...


TranslatorFactory = Callable[["StreamServer", "ServerConnection"], Translator]
"""Makes the translator of one connection to a route (it may read ``ws.request``: path, query)."""


class NativeTranslator:
    """Protocol v1 (``/v1/listen``): one session, frames in and events out unchanged."""

    KEY = "main"

    def opened(self) -> list[Out]:
        return [OpenStream(self.KEY)]

    def client_text(self, text: str) -> list[Out]:
        return [StreamText(self.KEY, text)]

    def client_bytes(self, data: bytes) -> list[Out]:
        return [StreamAudio(self.KEY, data)]

    def native_event(self, key: str, event: Event) -> list[Out]:
        return [Reply(event.to_wire())]  # the one place a native event becomes its JSON

    def native_closed(self, key: str, code: int, reason: str) -> list[Out]:
        return [Hangup(code, reason)]


def native_translator(server: "StreamServer", ws: "ServerConnection") -> Translator:
    return NativeTranslator()


# ---- the shell ------------------------------------------------------------------------------------


async def serve_connection(server: "StreamServer", ws: "ServerConnection", translator: Translator) -> None:
    """Run one connection: client frames → translator → native sessions → translator → client.

    Contract (the same for every route):

    * one writer task per connection sends everything, so messages leave in the order the
      sessions and the translator made them;
    * a client that lets ``outbox_limit`` messages pile up unread is dropped: its sessions are
      abandoned and the connection closed with 1008 ``client too slow: outgoing queue full``;
    * ``idle_timeout_s`` without any frame from the client, before its first message as much as
      after, ends the connection: open sessions are finished as by ``stop`` with a fatal
      ``idle_timeout`` error (finals, ``end``, close 1001); without a session, close 1001 at once;
    * audio faster than ``realtime_factor`` × real time (after ``burst_s``) is throttled by not
      reading the socket; that pause does not count as the client's idleness;
    * every session is released when the connection ends, however it ends.
    """
    settings = server.settings
    address = ws.remote_address
    client_ip = str(address[0]) if address else ""
    outbox: asyncio.Queue[Reply | Hangup | None] = asyncio.Queue()
    drivers: dict[str, "SessionDriver"] = {}
    counted: dict[str, float] = {}
    hung_up = dropped = False
    closing: list[asyncio.Future] = []  # keeps the slow-reader close task referenced

    async def writer() -> None:
        while True:
            item = await outbox.get()
            if item is None:
                return
            try:
                if isinstance(item, Hangup):
                    await ws.close(item.code, item.reason)
                    return
                message = item.message
                await ws.send(message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))
            except ConnectionClosed:
                return

    writing = asyncio.create_task(writer())

    def enqueue(item: Reply | Hangup) -> None:
        nonlocal hung_up, dropped
        if dropped:
            return
        if outbox.qsize() >= settings.outbox_limit:
            log.warning("session %s: client is not reading; closing",
                        ", ".join(d.session.session_id for d in drivers.values()) or "-")
            dropped = True
            for driver in drivers.values():
                driver.abandon()
            # Not through the outbox: the writer is stuck behind the client's full buffers.
            closing.append(asyncio.ensure_future(ws.close(1008, "client too slow: outgoing queue full")))
            return
        if isinstance(item, Hangup):
            hung_up = True
        outbox.put_nowait(item)

    def call(method, *args) -> list[Out]:
        # A translator bug must not leave the connection hanging (or kill a driver's result task).
        try:
            return method(*args)
        except Exception:  # noqa: BLE001
            log.exception("translator %s failed", type(translator).__name__)
            return [Hangup(1011, "internal error")]

    def run(outs: list[Out]) -> None:
        for out in outs:
            if isinstance(out, (Reply, Hangup)):
                enqueue(out)
            elif isinstance(out, OpenStream):
                if out.key not in drivers and not dropped:
                    drivers[out.key] = server.open_session(emitter(out.key), client_ip=client_ip)
            elif (driver := drivers.get(out.key)) is not None:
                if isinstance(out, StreamText):
                    driver.text(out.text)
                elif isinstance(out, StreamCommand):
                    driver.command(out.command)
                else:
                    driver.audio(out.data)
                    seconds = driver.session.audio_seconds
                    server.metrics.audio_seconds.inc(max(0.0, seconds - counted.get(out.key, 0.0)))
                    counted[out.key] = seconds

    def emitter(key: str):
        def emit(action: Send | Close) -> None:
            if isinstance(action, Send):
                server.count_event(action.event)
                run(call(translator.native_event, key, action.event))
            else:
                run(call(translator.native_closed, key, action.code, action.reason))

        return emit

    loop = asyncio.get_running_loop()
    began = loop.time()
    limits = settings.limits
    idle = limits.idle_timeout_s or None
    try:
        try:
            run(call(translator.opened))
            # One deadline moved forward per message (wait_for per frame made a timer, and on
            # Python 3.11 a task, for every 20-100 ms of audio of every stream). timeout_at takes
            # an absolute time; asyncio.timeout takes a delay (passing loop.time() + idle to it
            # once left connections that never sent a first message without any deadline).
            async with asyncio.timeout_at(loop.time() + idle if idle else None) as deadline:
                while not hung_up and not dropped:
                    message = await ws.recv()
                    if idle:
                        deadline.reschedule(loop.time() + idle)
                    if isinstance(message, str):
                        run(call(translator.client_text, message))
                        continue
                    run(call(translator.client_bytes, message))
                    if limits.realtime_factor:
                        received = max((d.session.audio_seconds for d in drivers.values()), default=0.0)
                        ahead = received / limits.realtime_factor - settings.burst_s - (loop.time() - began)
                        if ahead > 0:
                            if idle:
                                deadline.reschedule(loop.time() + ahead + idle)  # our own pause is not idleness
                            await asyncio.sleep(ahead)
        except TimeoutError:
            notice = Error(
                IDLE_TIMEOUT, f"nothing received for {limits.idle_timeout_s:g} s; ending the session", True
            )
            live = [driver for driver in drivers.values() if not driver.closed.is_set()]
            for driver in live:
                driver.dispatch(driver.session.end_stream(notice, 1001, "idle timeout"))
            if not live:
                enqueue(Hangup(1001, "idle timeout"))
        except ConnectionClosed:
            dropped = True  # the client is gone (or the writer closed after the last message)
        if not dropped:
            # Ending on our side (stop, drain, a limit, idle): let the finals and the close go out.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writing), timeout=max(limits.drain_deadline_s, 30.0))
    finally:
        for driver in drivers.values():
            server.release_session(driver)
        drivers.clear()
        outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writing, timeout=5)
