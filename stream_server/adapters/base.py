"""What every protocol adapter shares: the translator interface, its outputs, and the async runner.

An adapter is two parts:

* a **translator** (sans-I/O, one per connection): it turns the foreign client's frames into inputs
  for one or more native sessions (protocol v1 JSON control messages and audio bytes), and the
  sessions' native events into the foreign server's messages. It never touches a socket, a thread
  or a clock, so it is tested by calling its methods directly;
* :func:`serve_translator`, the thin async shell that carries out a translator's outputs on a
  WebSocket connection, opening sessions through :meth:`StreamServer.open_session` exactly like the
  native route does (same worker, same limits, same metrics, same drain).

Native sessions are addressed by a *key* chosen by the translator (``"main"``, a Twilio track
name, …), so one connection may drive several sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.exceptions import ConnectionClosed

from ..protocol import IDLE_TIMEOUT, error_event
from ..session import Close, Send

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from ..driver import SessionDriver
    from ..server import StreamServer

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
    """Feed a protocol v1 control message (JSON text) to the session under ``key``."""

    key: str
    text: str


@dataclass(frozen=True)
class StreamAudio:
    """Feed audio bytes, in the encoding its ``start`` declared, to the session under ``key``."""

    key: str
    data: bytes


Out = Reply | Hangup | OpenStream | StreamText | StreamAudio


def native(key: str, message_type: str, **fields) -> StreamText:
    """A native control message for the session under ``key``."""
    return StreamText(key, json.dumps({"type": message_type, **fields}))


def audio_chunks(key: str, data: bytes, max_bytes: int, sample_bytes: int = 1) -> list[StreamAudio]:
    """``data`` cut into frames the native session accepts (at most ``max_bytes``, whole samples)."""
    step = max(sample_bytes, max_bytes - max_bytes % sample_bytes)
    return [StreamAudio(key, data[i : i + step]) for i in range(0, len(data), step)]


class Translator(Protocol):
    """One connection's protocol translation. Every method returns outputs to carry out, in order."""

    def opened(self) -> list[Out]:
        """The connection is open (before any client frame)."""

    def client_text(self, text: str) -> list[Out]:
        """A text frame from the client."""

    def client_bytes(self, data: bytes) -> list[Out]:
        """A binary frame from the client."""

    def native_event(self, key: str, event: dict) -> list[Out]:
        """A protocol v1 event of the session under ``key``."""

    def native_closed(self, key: str, code: int, reason: str) -> list[Out]:
        """The session under ``key`` ended (after its ``end``, or on a fatal error)."""


# ---- helpers for translators ----------------------------------------------------------------------


def new_id(prefix: str, length: int = 24) -> str:
    """A random id in the style ``prefix`` + hex (``event_1f3a…``)."""
    return prefix + uuid.uuid4().hex[:length]


def decode_base64(value: object) -> bytes | None:
    """Strict base64 (the standard alphabet, padding checked); ``None`` when ``value`` is not valid."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def query_params(path: str) -> dict[str, list[str]]:
    """The query string of a request path (``ws.request.path``), every value kept."""
    return parse_qs(urlsplit(path).query, keep_blank_values=True)


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law expansion of all 256 byte values to 16-bit linear PCM."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign != 0, magnitude, -magnitude).astype("<i2")


ALAW_TABLE = _alaw_table()


def alaw_to_pcm16(data: bytes) -> bytes:
    """G.711 A-law bytes → 16-bit little-endian PCM (protocol v1 has no A-law encoding)."""
    return ALAW_TABLE[np.frombuffer(data, np.uint8)].tobytes()


@dataclass(frozen=True)
class WavHeader:
    encoding: str  # a protocol v1 encoding, or "alaw"
    sample_rate: int
    channels: int
    data_offset: int


def parse_wav_header(data: bytes) -> WavHeader | str:
    """The format of a RIFF/WAVE stream whose header is at the start of ``data``, or why it is unusable."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return "not a RIFF/WAVE stream"
    offset, fmt = 12, b""
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = data[body : body + size]
        elif chunk_id == b"data":
            if len(fmt) < 16:
                return "WAV data chunk without a complete fmt chunk before it"
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
            if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID names the format
                tag = struct.unpack("<H", fmt[24:26])[0]
            encoding = {(1, 16): "pcm_s16le", (3, 32): "pcm_f32le", (7, 8): "mulaw", (6, 8): "alaw"}.get((tag, bits))
            if encoding is None:
                return f"unsupported WAV format (format tag {tag}, {bits} bits per sample)"
            if not 1 <= channels <= 8:
                return f"unsupported WAV channel count {channels}"
            return WavHeader(encoding, rate, channels, body)
        offset = body + size + (size & 1)
    return "the WAV header is incomplete in the first audio frame"


# ---- the async shell ------------------------------------------------------------------------------


async def serve_translator(server: "StreamServer", ws: "ServerConnection", translator: Translator) -> None:
    """Run one adapter connection: client frames → translator → native sessions → translator → client.

    Mirrors the native route: one writer task per connection (events leave in order), the server's
    outbox limit (a client that does not read is dropped), idle timeout and real-time-factor
    throttling from :class:`ServerSettings`, and every session released when the connection ends.
    """
    settings = server.settings
    address = getattr(ws, "remote_address", None)
    client_ip = str(address[0]) if address else ""
    outbox: asyncio.Queue = asyncio.Queue()
    drivers: dict[str, "SessionDriver"] = {}
    counted: dict[str, float] = {}
    state = {"hangup": False, "dropped": False}
    closing: list[asyncio.Future] = []

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
        if state["dropped"]:
            return
        if outbox.qsize() >= settings.outbox_limit:
            log.warning("adapter connection: client is not reading; closing")
            state["dropped"] = True
            for driver in drivers.values():
                driver.abandon()
            closing.append(asyncio.ensure_future(ws.close(1008, "client too slow: outgoing queue full")))
            return
        if isinstance(item, Hangup):
            state["hangup"] = True
        outbox.put_nowait(item)

    def call(method, *args) -> list[Out]:
        # A translator bug must not leave the connection hanging (or kill a driver's result task).
        try:
            return method(*args)
        except Exception:  # noqa: BLE001
            log.exception("adapter %s failed", type(translator).__name__)
            return [Hangup(1011, "internal error")]

    def run(outs: list[Out]) -> None:
        for out in outs:
            if isinstance(out, (Reply, Hangup)):
                enqueue(out)
            elif isinstance(out, OpenStream):
                if out.key not in drivers and not state["dropped"]:
                    drivers[out.key] = server.open_session(emitter(out.key), client_ip=client_ip)
            else:
                driver = drivers.get(out.key)
                if driver is None:
                    continue
                if isinstance(out, StreamText):
                    driver.text(out.text)
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
    try:
        run(call(translator.opened))
        while not state["hangup"] and not state["dropped"]:
            try:
                message = await asyncio.wait_for(ws.recv(), timeout=settings.idle_timeout_s or None)
            except TimeoutError:
                notice = error_event(
                    IDLE_TIMEOUT, f"nothing received for {settings.idle_timeout_s:g} s; ending the session", True
                )
                live = [(k, d) for k, d in drivers.items() if not d.closed.is_set()]
                for key, driver in live:
                    driver.dispatch(driver.session.end_stream(notice, 1001, "idle timeout"))
                if not live:
                    enqueue(Hangup(1001, "idle timeout"))
                break
            if isinstance(message, str):
                run(call(translator.client_text, message))
            else:
                run(call(translator.client_bytes, message))
                received = max((d.session.audio_seconds for d in drivers.values()), default=0.0)
                if settings.realtime_factor:
                    ahead = received / settings.realtime_factor - settings.burst_s - (loop.time() - began)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        if not state["dropped"]:
            # Ending on our side (stop, drain, a limit): let the last messages go out.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writing), timeout=max(settings.drain_deadline_s, 30.0))
    except ConnectionClosed:
        pass
    finally:
        for driver in drivers.values():
            server.release_session(driver)
        drivers.clear()
        outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writing, timeout=5)
