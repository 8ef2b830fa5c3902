"""The asyncio shell: WebSocket connections in, sessions driven, actions carried out.

One :class:`StreamServer` owns the inference worker and serves, on one port:
``/v1/listen`` (WebSocket, protocol v1), the browser demo at ``/``, ``/healthz``, ``/readyz`` and
``/metrics`` over plain HTTP. It never runs inference or other blocking work on the event loop:
sessions are pure state machines and the engine runs on the worker's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Awaitable, Callable

import prometheus_client
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .engines.base import Engine, InferenceRequest
from .driver import SessionDriver
from .session import Close, Send, Session, SessionSettings
from .worker import BatchScheduler, InferenceWorker

log = logging.getLogger(__name__)

RouteHandler = Callable[["StreamServer", ServerConnection], Awaitable[None]]

WEB_ROOT = Path(__file__).resolve().parent.parent / "web_demo"
LISTEN_PATH = "/v1/listen"


@dataclass
class ServerSettings:
    """Everything the server needs besides the engine.

    Attributes:
        host, port: where to listen (port 0 picks a free port; see :attr:`StreamServer.port`).
        session: per-session bounds and defaults.
        max_sessions: concurrent WebSocket sessions; more are refused with HTTP 503.
        max_batch, max_wait_ms, max_queue: worker batching and queue bounds.
        outbox_limit: events queued for one slow client before it is disconnected (close 1008).
        web_root: directory served at ``/``.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    session: SessionSettings = field(default_factory=SessionSettings)
    max_sessions: int = 256
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 512
    outbox_limit: int = 1024
    web_root: Path = WEB_ROOT


class _Metrics:
    """Prometheus metrics on a private registry (several servers may live in one test process)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.sessions_active = prometheus_client.Gauge("granite_stream_sessions_active", "Open sessions", registry=r)
        self.sessions_total = prometheus_client.Counter("granite_stream_sessions", "Sessions accepted", registry=r)
        self.audio_seconds = prometheus_client.Counter(
            "granite_stream_audio_seconds", "Seconds of audio received", registry=r
        )
        self.finals = prometheus_client.Counter("granite_stream_finals", "Final transcripts sent", registry=r)
        self.partials = prometheus_client.Counter("granite_stream_partials", "Partial transcripts sent", registry=r)
        self.errors = prometheus_client.Counter(
            "granite_stream_errors", "Error events sent, by code", ["code"], registry=r
        )
        self.queue_depth = prometheus_client.Gauge("granite_stream_queue_depth", "Queued inference requests", registry=r)
        self.batch_size = prometheus_client.Histogram(
            "granite_stream_batch_size", "Requests per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.engine_seconds = prometheus_client.Histogram(
            "granite_stream_engine_seconds", "Engine time per batch", registry=r
        )
        self.inference_seconds = prometheus_client.Histogram(
            "granite_stream_inference_seconds",
            "Submit-to-result time per request, by kind",
            ["kind"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )


class StreamServer:
    """The running service.

    Args:
        engine: the speech engine (owned by the server's worker from :meth:`start` on).
        settings: server settings.
        engine_reason: why this engine serves (logged and shown on ``/readyz``).
    """

    def __init__(self, engine: Engine, settings: ServerSettings | None = None, engine_reason: str = ""):
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.engine_reason = engine_reason
        self.metrics = _Metrics()
        self.worker = InferenceWorker(
            engine,
            BatchScheduler(self.settings.max_batch, self.settings.max_wait_ms / 1000.0, self.settings.max_queue),
            on_batch=self._observe_batch,
        )
        self._server: Server | None = None
        self._sessions: dict[str, Session] = {}
        self.routes: dict[str, RouteHandler] = {LISTEN_PATH: StreamServer._handle_native}
        self.port: int | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and listen; :attr:`port` is the bound port afterwards."""
        self.worker.start(asyncio.get_running_loop())
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=max(self.settings.session.max_frame_bytes, self.settings.session.limits.max_text_bytes) + 1024,
            ping_interval=20,
            ping_timeout=20,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info(
            "serving %s (%s) on ws://%s:%d%s — %s",
            self.engine.capabilities.name, self.engine.capabilities.model,
            self.settings.host, self.port, LISTEN_PATH, self.engine_reason,
        )

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening, close connections, stop the worker."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    async def __aenter__(self) -> "StreamServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}{LISTEN_PATH}"

    # ---- HTTP ---------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in self.routes:
            if len(self._sessions) >= self.settings.max_sessions:
                return _text_response(HTTPStatus.SERVICE_UNAVAILABLE, "overloaded: too many sessions\n")
            return None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _text_response(
                HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {path}; endpoints: {', '.join(sorted(self.routes))}\n"
            )
        if path == "/healthz":
            return _text_response(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return self._readyz()
        if path == "/metrics":
            self.metrics.queue_depth.set(self.worker.queue_depth)
            body = prometheus_client.generate_latest(self.metrics.registry)
            return _response(HTTPStatus.OK, body, prometheus_client.CONTENT_TYPE_LATEST)
        return self._static(path)

    def _readyz(self) -> Response:
        thread_alive = self.worker._thread is not None and self.worker._thread.is_alive()
        body = {
            "ready": thread_alive,
            "engine": self.engine.capabilities.to_wire(),
            "reason": self.engine_reason,
            "queue_depth": self.worker.queue_depth,
            "sessions": len(self._sessions),
        }
        status = HTTPStatus.OK if thread_alive else HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(body).encode(), "application/json")

    def _static(self, path: str) -> Response:
        root = self.settings.web_root.resolve()
        relative = path.lstrip("/") or "index.html"
        target = (root / relative).resolve()
        # Resolve first, then check containment: rejects ../ and symlinks out of the web root.
        if not target.is_relative_to(root) or not target.is_file():
            return _text_response(HTTPStatus.NOT_FOUND, "not found\n")
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
            content_type += "; charset=utf-8"
        response = _response(HTTPStatus.OK, target.read_bytes(), content_type)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # ---- WebSocket sessions -------------------------------------------------------------------

    def add_route(self, path: str, handler: RouteHandler) -> None:
        """Serve another WebSocket protocol at ``path`` (protocol adapters use this).

        ``handler(server, ws)`` runs for each connection; it drives sessions through
        :meth:`open_session` and :meth:`release_session` like the native handler does.
        """
        self.routes[path] = handler

    def open_session(self, emit, session_settings: SessionSettings | None = None) -> SessionDriver:
        """Create a registered session and its driver; ``emit`` receives its Send/Close actions."""
        session_id = uuid.uuid4().hex[:12]
        session = Session(session_id, self.engine.capabilities, session_settings or self.settings.session)
        self._sessions[session_id] = session
        self.metrics.sessions_active.inc()
        self.metrics.sessions_total.inc()
        return SessionDriver(session, self.worker, emit, self._observe_inference)

    def release_session(self, driver: SessionDriver) -> None:
        """Forget a session opened with :meth:`open_session` (idempotent)."""
        driver.abandon()
        if self._sessions.pop(driver.session.session_id, None) is not None:
            self.metrics.sessions_active.dec()

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0]
        await self.routes[path](self, ws)

    async def _handle_native(self, ws: ServerConnection) -> None:
        """Protocol v1: text frames are control messages, binary frames audio, events go out as JSON."""
        outbox: asyncio.Queue = asyncio.Queue()
        writer = asyncio.create_task(self._writer(ws, outbox))

        def emit(action) -> None:
            if outbox.qsize() >= self.settings.outbox_limit:
                if not driver.closed.is_set():
                    log.warning("session %s: client is not reading; closing", driver.session.session_id)
                    outbox.put_nowait(Close(1008, "client too slow: outgoing queue full"))
                    driver.abandon()
                return
            outbox.put_nowait(action)

        driver = self.open_session(emit)
        session = driver.session
        received_seconds = 0.0
        try:
            async for message in ws:
                if isinstance(message, str):
                    driver.text(message)
                else:
                    driver.audio(message)
                    self.metrics.audio_seconds.inc(max(0.0, session.audio_seconds - received_seconds))
                    received_seconds = session.audio_seconds
                if writer.done():
                    break
        except ConnectionClosed:
            pass
        finally:
            self.release_session(driver)
            outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, timeout=5)

    def _observe_inference(self, request: InferenceRequest, seconds: float) -> None:
        self.metrics.inference_seconds.labels(request.kind).observe(seconds)

    async def _writer(self, ws: ServerConnection, outbox: asyncio.Queue) -> None:
        """The only coroutine that sends on ``ws``, so events leave in the order sessions made them."""
        while True:
            action = await outbox.get()
            if action is None:
                return
            try:
                if isinstance(action, Send):
                    event = action.event
                    kind = event.get("type")
                    if kind == "final":
                        self.metrics.finals.inc()
                    elif kind == "partial":
                        self.metrics.partials.inc()
                    elif kind == "error":
                        self.metrics.errors.labels(event.get("code", "unknown")).inc()
                    await ws.send(json.dumps(event, ensure_ascii=False))
                elif isinstance(action, Close):
                    await ws.close(action.code, action.reason)
                    return
            except ConnectionClosed:
                return

    def _observe_batch(self, requests: list[InferenceRequest], seconds: float) -> None:
        # Called on the worker thread; prometheus_client metrics are thread-safe.
        self.metrics.batch_size.observe(len(requests))
        self.metrics.engine_seconds.observe(seconds)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    return Response(status.value, status.phrase, headers, body)


def _text_response(status: HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")
