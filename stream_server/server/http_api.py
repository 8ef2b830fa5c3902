"""OpenAI-compatible file transcription over HTTP, on the WebSocket server's own port.

``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations`` accept what the official
``openai`` SDK sends (``client.audio.transcriptions.create(file=…, model=…)``): a
``multipart/form-data`` body with

* ``file`` (required): any audio PyAV decodes (wav, mp3, flac, ogg, m4a, webm…);
* ``model``: accepted and echoed in the ``openai-model`` response header; the server's engine serves;
* ``language``: the spoken language (ISO 639-1); absent: the engine's default (or detection);
* ``prompt``: read as comma-separated keywords (as the OpenAI Realtime adapter does);
* ``response_format``: ``json`` (default) | ``text`` | ``srt`` | ``vtt`` | ``verbose_json``;
* ``timestamp_granularities[]``: ``segment`` (default) and/or ``word``, for ``verbose_json``
  (ignored by the other formats);
* ``temperature``: accepted (0–1), no effect (decoding is greedy).

Other fields are ignored, except ``stream=true``, which is refused (stream over the WebSocket).
Translations go to English (the OpenAI contract).

Contract:

* The file runs through the live path: one session (:meth:`StreamServer.open_session`: the same
  engines, inference worker, VAD segmentation into utterances, limits and metrics as a WebSocket
  stream), fed as fast as the worker keeps up, without partials. One final is one segment.
* The request holds a session slot from admission until its response: ``max_sessions`` and
  ``max_sessions_per_ip`` count it, ``drain`` ends it (503 ``shutting_down``), a full inference
  queue refuses it (503).
* Auth is the WebSocket routes' (:func:`stream_server.server.auth.check_access`): ``Authorization: Bearer
  KEY`` as the SDK sends it, or ``?token=KEY``; browsers' ``Origin`` is checked the same way.
* Limits: the body may not exceed ``max_upload_bytes`` (413, refused from ``Content-Length`` before
  it is read), the decoded audio not ``max_upload_audio_s`` nor the session's ``max_session_s``
  (413); the request head must arrive within ``handshake_timeout_s``, the body may not stall for
  ``idle_timeout_s`` (408 ``timeout``) and must be complete within ``upload_timeout_s`` of the head
  (408 ``upload_timeout``), however steadily it trickles. A refused upload releases its session
  slot before the answer is sent; nothing of it has reached the engine.
* Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
  status the SDK maps to its exception classes: 400 bad input, 401 no key, 403 wrong key or origin,
  404/405 unknown path or method, 408 stalled or too slow upload, 413 too large, 415 undecodable audio, 429 too
  many sessions from one address, 500 engine failure, 503 overloaded or shutting down. A failed
  utterance fails the request: a transcript is never silently missing a part.
* Nothing blocking runs on the event loop: multipart parsing and audio decoding run in the default
  executor; the engine runs on the worker's thread.
* One request per connection (``Connection: close``).

Serving POST bodies on websockets' port: websockets 17's server parses only ``GET`` requests and
never reads a body. :class:`HttpServerConnection` (passed to ``serve(create_connection=…)``) looks
at the request line's method before websockets sees a byte: ``GET`` requests (WebSocket upgrades
and the plain HTTP GET routes) go to websockets unchanged; any other method is served by an
HTTP/1.1 exchange on ``h11`` (the sans-I/O HTTP library), on the same transport (TLS included).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import functools
import io
import json
import logging
import math
import select
import time
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import h11
import numpy as np
import prometheus_client
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.server import ServerProtocol

from stream_server.core import captions
from stream_server.server.auth import check_access
from stream_server.inference.types import SAMPLE_RATE
from stream_server.core.protocol import BAD_CONFIG, BAD_MESSAGE, OVERLOADED, SESSION_LIMIT, SHUTTING_DOWN, TOO_LARGE
from stream_server.core.session import Send
from stream_server.core.events import UNSET, AudioFormat, ConfigChange, Error, Final, Start, Stop

if TYPE_CHECKING:
    from stream_server.server.driver import SessionDriver
    from stream_server.server.app import StreamServer

log = logging.getLogger(__name__)

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
TRANSLATIONS_PATH = "/v1/audio/translations"
PATHS = {TRANSCRIPTIONS_PATH: "transcribe", TRANSLATIONS_PATH: "translate"}
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
FEED_CHUNK_S = 0.1
"""Audio per session frame, as ``transcribe`` feeds files (:func:`stream_server.cli.stream_audio`)."""
_MAX_HEAD_BYTES = 16 * 1024
_METHOD_SNIFF_BYTES = 16  # longer than any HTTP method plus its space


# ---- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request refused with ``status`` and OpenAI's error body."""

    def __init__(self, status: HTTPStatus, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def response(self) -> "HttpResponse":
        kind = {401: "invalid_request_error", 403: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status.value, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return HttpResponse.json(body, self.status, self.headers)


class _UploadTimeout(Exception):
    """The body's total deadline passed (:meth:`HttpServerConnection.read_body` answers it 408)."""


# Session error codes → HTTP status of the request they fail.
_SESSION_ERROR_STATUS = {
    BAD_CONFIG: HTTPStatus.BAD_REQUEST,
    BAD_MESSAGE: HTTPStatus.BAD_REQUEST,
    TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    SESSION_LIMIT: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    OVERLOADED: HTTPStatus.SERVICE_UNAVAILABLE,
    SHUTTING_DOWN: HTTPStatus.SERVICE_UNAVAILABLE,
}


@dataclass
class HttpResponse:
    status: HTTPStatus
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any, status: HTTPStatus = HTTPStatus.OK, headers: dict[str, str] | None = None) -> "HttpResponse":
        return cls(status, json.dumps(value, ensure_ascii=False).encode(), "application/json", dict(headers or {}))

    @classmethod
    def text(cls, text: str, content_type: str = "text/plain; charset=utf-8") -> "HttpResponse":
        return cls(HTTPStatus.OK, text.encode(), content_type)


# ---- the request's fields -------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A parsed request: the file's bytes and the form fields that matter."""

    audio: bytes
    model: str
    language: str | None
    keywords: tuple[str, ...]
    response_format: str
    granularities: frozenset[str]


def parse_form(content_type: str, body: bytes) -> dict[str, list[bytes]]:
    """The parts of a ``multipart/form-data`` body by field name (the stdlib ``email`` parser).

    Raises:
        ApiError: 400 for a body that is not multipart/form-data.
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be multipart/form-data (fields 'file', 'model', …)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise ApiError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body")
    form: dict[str, list[bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True)  # bytes for a leaf part, None for a nested multipart
            form.setdefault(str(name), []).append(payload if isinstance(payload, bytes) else b"")
    return form


def read_upload(form: dict[str, list[bytes]], task: str) -> Upload:
    """Validate the form fields (see the module docstring).

    Raises:
        ApiError: 400 naming the bad field.
    """

    def text(name: str) -> str | None:
        values = form.get(name)
        if not values:
            return None
        try:
            return values[0].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' is not UTF-8 text", param=name) from None

    if not form.get("file"):
        raise ApiError(HTTPStatus.BAD_REQUEST, "'file' is required: the audio file to transcribe", param="file")
    audio = form["file"][0]
    if not audio:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'file' is empty", param="file")
    response_format = text("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format")
    granularities: set[str] = set()
    for key in ("timestamp_granularities[]", "timestamp_granularities"):
        for raw in form.get(key, []):
            value = raw.decode("utf-8", "replace").strip()
            if value not in GRANULARITIES:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'timestamp_granularities[]' items must be 'word' or 'segment'",
                               param="timestamp_granularities")
            granularities.add(value)
    temperature = text("temperature")
    if temperature:
        try:
            ok = 0.0 <= float(temperature) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'temperature' must be a number from 0 to 1", param="temperature")
    if (text("stream") or "").lower() == "true":
        raise ApiError(HTTPStatus.BAD_REQUEST, "streamed responses are not offered here; stream audio over the "
                       "WebSocket routes (/v1/listen, /v1/realtime) instead", param="stream")
    prompt = text("prompt") or ""
    keywords = tuple(t.strip() for t in prompt.replace("\n", ",").split(",") if t.strip())
    return Upload(audio=audio, model=text("model") or "", language=text("language") or None, keywords=keywords,
                  response_format=response_format, granularities=frozenset(granularities or {"segment"}))


class AudioTooLong(Exception):
    pass


def decode_upload(data: bytes, max_seconds: float) -> np.ndarray:
    """Decode an uploaded file to mono float32 at 16 kHz with PyAV, stopping past ``max_seconds``.

    Decoding stops as soon as the limit is passed, so a small, highly compressed file cannot make
    the server hold hours of samples.

    Raises:
        AudioTooLong: more than ``max_seconds`` of audio.
        ValueError: no audio stream, or undecodable data.
    """
    import av

    limit = int(max_seconds * SAMPLE_RATE) if max_seconds > 0 else None
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise ValueError("the file has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            frames = container.decode(audio=0)
            for frame in [*frames, None]:
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += samples.size
                    if limit is not None and total > limit:
                        raise AudioTooLong()
                    chunks.append(samples)
    except (AudioTooLong, ValueError):
        raise
    except Exception as exc:  # PyAV raises many types (FFmpegError subclasses, …) for undecodable input
        raise ValueError(str(exc) or type(exc).__name__) from exc
    if total == 0:
        raise ValueError("the file holds no audio samples")
    return (np.concatenate(chunks).astype(np.float32) / 32768.0).astype(np.float32)


def _prepare(content_type: str, body: bytes, task: str, max_seconds: float) -> tuple[Upload, np.ndarray]:
    """Parse and decode (blocking: runs in an executor)."""
    upload = read_upload(parse_form(content_type, body), task)
    try:
        audio = decode_upload(upload.audio, max_seconds)
    except AudioTooLong:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"the audio is longer than this server's limit of {max_seconds:g} s", code="audio_too_long",
                       param="file") from None
    except ValueError as exc:
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"cannot decode the file as audio: {exc}",
                       code="unsupported_audio", param="file") from None
    return upload, audio


# ---- responses ------------------------------------------------------------------------------------


def _compression_ratio(text: str) -> float:
    # Whisper's repetition signal, computed the same way (zlib over the UTF-8 text).
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def render(finals: list[dict], upload: Upload, task: str, duration: float, default_language: str) -> HttpResponse:
    """The response body for ``upload.response_format`` from the session's non-empty finals."""
    finals = [f for f in finals if f.get("text", "").strip()]
    text = " ".join(f["text"].strip() for f in finals)
    fmt = upload.response_format
    if fmt == "text":
        return HttpResponse.text(captions.to_text(finals))
    if fmt == "srt":
        return HttpResponse.text(captions.to_srt(finals))
    if fmt == "vtt":
        return HttpResponse.text(captions.to_vtt(finals), "text/vtt; charset=utf-8")
    usage = {"type": "duration", "seconds": round(duration, 3)}
    if fmt == "json":
        return HttpResponse.json({"text": text, "usage": usage})
    language = next((f["language"] for f in finals if f.get("language")), None) or upload.language or default_language
    body: dict[str, Any] = {"task": task, "language": language, "duration": round(duration, 3), "text": text}
    if "segment" in upload.granularities:
        segments = []
        for index, f in enumerate(finals):
            confidence = f.get("confidence")
            segment = {
                "id": index, "seek": int(round(f["start"] * 100)), "start": f["start"], "end": f["end"],
                "text": f["text"].strip(), "tokens": [], "temperature": 0.0,
                # Where the final has a confidence (mean word probability), its log; else unknown (0).
                "avg_logprob": round(math.log(confidence), 4) if confidence else 0.0,
                "compression_ratio": _compression_ratio(f["text"]), "no_speech_prob": 0.0,
                "confidence": confidence,
            }
            if f.get("speaker") is not None:
                segment["speaker"] = f["speaker"]
            segments.append(segment)
        body["segments"] = segments
    if "word" in upload.granularities:
        words = []
        for f in finals:
            for w in f.get("words") or []:
                word = {"word": w["word"], "start": w["start"], "end": w["end"], "confidence": w.get("confidence")}
                if w.get("speaker") is not None:
                    word["speaker"] = w["speaker"]
                words.append(word)
        body["words"] = words
    body["usage"] = usage
    return HttpResponse.json(body)


# ---- the endpoint ---------------------------------------------------------------------------------


class FileTranscriptionApi:
    """Serves the two endpoints for one :class:`StreamServer` (see the module docstring)."""

    def __init__(self, server: "StreamServer"):
        self.server = server
        self.requests = prometheus_client.Counter(
            "granite_stream_http_requests", "File transcription requests (POST /v1/audio/…), by endpoint and status",
            ["endpoint", "status"], registry=server.metrics.registry,
        )

    async def serve(self, conn: "HttpServerConnection", request: h11.Request) -> None:
        """Answer one request on ``conn`` and close it."""
        target = request.target.decode("latin-1")
        path = target.split("?", 1)[0]
        began = time.monotonic()
        try:
            response = await self._respond(conn, request, target, path)
        except ApiError as exc:
            response = exc.response()
        except ConnectionError:
            return  # the client is gone; nothing to answer
        except Exception:  # noqa: BLE001 - a bug answers 500 rather than dropping the connection
            log.exception("file transcription failed")
            response = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", code="internal").response()
        if path in PATHS:
            self.requests.labels(path.rsplit("/", 1)[1], str(response.status.value)).inc()
        log.info("%s %s -> %d in %.2f s", request.method.decode("latin-1"), path, response.status.value,
                 time.monotonic() - began)
        await conn.send_response(response)

    async def _respond(self, conn: "HttpServerConnection", request: h11.Request, target: str, path: str) -> HttpResponse:
        server, settings = self.server, self.server.settings
        if path not in PATHS:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no HTTP endpoint for {request.method.decode('latin-1')} {path}; "
                           f"POST {TRANSCRIPTIONS_PATH} or {TRANSLATIONS_PATH}", code="not_found")
        if request.method != b"POST":
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST", code="method_not_allowed",
                           headers={"Allow": "POST"})
        headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers)
        refusal = check_access(settings.access, target, headers)
        if refusal is not None:
            status, reason = refusal
            raise ApiError(HTTPStatus(status), reason, code="invalid_api_key" if status == 401 else "forbidden")
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > settings.limits.max_upload_bytes:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the upload is larger than this server's limit of {settings.limits.max_upload_bytes} bytes",
                           code="file_too_large", param="file")
        refusal = server.admission_refusal(conn.client_ip)
        if refusal is not None:
            status, reason = refusal
            code = SHUTTING_DOWN if server.draining else "overloaded" if status == 503 else "rate_limit_exceeded"
            raise ApiError(HTTPStatus(status), reason, code=code)
        finals: list[dict] = []  # wire form: the response is built from them as the client would get them
        errors: list[Error] = []

        def emit(action: object) -> None:
            if isinstance(action, Send):
                server.count_event(action.event)
                if isinstance(action.event, Final):
                    finals.append(action.event.to_wire())
                elif isinstance(action.event, Error):
                    errors.append(action.event)

        driver = server.open_session(emit, client_ip=conn.client_ip)  # holds the slot until the answer
        try:
            work: asyncio.Future[Any] = asyncio.ensure_future(self._run(conn, driver, headers, path, errors))
            lost: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(conn.connection_lost_waiter))
            done, _ = await asyncio.wait([work, lost], return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                raise ConnectionError("client disconnected")
            lost.cancel()
            upload, duration = work.result()
        finally:
            server.release_session(driver)
        task = PATHS[path]
        response = render(finals, upload, task, duration, server.engine.capabilities.languages[0]
                          if server.engine.capabilities.languages else "en")
        if upload.model:
            response.headers["openai-model"] = upload.model
        return response

    async def _run(self, conn: "HttpServerConnection", driver: "SessionDriver", headers: Headers, path: str,
                   errors: list[Error]) -> tuple[Upload, float]:
        """Read the body, decode it, stream it through the session; returns the upload and its duration."""
        settings, limits = self.server.settings, self.server.settings.limits
        body = await conn.read_body(limits.max_upload_bytes, limits.idle_timeout_s or None,
                                    limits.upload_timeout_s or None)
        max_seconds = min(s for s in (limits.max_upload_audio_s, settings.session.max_session_s) if s > 0) \
            if (limits.max_upload_audio_s > 0 or settings.session.max_session_s > 0) else 0.0
        loop = asyncio.get_running_loop()
        upload, audio = await loop.run_in_executor(
            None, functools.partial(_prepare, headers.get("Content-Type", ""), body, PATHS[path], max_seconds))
        del body
        if driver.closed.is_set():  # drained while the file was read
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down", code=SHUTTING_DOWN)
        options = ConfigChange(task=PATHS[path], language=upload.language or UNSET, keywords=tuple(upload.keywords),
                               partials=False, target_language="en" if PATHS[path] == "translate" else UNSET)
        await self._stream(driver, audio, Start(AudioFormat("pcm_f32le", SAMPLE_RATE, 1), options))
        if errors:
            error = errors[0]
            status = _SESSION_ERROR_STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)
            param = "language" if error.code == BAD_CONFIG and upload.language else None
            raise ApiError(status, error.message or "the transcription failed", code=error.code, param=param)
        return upload, len(audio) / SAMPLE_RATE

    async def _stream(self, driver: "SessionDriver", audio: np.ndarray, start: Start) -> None:
        """Feed the audio through the session as ``transcribe`` does, then ``stop`` and wait for its end.

        Fed as fast as the worker keeps up (no real-time throttle: the upload is complete), yielding
        to the event loop between frames and waiting while the inference queue is deep, so live
        streams' requests keep their turn.
        """
        server = self.server
        driver.command(start)
        step = int(FEED_CHUNK_S * SAMPLE_RATE)
        pace = 2 * server.settings.worker.max_batch
        counted = 0.0
        for offset in range(0, len(audio), step):
            if driver.closed.is_set():
                break  # a fatal error (bad_config, session_limit) or a drain ended the session
            driver.audio(audio[offset: offset + step].astype("<f4").tobytes())
            seconds = driver.session.audio_seconds
            server.metrics.audio_seconds.inc(max(0.0, seconds - counted))
            counted = seconds
            await asyncio.sleep(0)
            while server.worker.status().queue_depth > pace and not driver.closed.is_set():
                await asyncio.sleep(0.01)
        if not driver.closed.is_set():
            driver.command(Stop())
        await driver.closed.wait()


# ---- the connection: GET to websockets, other methods to h11 --------------------------------------


class HttpServerConnection(ServerConnection):
    """A websockets server connection that serves requests other than ``GET`` itself, over ``h11``.

    Pass it to ``websockets.asyncio.server.serve`` through :func:`connection_factory`, with
    ``open_timeout=None``: the handshake timeout is applied here instead, to the WebSocket handshake
    as before and to an HTTP request's head, but not to an upload and its transcription, which
    would not fit in a handshake's seconds.
    """

    def __init__(self, protocol: ServerProtocol, server: Server, *, api: FileTranscriptionApi,
                 open_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.api = api
        self.open_timeout = open_timeout
        self._sniffed = b""
        self._mode: str | None = None  # None until the method is known, then "websocket" or "http"
        self._http: h11.Connection | None = None
        self._diverted: asyncio.Future[None] = self.loop.create_future()
        self._readable = asyncio.Event()
        self._discarding = False

    @property
    def client_ip(self) -> str:
        address = self.remote_address
        return str(address[0]) if address else ""

    # asyncio protocol callbacks

    def data_received(self, data: bytes) -> None:
        if self._mode == "websocket":
            super().data_received(data)
            return
        if self._mode == "http":
            if not self._discarding:
                self._feed_http(data)
            self._readable.set()
            return
        self._sniffed += data
        space = self._sniffed.find(b" ", 0, _METHOD_SNIFF_BYTES)
        if space < 0 and len(self._sniffed) < _METHOD_SNIFF_BYTES:
            return  # the method is not complete yet
        head, self._sniffed = self._sniffed, b""
        if space < 0 or head[:space] == b"GET":
            # WebSocket upgrades and the GET routes, or not HTTP at all: websockets' handling, as before.
            self._mode = "websocket"
            super().data_received(head)
            return
        self._mode = "http"
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self._feed_http(head)
        self._diverted.set_result(None)

    def eof_received(self) -> None:
        # Returning None (falsy) lets the transport close, in both modes.
        if self._mode == "http":
            self._feed_http(b"")
            return  # a half-closed client gets no answer
        if self._mode is None and self._sniffed:
            self._mode = "websocket"
            super().data_received(self._sniffed)
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._readable.set()

    def _feed_http(self, data: bytes) -> None:
        assert self._http is not None
        if self._http.their_state not in (h11.DONE, h11.CLOSED, h11.ERROR):
            self._http.receive_data(data)
        self._readable.set()

    # the exchange

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(self.open_timeout):
            await asyncio.wait([self.request_rcvd, self.connection_lost_waiter, self._diverted],
                               return_when=asyncio.FIRST_COMPLETED)
            if not self._diverted.done():
                await super().handshake(*args, **kwargs)
                return
            try:
                request = await self._next_event()
            except h11.RemoteProtocolError as exc:
                await self.send_response(ApiError(HTTPStatus(exc.error_status_hint), f"bad HTTP request: {exc}",
                                                  code="bad_request").response())
                return
            except ConnectionError:
                return
        if isinstance(request, h11.Request):
            await self.api.serve(self, request)
        # protocol_handler aborts the transport after this returns (the WebSocket never opened);
        # send_response has closed it and waited for the answer to leave.

    async def _next_event(self, timeout: float | None = None,
                          deadline: float | None = None) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, waiting for data up to ``timeout`` seconds between reads and, in
        total, until ``deadline`` (a time of the event loop's clock).

        Raises:
            ConnectionError: the connection ended first.
            ApiError: 408 ``timeout`` when nothing arrived for ``timeout``.
            _UploadTimeout: the next event was not complete by ``deadline``.
        """
        assert self._http is not None
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                if self.connection_lost_waiter.done():
                    raise ConnectionError("connection closed")
                wait, total = timeout, False  # total: the wait ends at the deadline, not the idle bound
                if deadline is not None:
                    left = deadline - self.loop.time()
                    total = wait is None or left <= wait
                    wait = left if total else wait
                    if left <= 0:
                        raise _UploadTimeout()
                self._readable.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._readable.wait()
                except TimeoutError:
                    if total:
                        raise _UploadTimeout() from None
                    raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"nothing received for {timeout:g} s",
                                   code="timeout") from None
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed")
            if isinstance(event, h11.Event):
                return event
            return h11.PAUSED  # the other sentinel (NEED_DATA is waited on above)

    async def read_body(self, limit: int, idle_timeout: float | None, total_timeout: float | None = None) -> bytes:
        """The request body (``Content-Length`` or chunked), at most ``limit`` bytes, complete within
        ``total_timeout`` seconds of this call (None: no total bound).

        The total bound sits here, where the bytes are read, rather than around the request: a
        client that trickles a byte just before each ``idle_timeout`` would otherwise hold its
        session slot and buffer for as long as it likes, while the transcription that follows is
        bounded by the audio limits instead.

        Raises:
            ApiError: 413 past ``limit``, 408 ``timeout`` when the body stalls for ``idle_timeout``,
                408 ``upload_timeout`` past ``total_timeout``, 400 for bad framing.
            ConnectionError: the client went away.
        """
        assert self._http is not None
        deadline = None if total_timeout is None else self.loop.time() + total_timeout
        if self._http.they_are_waiting_for_100_continue:
            self.transport.write(self._http.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                try:
                    event = await self._next_event(idle_timeout, deadline)
                except _UploadTimeout:
                    log.info("upload from %s refused: %d bytes received, not complete within upload_timeout_s "
                             "(%g s)", self.client_ip, size, total_timeout)
                    raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the upload was not complete within this server's "
                                   f"limit of {total_timeout:g} s ({size} bytes received)",
                                   code="upload_timeout", param="file") from None
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:
                        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                       f"the upload is larger than this server's limit of {limit} bytes",
                                       code="file_too_large", param="file")
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad HTTP request body: {exc}", code="bad_request") from None
        # Nothing more is read from this connection (one request each): stop buffering what a
        # client might still send while the file is transcribed.
        self.transport.pause_reading()
        return b"".join(parts)

    async def send_response(self, response: HttpResponse) -> None:
        """Send ``response`` with ``Connection: close``, then close once it has left."""
        assert self._http is not None
        if self.transport.is_closing() or self._http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.abort()
            return
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("Connection", "close"), *response.headers.items()]
        try:
            data = self._http.send(h11.Response(status_code=response.status.value, headers=headers,
                                                reason=response.status.phrase.encode()))
            data += self._http.send(h11.Data(data=response.body)) + self._http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.transport.abort()
            return
        self.transport.write(data)
        try:
            await asyncio.wait_for(self.drain(), timeout=30)
        except (TimeoutError, ConnectionError):
            self.transport.abort()
            return
        if self._http.their_state is h11.SEND_BODY:
            await self._linger()
        self.transport.close()  # flushes, then closes
        try:
            await asyncio.wait_for(asyncio.shield(self.connection_lost_waiter), timeout=30)
        except TimeoutError:
            self.transport.abort()

    async def _linger(self, idle_s: float = 5.0, total_s: float = 30.0) -> None:
        """Read and drop the rest of an unread body (a refused upload) before closing.

        Closing a socket with unread data makes the kernel send a reset, and a client still writing
        its upload would see "connection reset" instead of the answer (the lingering close of
        Apache and nginx; ``idle_s`` is nginx's ``lingering_timeout``, ``total_s`` its
        ``lingering_time``). It ends when the client closes, sends nothing for ``idle_s``, or
        after ``total_s``; never while received bytes wait unread (see :meth:`_input_pending`).
        """
        self._discarding = True
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the answer end while we keep reading
        loop = self.loop
        until = loop.time() + total_s
        while not self.connection_lost_waiter.done() and loop.time() < until:
            self._readable.clear()
            try:
                await asyncio.wait_for(self._readable.wait(), timeout=idle_s)
            except TimeoutError:
                if self._input_pending():
                    continue  # the loop, not the client, was late: read it, or closing resets
                return

    def _input_pending(self) -> bool:
        """Whether bytes (or the client's EOF) wait in the kernel, not yet delivered to
        :meth:`data_received`.

        On a late event loop (a starved process), the client's next bytes can land in the turn
        in which the overdue idle timer fires, after that turn's poll: the timed-out wait resumes
        before they are read. Closing then would reset the connection, and the client would lose
        the answer it has not read yet.
        """
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):  # already closed
            return False
        return bool(readable)


def connection_factory(server: "StreamServer") -> type[ServerConnection]:
    """``create_connection`` for ``serve``: :class:`HttpServerConnection` bound to ``server``'s API."""
    factory = functools.partial(HttpServerConnection, api=FileTranscriptionApi(server),
                                open_timeout=server.settings.handshake_timeout_s)
    # websockets annotates create_connection as a class but only calls it, with (protocol, server,
    # **kwargs), as this partial takes them.
    return cast("type[ServerConnection]", factory)
