"""The asyncio shell: WebSocket connections in, sessions driven, actions carried out.

One :class:`StreamServer` owns the inference worker and serves, on one port:
``/v1/listen`` (WebSocket, protocol v1), the browser demo at ``/``, ``/healthz``, ``/readyz`` and
``/metrics`` over plain HTTP, and OpenAI-compatible file transcription (``POST /v1/audio/…``,
:mod:`stream_server.server.http_api`). It never runs inference or other blocking work on the event loop:
sessions are pure state machines and the engine runs on the worker's thread.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import mimetypes
import os
import ssl
import time
import uuid
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any, Mapping, Sequence

import prometheus_client
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from stream_server.engines.base import Engine
from stream_server.inference.types import InferenceRequest, WorkerSettings
from stream_server.server.auth import AccessPolicy, SecuritySettings, check_access, select_subprotocol
from stream_server.server.driver import SessionDriver
from stream_server.server.logs import LoggingSettings, current_session
from stream_server.core.multichannel import MultichannelSession
from stream_server.server import http_api
from stream_server.inference import memory
from stream_server.inference.memory import MemorySettings
from stream_server.core.events import Error, Event, Final, Partial
from stream_server.core.protocol import SHUTTING_DOWN, ProtocolLimits
from stream_server.server.connection import TranslatorFactory, native_translator, serve_connection
from stream_server.core.session import Send, SessionSettings
from stream_server.inference.worker import BatchScheduler, InferencePool, InferenceWorker, WorkerObserver

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parents[2] / "web_demo"
LISTEN_PATH = "/v1/listen"
STUCK_AFTER_S = 30.0
"""/readyz fails when a worker has queued work but finished no batch for this long."""

# Content types of the web demo's files, fixed here rather than taken from the platform's
# mimetypes tables (Python 3.11 without /etc/mime.types says application/javascript, the Windows
# registry can say text/plain for .js, which browsers refuse for ES modules).
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".wav": "audio/wav",
}
# Same-origin everything; the demo's WebSocket may be ws: or wss: (behind a TLS proxy), downloads
# are blob: URLs, the favicon is a data: URL. No inline scripts or styles are needed.
_STATIC_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    return content_type


@dataclass(frozen=True)
class NetworkSettings:
    """The ``network`` section: where to listen (port 0 picks a free port; see :attr:`StreamServer.port`)."""

    host: str = "127.0.0.1"
    port: int = 8765


@dataclass(frozen=True)
class LimitsSettings:
    """The ``limits`` section: what one client, one session and the whole server may use.

    Attributes:
        max_sessions: concurrent sessions (WebSocket or file request); more are refused with HTTP 503.
        max_sessions_per_ip: concurrent sessions from one client address; more get HTTP 429.
        max_frame_bytes, max_utterance_s, max_session_s: per-session bounds. Sessions read them from
            :attr:`ServerSettings.session` (a :class:`SessionSettings`, whose defaults these are);
            :class:`ServerSettings` makes the two agree (see its ``__post_init__``).
        max_upload_bytes: largest file body ``POST /v1/audio/transcriptions`` accepts (HTTP 413 beyond).
        max_upload_audio_s: longest decoded audio of such a file (HTTP 413 beyond); 0 for no limit
            but ``session.max_session_s``.
        upload_timeout_s: total seconds such a file's body may take to arrive, counted from its
            request head (HTTP 408 beyond, the session slot freed); a client that trickles bytes
            just often enough to dodge ``idle_timeout_s`` is bounded by this. 0 disables. 600 s
            lets the largest default upload (25 MiB) through at 350 kbit/s, a weak mobile uplink.
        idle_timeout_s: a session that receives nothing for this long is ended (finals, ``end``,
            close 1001) with an ``idle_timeout`` error; 0 disables.
        realtime_factor: audio may arrive at most this many times faster than real time (after a
            ``burst_s`` head start); faster senders are throttled by not reading from their socket,
            so TCP backpressure slows them and nothing is dropped. 0 disables.
        drain_deadline_s: on shutdown, how long open sessions get to receive their finals.
    """

    max_sessions: int = 256
    max_sessions_per_ip: int = 32
    max_frame_bytes: int = SessionSettings.max_frame_bytes
    max_utterance_s: float = ProtocolLimits.max_utterance_s
    max_session_s: float = SessionSettings.max_session_s
    max_upload_bytes: int = 25 << 20
    max_upload_audio_s: float = 3600.0
    upload_timeout_s: float = 600.0
    idle_timeout_s: float = 60.0
    realtime_factor: float = 4.0
    drain_deadline_s: float = 10.0


@dataclass
class ServerSettings:
    """Everything the server needs besides the engine: the settings sections it reads as they are
    (``network``, ``limits``, ``security``, ``memory``, ``logging``), the runtime objects built from the
    others, and internal knobs that are no user setting.

    Attributes:
        network: where to listen.
        limits: session, client and upload bounds, idle timeout, throttling, drain deadline.
        security: TLS files (``security.cert_path``/``key_path``); its keys and origins reach the
            server loaded, as ``access``.
        memory: ``memory.memory_trim_s`` is the server's heap-trim period (the arena settings are
            applied by the command before the server exists).
        session: per-session bounds and defaults.
        worker: batching and queue bounds of the worker the server builds when it is given none.
        access: API keys and allowed origins (:meth:`SecuritySettings.access_policy`).
        logging: ``logging.log_transcripts`` logs final texts at INFO (the format and level are applied
            to the process by the command, :func:`~stream_server.server.logs.configure_logging`).
        outbox_limit: events queued for one slow client before it is disconnected (close 1008).
        web_root: directory served at ``/``.
        burst_s: seconds of audio a client may send ahead of the real-time-factor budget.
        reuse_port: bind with ``SO_REUSEPORT`` so that several server processes share the port (the
            kernel spreads new connections over them).
        handshake_timeout_s: a connection whose HTTP request (WebSocket upgrade or plain HTTP) is not
            complete this long after it opened is closed; it holds no session slot meanwhile.
    """

    network: NetworkSettings = field(default_factory=NetworkSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    outbox_limit: int = 1024
    web_root: Path = WEB_ROOT
    burst_s: float = 10.0
    reuse_port: bool = False
    handshake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        # The per-session bounds are written in two places: the ``limits`` section (what a user
        # sets) and ``session`` (what each session reads). A bound set in only one of them is
        # copied to the other, so setting it in either takes effect; set differently in both is
        # refused, since honouring one would silently ignore the other.
        session, limits = self.session, self.limits
        pairs = (  # (name, in limits, its default, in session, its default)
            ("max_frame_bytes", limits.max_frame_bytes, LimitsSettings.max_frame_bytes,
             session.max_frame_bytes, SessionSettings.max_frame_bytes),
            ("max_utterance_s", limits.max_utterance_s, LimitsSettings.max_utterance_s,
             session.limits.max_utterance_s, ProtocolLimits.max_utterance_s),
            ("max_session_s", limits.max_session_s, LimitsSettings.max_session_s,
             session.max_session_s, SessionSettings.max_session_s),
        )
        agreed: dict[str, Any] = {}
        for name, in_limits, limits_default, in_session, session_default in pairs:
            if in_limits == in_session:
                continue
            if in_session == session_default:
                agreed[name] = in_limits
            elif in_limits == limits_default:
                agreed[name] = in_session
            else:
                where = "session.limits" if name == "max_utterance_s" else "session"
                raise ValueError(f"limits.{name}={in_limits!r} and {where}.{name}={in_session!r} disagree; "
                                 "set the bound in one of them")
        if not agreed:
            return
        self.limits = replace(limits, **agreed)
        session_fields = {k: v for k, v in agreed.items() if k != "max_utterance_s"}
        if "max_utterance_s" in agreed:
            session_fields["limits"] = replace(session.limits, max_utterance_s=agreed["max_utterance_s"])
        self.session = replace(session, **session_fields)


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
        self.resident_bytes = prometheus_client.Gauge(
            "granite_stream_resident_memory_bytes", "Resident set size, sampled at each heap trim", registry=r
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
            "Inference latency per request, by kind: from the moment it was asked for (for a final: when the "
            "endpoint was detected) to its result",
            ["kind"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )


class _BatchMetrics(WorkerObserver):
    """The worker observer behind the batch-size and engine-time histograms."""

    def __init__(self, metrics: _Metrics) -> None:
        self.metrics = metrics

    def on_batch_end(self, requests: Sequence[InferenceRequest], seconds: float) -> None:
        # Called on a worker lane's thread; prometheus_client metrics are thread-safe.
        self.metrics.batch_size.observe(len(requests))
        self.metrics.engine_seconds.observe(seconds)


class _EngineCollector:
    """Engine counters (e.g. Granite's speculative-decoding paths), inference queue counters and GPU
    memory, read at scrape time."""

    def __init__(self, server: "StreamServer"):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.server.worker.status()
        events = CounterMetricFamily(
            "granite_stream_engine_events", "Engine counters by event (e.g. speculative decoding paths)",
            labels=["event"],
        )
        for key, value in sorted(status.engine_stats.items()):
            events.add_metric([key], value)
        yield events
        queue = CounterMetricFamily(
            "granite_stream_queue_events",
            "Inference queue counters by event: submitted, replaced (a queued partial that never ran: replaced "
            "by a refresh, or by its utterance's final), refreshes_dropped (its partial was already running), "
            "rejected (queue full), batches",
            labels=["event"],
        )
        for key, value in sorted(status.queue_events.items()):
            queue.add_metric([key], value)
        yield queue
        restarts = CounterMetricFamily("granite_stream_worker_restarts", "Worker threads restarted")
        restarts.add_metric([], status.restarts)
        yield restarts
        memory = _gpu_memory_bytes()
        if memory is not None:
            gauge = GaugeMetricFamily("granite_stream_gpu_memory_bytes", "GPU memory allocated by torch", labels=["device"])
            for device, value in memory.items():
                gauge.add_metric([device], value)
            yield gauge


def _gpu_memory_bytes() -> dict[str, float] | None:
    import sys

    torch = sys.modules.get("torch")  # only report if an engine already uses torch
    if torch is None or not torch.cuda.is_available():
        return None
    return {f"cuda:{i}": float(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


class StreamServer:
    """The running service.

    Args:
        engine: the speech engine (owned by the server's worker from :meth:`start` on).
        settings: server settings.
        engine_reason: why this engine serves (logged and shown on ``/readyz``).
        worker: the inference pool (:class:`~stream_server.inference.worker.InferencePool`); default: one
            :class:`InferenceWorker` on ``engine``. A :class:`WorkerPool` (one worker per GPU) or
            the Ray Serve pool's gateway also fits.
        routes: WebSocket routes served beside the native ``/v1/listen`` (path -> translator factory,
            see :meth:`add_route`). The shell knows no foreign protocol: ``granite-stream serve``
            passes the protocol adapters' table, :data:`stream_server.adapters.ROUTES`.
    """

    def __init__(self, engine: Engine, settings: ServerSettings | None = None, engine_reason: str = "",
                 worker: InferencePool | None = None, routes: Mapping[str, TranslatorFactory] | None = None):
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.engine_reason = engine_reason
        self.metrics = _Metrics()
        if worker is None:
            worker = InferenceWorker(
                engine,
                BatchScheduler.from_settings(self.settings.worker),
            )
        worker.add_observer(_BatchMetrics(self.metrics))
        self.worker: InferencePool = worker
        self.metrics.registry.register(_EngineCollector(self))
        self._server: Server | None = None
        self._sessions: dict[str, SessionDriver] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._supervisor: asyncio.Task | None = None
        self._started_at = time.monotonic()
        self.draining = False
        self.routes: dict[str, TranslatorFactory] = {LISTEN_PATH: native_translator}
        for path, translator in (routes or {}).items():
            self.add_route(path, translator)
        self.port: int | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and listen; :attr:`port` is the bound port afterwards."""
        self.worker.start(asyncio.get_running_loop())
        ssl_context = self._ssl_context()
        # HttpServerConnection applies handshake_timeout_s itself (an upload may take longer).
        self._server = await serve(
            self._handle,
            self.settings.network.host,
            self.settings.network.port,
            process_request=self._process_request,
            select_subprotocol=lambda _connection, offered: select_subprotocol(offered),
            ssl=ssl_context,
            ssl_handshake_timeout=self.settings.handshake_timeout_s if ssl_context else None,  # TLS only
            max_size=max(self.settings.session.max_frame_bytes, self.settings.session.limits.max_text_bytes) + 1024,
            ping_interval=20,
            ping_timeout=20,
            open_timeout=None,
            create_connection=http_api.connection_factory(self),  # POST /v1/audio/… next to the GET routes
            reuse_port=self.settings.reuse_port or None,
        )
        self._started_at = time.monotonic()
        self._supervisor = asyncio.create_task(self._supervise())
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info(
            "serving %s (%s) on ws://%s:%d%s — %s",
            self.engine.capabilities.name, self.engine.capabilities.model,
            self.settings.network.host, self.port, LISTEN_PATH, self.engine_reason,
        )

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop at once: stop listening, close connections (1001), stop the worker. See :meth:`drain`."""
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    async def drain(self, deadline_s: float | None = None) -> int:
        """Graceful shutdown: refuse new sessions (HTTP 503), finish open ones, then :meth:`close`.

        Every open session is ended as if its client had sent ``stop``: open audio is finalized,
        finals and ``end`` are sent, and the connection closes with 1001. Sessions still waiting
        after ``deadline_s`` are closed anyway.

        Returns:
            How many sessions had not finished by the deadline.
        """
        deadline_s = self.settings.limits.drain_deadline_s if deadline_s is None else deadline_s
        # Keep listening while draining: new upgrades get HTTP 503 "shutting down" and /readyz says
        # draining (so a load balancer takes this server out), instead of a refused connection.
        self.draining = True
        notice = Error(SHUTTING_DOWN, "the server is shutting down; open audio is being finalized")
        for driver in list(self._sessions.values()):
            driver.dispatch(driver.session.end_stream(notice, 1001, "server shutting down"))
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        while self._sessions and loop.time() < until:
            await asyncio.sleep(0.05)
        left = len(self._sessions)
        if left:
            log.warning("drain: %d session(s) did not finish within %.1f s", left, deadline_s)
        await self.close()
        return left

    async def _supervise(self) -> None:
        """Restart a dead worker thread (its in-flight batch is re-queued) and refresh gauges."""
        loop = asyncio.get_running_loop()
        last_trim = loop.time()
        while True:
            await asyncio.sleep(0.5)
            self.worker.ensure_alive()
            self.metrics.queue_depth.set(self.worker.status().queue_depth)
            trim_s = self.settings.memory.memory_trim_s
            if trim_s > 0 and loop.time() - last_trim >= trim_s:
                last_trim = loop.time()
                # malloc_trim walks every arena under its lock: milliseconds, so off the event loop.
                await loop.run_in_executor(None, memory.trim)
                self.metrics.resident_bytes.set(memory.rss_bytes())

    def _ssl_context(self) -> ssl.SSLContext | None:
        security = self.settings.security
        if security.cert_path is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(security.cert_path, security.key_path)
        return context

    async def __aenter__(self) -> "StreamServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.security.cert_path else "ws"
        return f"{scheme}://{self.settings.network.host}:{self.port}{LISTEN_PATH}"

    # ---- HTTP ---------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in self.routes:
            return self._admit(connection, request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _text_response(
                HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {path}; endpoints: {', '.join(sorted(self.routes))}\n"
            )
        if path == "/healthz":
            return _text_response(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return self._readyz()
        if path == "/metrics":
            self.metrics.queue_depth.set(self.worker.status().queue_depth)
            body = prometheus_client.generate_latest(self.metrics.registry)
            return _response(HTTPStatus.OK, body, prometheus_client.CONTENT_TYPE_LATEST)
        return self._static(path, request)

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Decide on a WebSocket upgrade: auth, origin, then capacity (sessions, per-IP, queue)."""
        refusal = check_access(self.settings.access, request.path, request.headers)
        if refusal is not None:
            status, reason = refusal
            return _text_response(HTTPStatus(status), reason + "\n")
        refusal = self.admission_refusal(_client_ip(connection))
        if refusal is not None:
            status, reason = refusal
            return _text_response(HTTPStatus(status), reason + "\n")
        return None

    def admission_refusal(self, client_ip: str) -> tuple[int, str] | None:
        """Whether a new session may open now (WebSocket or file request): ``None``, or ``(status, reason)``
        — 503 while draining, at ``max_sessions`` or with a full inference queue, 429 at
        ``max_sessions_per_ip``."""
        if self.draining:
            return 503, "shutting down: not accepting new sessions"
        if len(self._sessions) >= self.settings.limits.max_sessions:
            return 503, "overloaded: too many sessions"
        queue = self.worker.status()
        if queue.queue_depth >= queue.max_queue:
            return 503, "overloaded: inference queue is full"
        per_ip = self.settings.limits.max_sessions_per_ip
        if per_ip and self._per_ip[client_ip] >= per_ip:
            return 429, "too many sessions from this address"
        return None

    def _readyz(self) -> Response:
        """Ready = every worker thread runs, none is stuck (work queued but no batch finished for
        ``STUCK_AFTER_S``), and the server is not draining."""
        pool = self.worker.status()
        now = time.monotonic()
        stuck = [
            i for i, w in enumerate(pool.workers)
            if w.queue_depth > 0 and now - max(w.last_batch_at, self._started_at) > STUCK_AFTER_S
        ]
        ready = pool.alive and not self.draining and not stuck
        body = {
            "ready": ready,
            "engine": self.engine.capabilities.to_wire(),
            "reason": self.engine_reason,
            "queue_depth": pool.queue_depth,
            "sessions": len(self._sessions),
            "worker_restarts": pool.restarts,
            "stuck_workers": stuck,
            "draining": self.draining,
            "pid": os.getpid(),  # with --processes, which process answered
            "workers": [w.to_wire() for w in pool.workers],
        }
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(body).encode(), "application/json")

    def _static(self, path: str, request: Request) -> Response:
        root = self.settings.web_root.resolve()
        relative = path.lstrip("/") or "index.html"
        if relative.endswith("/"):
            relative += "index.html"
        target = (root / relative).resolve()
        # Resolve first, then check containment: rejects ../ and symlinks out of the web root.
        # Hidden files and folders (.git, .env, editor droppings) are never served.
        if (
            not target.is_relative_to(root)
            or any(part.startswith(".") for part in target.relative_to(root).parts)
            or not target.is_file()
        ):
            return _text_response(HTTPStatus.NOT_FOUND, "not found\n")
        body = target.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
            headers = Headers()
            headers["ETag"] = etag
            headers["Cache-Control"] = "no-cache"
            return Response(HTTPStatus.NOT_MODIFIED.value, HTTPStatus.NOT_MODIFIED.phrase, headers, b"")
        response = _response(HTTPStatus.OK, body, _content_type(target.name))
        # Revalidate on every load (a demo that is edited in place), cheaply thanks to the ETag.
        response.headers["Cache-Control"] = "no-cache"
        response.headers["ETag"] = etag
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = _STATIC_CSP
        return response

    # ---- WebSocket sessions -------------------------------------------------------------------

    def add_route(self, path: str, translator: TranslatorFactory) -> None:
        """Serve another WebSocket protocol at ``path`` (the ``routes`` given to the constructor come here).

        ``translator(server, ws)`` makes the translator of each connection; the one connection
        shell (:func:`~stream_server.server.connection.serve_connection`) runs it like the native route's.
        """
        self.routes[path] = translator

    def open_session(self, emit, session_settings: SessionSettings | None = None, client_ip: str = "") -> SessionDriver:
        """Create a registered session and its driver; ``emit`` receives its Send/Close actions."""
        session_id = uuid.uuid4().hex[:12]
        current_session.set(session_id)  # every log line of this connection's task carries it
        session = MultichannelSession(session_id, self.engine.capabilities, session_settings or self.settings.session)
        driver = SessionDriver(session, self.worker, self._logging_emit(session_id, emit), self._observe_inference)
        driver.client_ip = client_ip
        self._sessions[session_id] = driver
        self._per_ip[client_ip] += 1
        self.metrics.sessions_active.inc()
        self.metrics.sessions_total.inc()
        return driver

    def release_session(self, driver: SessionDriver) -> None:
        """Forget a session opened with :meth:`open_session` (idempotent)."""
        driver.abandon()
        if self._sessions.pop(driver.session.session_id, None) is not None:
            self.metrics.sessions_active.dec()
            self._per_ip[driver.client_ip] -= 1
            if self._per_ip[driver.client_ip] <= 0:
                del self._per_ip[driver.client_ip]

    def _logging_emit(self, session_id: str, emit):
        if not self.settings.logging.log_transcripts:
            return emit

        def logged(action) -> None:
            if isinstance(action, Send) and isinstance(action.event, Final):
                log.info("session %s final %s: %s", session_id, action.event.utterance_id, action.event.text)
            emit(action)

        return logged

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # set by the handshake, which completed before the handler runs
        path = ws.request.path.split("?", 1)[0]
        await serve_connection(self, ws, self.routes[path](self, ws))

    def count_event(self, event: Event) -> None:
        """Count a session's event in the metrics as it leaves for a client (any protocol)."""
        if isinstance(event, Final):
            self.metrics.finals.inc()
        elif isinstance(event, Partial):
            self.metrics.partials.inc()
        elif isinstance(event, Error):
            self.metrics.errors.labels(event.code).inc()

    def _observe_inference(self, request: InferenceRequest, seconds: float) -> None:
        self.metrics.inference_seconds.labels(request.kind).observe(seconds)



def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    return Response(status.value, status.phrase, headers, body)


def _text_response(status: HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def _client_ip(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else ""
