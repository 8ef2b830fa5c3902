"""An inference pool on Ray Serve, behind the same worker interface as the local worker.

Layout (see ``docs/deployment.md``): stateless gateways (WebSocket, VAD, sessions: a
:class:`~stream_server.server.app.StreamServer` each) send inference requests to one Serve application,
whose replicas each own an engine (one per GPU, or CPU replicas). Two halves live here:

* :class:`InferenceReplica` — the Serve deployment. Each replica loads the engine once
  (:func:`~stream_server.engines.load_engine`) and decodes with Serve's request batching
  (``serve.batch``: ``max_batch_size`` / ``batch_wait_timeout_s``), one batch at a time on one
  thread; a failed batch is retried one request at a time so only requests that fail alone fail
  (as the local worker does). :func:`build_app` makes the application: ``num_gpus=1`` per replica
  when the cluster has GPUs, CPU replicas otherwise, a fixed replica count or Serve's
  ``autoscaling_config`` (min/max replicas, target ongoing requests).

* :class:`RayServeWorker` — the gateway side, a drop-in for
  :class:`~stream_server.inference.worker.InferenceWorker`: ``start(loop)``, ``stop()``, ``submit(request)``
  returning an asyncio future (``QueueFull`` when full; ``Superseded`` when replaced or cancelled),
  ``cancel_session``, ``queue_depth``, ``alive``, ``ensure_alive()``, ``restarts``, ``failures``,
  ``scheduler`` and ``engine`` (a :class:`RemoteEngine` carrying the pool's capabilities). The
  queueing policy stays gateway-side in a :class:`~stream_server.inference.worker.BatchScheduler` (finals
  before partials, a newer partial replaces a queued one, bounded depth); a bounded number of
  requests are in flight to the pool at once (``max_inflight``), each one a
  ``DeploymentHandle.transcribe.remote(request)`` call. When a replica dies under a request
  (``RayActorError``/``ActorDiedError``, ``ActorUnavailableError``, a crashed worker or node) the
  request is sent again, and Serve routes it to a live replica while it restarts the dead one; an
  engine error is not retried and fails that request with the engine's own exception.

:func:`connect_pool` joins a Ray cluster (``address``: ``local`` starts a small one in this process,
``auto`` joins the cluster this host belongs to, ``ray://host:10001`` uses Ray Client), deploys the
application if it is not there (or connects to an existing one by name) and returns a
:class:`RayServeWorker` for ``StreamServer(worker.engine, settings, worker=worker)`` to start.
Nothing here imports Ray at module import time: the ``ray`` extra is only needed when the pool is
used (``pip install 'granite-stream[ray]'``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from stream_server.engines import EngineSettings
from stream_server.engines.base import Engine, ResultHook
from stream_server.inference.types import EngineCapabilities, InferenceRequest, InferenceResult, WorkerSettings
from stream_server.inference.worker import QUEUE_EVENTS, BatchScheduler, PoolStatus, QueueFull, Superseded, WorkerObserver, WorkerStatus, decode_isolated, settle_future

log = logging.getLogger(__name__)

DEFAULT_APP_NAME = "granite-stream"
DEPLOYMENT_NAME = "InferencePool"

__all__ = [
    "DEFAULT_APP_NAME",
    "InferenceReplica",
    "RayPoolSettings",
    "RayServeWorker",
    "RemoteEngine",
    "app_builder",
    "build_app",
    "connect_pool",
    "init_ray",
    "replica_actor_names",
]


# ---- settings --------------------------------------------------------------------------------


@dataclass
class RayPoolSettings:
    """How to reach (and, if needed, deploy) the pool.

    Attributes:
        address: ``local`` (start a Ray instance in this process, sized by ``local_num_cpus``),
            ``auto`` (join the cluster this host is a member of: ``ray start --address=…`` first),
            or ``ray://head:10001`` (Ray Client).
        app_name: the Serve application; gateways of one pool use the same name.
        deploy: ``missing`` deploys the application only when it is not running, ``never`` only
            connects (fails if absent), ``always`` deploys or updates it with these settings.
        namespace: Ray namespace of the driver (Serve itself uses its own).
        engine, model, device, cpu_threads: the replica's engine (:func:`load_engine` arguments).
            ``device`` ``auto`` means ``cuda`` on GPU replicas and ``cpu`` on CPU replicas.
        max_batch: Serve's ``max_batch_size`` per replica (capped by the engine's own bound).
        batch_wait_s: Serve's ``batch_wait_timeout_s``.
        num_replicas: fixed replica count, used when ``min_replicas == max_replicas`` (or unset).
        min_replicas, max_replicas, target_ongoing_requests: Serve ``autoscaling_config`` when the
            bounds differ.
        gpus_per_replica: ``None``: 1 when the cluster has GPUs, else 0 (CPU replicas).
        cpus_per_replica: Ray CPUs reserved per replica (``None``: ``cpu_threads`` or 1 on CPU
            replicas, 1 on GPU replicas).
        max_ongoing_requests: per replica (``None``: 2 × ``max_batch``, so batches can fill).
        max_inflight: requests this gateway has in flight to the pool at once (``None``: the
            pool's capacity, max replicas × ``max_ongoing_requests``). The rest wait in the
            gateway's scheduler, where finals overtake partials and partials are replaced.
        max_queue, final_reserve: the gateway scheduler's bounds (as ``--max-queue``).
        max_retries: resends of a request whose replica died (then it fails).
        retry_backoff_s: first wait before a resend (doubles each time).
        request_timeout_s: a request not answered in this time fails (not retried).
        deploy_timeout_s: how long :func:`connect_pool` waits for the capabilities of a new pool.
        health_interval_s: the gateway pings the pool this often; it is not ``alive`` after
            ``3 ×`` this without any answer.
        local_num_cpus, local_object_store_mb: the ``local`` instance's size.
        log_to_driver: forward replica logs to this process's stderr.
    """

    address: str = "local"
    app_name: str = DEFAULT_APP_NAME
    deploy: str = "missing"
    namespace: str = "granite-stream"
    engine: str = EngineSettings.name
    model: str | None = None
    device: str = EngineSettings.device
    cpu_threads: int = 1
    max_batch: int = WorkerSettings.max_batch
    batch_wait_s: float = WorkerSettings.max_wait_ms / 1000.0
    num_replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None
    max_ongoing_requests: int | None = None
    max_inflight: int | None = None
    max_queue: int = WorkerSettings.max_queue
    final_reserve: int = WorkerSettings.final_reserve
    max_retries: int = 3
    retry_backoff_s: float = 0.2
    request_timeout_s: float = 120.0
    deploy_timeout_s: float = 600.0
    health_interval_s: float = 5.0
    local_num_cpus: int | None = None
    local_object_store_mb: int = 256
    log_to_driver: bool = True

    def replica_bounds(self) -> tuple[int, int]:
        """``(min, max)`` replicas; equal when the count is fixed."""
        if self.num_replicas is not None:
            return self.num_replicas, self.num_replicas
        return self.min_replicas, max(self.min_replicas, self.max_replicas)

    def ongoing_per_replica(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch, 2)

    def inflight_bound(self) -> int:
        return self.max_inflight or self.replica_bounds()[1] * self.ongoing_per_replica()


# ---- the Serve deployment (replica side) -----------------------------------------------------


@dataclass
class _Failed:
    """A request that failed inside a batch (the batch function returns it in that request's place)."""

    error: BaseException


class InferenceReplica:
    """One pool replica: an engine, fed by Serve's request batching.

    Built by Serve from :func:`build_app` (``serve.deployment(InferenceReplica)``). Its handle methods:
    ``transcribe(request) -> InferenceResult`` (batched), ``capabilities()``, ``ping()`` (replica
    facts: id, pid, engine, counters).

    Args:
        engine_kwargs: :func:`~stream_server.engines.load_engine` keyword arguments.
        max_batch: Serve's ``max_batch_size`` (capped by the engine's ``max_batch``).
        batch_wait_s: Serve's ``batch_wait_timeout_s``.
    """

    def __init__(self, engine_kwargs: dict, max_batch: int = RayPoolSettings.max_batch,
                 batch_wait_s: float = RayPoolSettings.batch_wait_s):
        from ray import serve

        from stream_server.engines import load_engine

        # Every engine call happens on this one thread (engines are thread-confined).
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")

        def load():
            engine, reason = load_engine(**engine_kwargs)
            engine.warmup()
            return engine, reason

        self.engine, self.reason = self._executor.submit(load).result()
        self.max_batch = max(1, min(max_batch, self.engine.capabilities.max_batch))
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (a unit test constructing it directly)
            self.replica_id = f"local-{os.getpid()}"
        self.batches = 0
        self.requests = 0
        self.busy_s = 0.0
        # serve.batch on the bound method: the batch size comes from this replica's configuration.
        self._batched = serve.batch(max_batch_size=self.max_batch, batch_wait_timeout_s=batch_wait_s)(self._decode)
        log.info("replica %s ready: %s %s (%s), batches of up to %d",
                 self.replica_id, self.engine.capabilities.name, self.engine.capabilities.model,
                 self.reason, self.max_batch)

    async def transcribe(self, request: InferenceRequest) -> InferenceResult:
        outcome = await self._batched(request)
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    def capabilities(self) -> EngineCapabilities:
        return self.engine.capabilities

    def ping(self) -> dict:
        return {
            "replica": self.replica_id, "pid": os.getpid(), "engine": self.engine.capabilities.name,
            "model": self.engine.capabilities.model, "reason": self.reason, "batches": self.batches,
            "requests": self.requests, "busy_s": round(self.busy_s, 3),
        }

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine thread is gone is replaced."""
        if self._executor._shutdown:  # noqa: SLF001
            raise RuntimeError("engine executor is shut down")

    async def _decode(self, requests: list[InferenceRequest]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._decode_sync, list(requests))

    def _decode_sync(self, requests: list[InferenceRequest]) -> list:
        started = time.monotonic()
        try:
            outcomes, _ = decode_isolated(self.engine, requests)
            results: list = [_Failed(o) if isinstance(o, BaseException) else o for o in outcomes]
            elapsed = time.monotonic() - started
            for result in results:
                if isinstance(result, InferenceResult):
                    result.info = {**result.info, "pool": {"replica": self.replica_id, "batch": len(requests),
                                                           "engine_s": round(elapsed, 4)}}
            return results
        finally:
            self.batches += 1
            self.requests += len(requests)
            self.busy_s += time.monotonic() - started

    def __del__(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


def _engine_kwargs(settings: RayPoolSettings, gpus: float) -> dict:
    device = settings.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    return {"name": settings.engine, "model": settings.model, "device": device,
            "cpu_threads": settings.cpu_threads, "max_batch": settings.max_batch}


def build_app(settings: RayPoolSettings, cluster_gpus: float | None = None):
    """The Serve application for ``settings`` (``serve.run`` it, or let :func:`connect_pool` do it).

    Args:
        settings: pool settings.
        cluster_gpus: GPUs in the cluster (``None``: ask Ray; needs ``ray.init`` first). Decides
            GPU vs CPU replicas when ``gpus_per_replica`` is ``None``.
    """
    from ray import serve

    gpus = settings.gpus_per_replica
    if gpus is None:
        if cluster_gpus is None:
            import ray

            cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    cpus = settings.cpus_per_replica
    if cpus is None:
        cpus = 1.0 if gpus > 0 else float(max(1, settings.cpu_threads))
    low, high = settings.replica_bounds()
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": settings.ongoing_per_replica(),
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 20.0,
        # No per-request access log line (a stream makes several requests a second); warnings still show.
        "logging_config": {"enable_access_log": False},
    }
    if low == high:
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 120.0,
        }
    deployment: Any = serve.deployment(InferenceReplica)  # a Deployment (Serve's stubs type the decorator form)
    deployment = deployment.options(**options)
    return deployment.bind(_engine_kwargs(settings, gpus), settings.max_batch, settings.batch_wait_s)


# ---- cluster and application -----------------------------------------------------------------


def init_ray(settings: RayPoolSettings) -> None:
    """Join or start the Ray cluster (no-op when this process is already connected)."""
    import ray

    # Never phone home from a server (Ray's usage statistics are opt-out).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if settings.address == "local":
        ray.init(
            num_cpus=settings.local_num_cpus, include_dashboard=False,
            object_store_memory=settings.local_object_store_mb * 1024 * 1024,
            namespace=settings.namespace, log_to_driver=settings.log_to_driver,
        )
    else:
        ray.init(address=settings.address, namespace=settings.namespace, log_to_driver=settings.log_to_driver)


def _app_running(name: str) -> bool:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        status = serve.status()
    except RayServeException:
        return False
    app = status.applications.get(name)
    return app is not None and str(getattr(app.status, "value", app.status)) in ("RUNNING", "DEPLOYING")


def connect_pool(settings: RayPoolSettings) -> "RayServeWorker":
    """Reach the pool (deploying it when ``settings.deploy`` says so); blocking, call it off the event loop.

    Returns:
        A :class:`RayServeWorker`, not started yet (``StreamServer.start`` starts it).

    Raises:
        RuntimeError: ``deploy="never"`` and no such application; or the pool did not answer.
    """
    import ray
    from ray import serve

    if settings.deploy not in ("missing", "never", "always"):
        raise ValueError(f"deploy must be missing, never or always, not {settings.deploy!r}")
    init_ray(settings)
    running = _app_running(settings.app_name)
    if settings.deploy == "always" or (settings.deploy == "missing" and not running):
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if settings.gpus_per_replica and gpus < settings.gpus_per_replica:
            raise RuntimeError(f"replicas want {settings.gpus_per_replica} GPU(s) but the cluster has {gpus:g}")
        serve.start(proxy_location="Disabled")  # no HTTP ingress: gateways call through handles
        log.info("deploying Serve application %r (%s replicas, %s GPU each)", settings.app_name,
                 "%d-%d" % settings.replica_bounds(), settings.gpus_per_replica if settings.gpus_per_replica is not None
                 else ("1" if gpus else "0"))
        handle = serve.run(build_app(settings, gpus), name=settings.app_name, route_prefix=None)
    elif not running:
        raise RuntimeError(f"no running Serve application {settings.app_name!r} on the cluster (deploy=never)")
    else:
        handle = serve.get_app_handle(settings.app_name)
        log.info("connected to the running Serve application %r", settings.app_name)
    capabilities = handle.capabilities.remote().result(timeout_s=settings.deploy_timeout_s)
    worker = RayServeWorker(
        handle, capabilities, max_inflight=settings.inflight_bound(), max_batch=settings.max_batch,
        max_queue=settings.max_queue, final_reserve=settings.final_reserve, max_retries=settings.max_retries,
        retry_backoff_s=settings.retry_backoff_s, request_timeout_s=settings.request_timeout_s,
        health_interval_s=settings.health_interval_s,
        description=f"Ray Serve app {settings.app_name!r} at {settings.address}",
    )
    return worker


def replica_actor_names(app_name: str = DEFAULT_APP_NAME) -> list[str]:
    """Names of the pool's live replica actors (namespace ``serve``), for ``ray.get_actor``/``ray.kill``.

    Uses ``ray.util.list_named_actors`` (the GCS), which works without Ray's dashboard; the state
    API (``ray.util.state.list_actors``) needs the dashboard's API server.
    """
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == "serve" and a["name"].startswith(prefix))


# ---- the gateway side ------------------------------------------------------------------------


def _retryable_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    import ray.serve.exceptions as sex

    errors: list[type[BaseException]] = [
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError
        rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.LocalRayletDiedError,
        sex.BackPressureError,
    ]
    if hasattr(sex, "ReplicaUnavailableError"):
        errors.append(sex.ReplicaUnavailableError)
    return tuple(errors)


def _engine_error(exc: BaseException) -> BaseException:
    """The engine's own exception out of Ray's wrapper (the driver reports ``Type: message``)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            return cause
    return exc


class RemoteEngine(Engine):
    """The pool seen as an engine: its capabilities, and blocking decodes through the handle.

    ``StreamServer`` and sessions only read :attr:`capabilities`; :meth:`transcribe_batch` serves
    tools that want a plain engine (never call it on the event loop).
    """

    def __init__(self, handle, capabilities: EngineCapabilities, description: str = ""):
        self.handle = handle
        self.capabilities = capabilities
        self.description = description
        self.stats_source: Callable[[], dict] | None = None  # the gateway worker's counters

    def transcribe_batch(self, requests: Sequence[InferenceRequest],
                         on_result: ResultHook | None = None) -> list[InferenceResult]:
        responses = [self.handle.transcribe.remote(r) for r in requests]
        return [r.result() for r in responses]

    def warmup(self) -> None:
        self.handle.ping.remote().result()

    def stats(self) -> dict:
        """Numeric counters for ``/metrics`` (``granite_stream_engine_events{event="pool_retries"}`` …)."""
        return self.stats_source() if self.stats_source is not None else {}


@dataclass
class _Call:
    request: InferenceRequest
    task: asyncio.Task | None = None
    response: Any = None
    attempts: int = 0


ResultObserver = Callable[[InferenceRequest, InferenceResult, float], None]


class RayServeWorker:
    """The local worker's interface, backed by a Ray Serve deployment (see the module docstring).

    Everything except :meth:`stop` runs on the event loop passed to :meth:`start`.

    Args:
        handle: a ``DeploymentHandle`` of an :class:`InferenceReplica` application.
        capabilities: the pool's engine capabilities (``handle.capabilities.remote().result()``).
        max_inflight: requests in flight to the pool at once; the rest queue here.
        max_batch: the pool's batch bound (exposed as ``scheduler.max_batch``).
        max_queue, final_reserve: the gateway scheduler's bounds (``QueueFull`` beyond them).
        max_retries: resends after replica failures before a request fails.
        retry_backoff_s: first wait before a resend (doubles each time).
        request_timeout_s: per-attempt limit; a request not answered fails with ``TimeoutError``.
        health_interval_s: seconds between pings; not :attr:`alive` after ``3 ×`` this with no answer.
        on_result: optional ``(request, result, seconds)`` after every answered request.
    """

    def __init__(
        self,
        handle,
        capabilities: EngineCapabilities,
        *,
        max_inflight: int = 32,
        max_batch: int = RayPoolSettings.max_batch,
        max_queue: int = RayPoolSettings.max_queue,
        final_reserve: int = RayPoolSettings.final_reserve,
        max_retries: int = RayPoolSettings.max_retries,
        retry_backoff_s: float = RayPoolSettings.retry_backoff_s,
        request_timeout_s: float = RayPoolSettings.request_timeout_s,
        health_interval_s: float = RayPoolSettings.health_interval_s,
        on_result: ResultObserver | None = None,
        description: str = "Ray Serve pool",
    ):
        if max_inflight < 1:
            raise ValueError("max_inflight must be positive")
        self.handle = handle
        self.engine = RemoteEngine(handle, capabilities, description)
        self.scheduler: BatchScheduler[asyncio.Future] = BatchScheduler(max_batch=max_batch, max_wait=0.0, max_queue=max_queue,
                                        final_reserve=final_reserve)
        self.max_inflight = max_inflight
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.request_timeout_s = request_timeout_s
        self.health_interval_s = health_interval_s
        self.on_result = on_result
        self.description = description
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[asyncio.Future, _Call] = {}
        self._monitor: asyncio.Task | None = None
        self._stopping = False
        self._last_ok = 0.0
        self._retryable: tuple[type[BaseException], ...] = _retryable_errors()
        self.failures = 0
        self.restarts = 0
        self.retries = 0
        self.completed = 0
        self.last_ping: dict | None = None
        self.last_batch_at = 0.0  # last answer from the pool (the server's stuck-worker check reads it)
        self.engine.stats_source = self._counters

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._last_ok = self.last_batch_at = time.monotonic()
        self._monitor = self._loop.create_task(self._watch())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop: queued and in-flight requests fail with :class:`Superseded`. Callable from any thread.

        The pool itself keeps running (other gateways use it); ``serve.delete(app_name)`` removes it.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            self._stop_on_loop()
            return
        done = threading.Event()

        def run() -> None:
            try:
                self._stop_on_loop()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # loop closed meanwhile
            return
        done.wait(timeout)

    def _stop_on_loop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for future in self.scheduler.drop_all():
            settle_future(future, exc=Superseded("worker stopped"))
        for future, call in list(self._calls.items()):
            if call.task is not None:
                call.task.cancel()
            settle_future(future, exc=Superseded("worker stopped"))

    # ---- the worker interface -----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests queued here plus those in flight to the pool."""
        return len(self.scheduler) + len(self._calls)

    @property
    def inflight(self) -> int:
        return len(self._calls)

    @property
    def alive(self) -> bool:
        """Started, not stopped, and the pool answered within the last ``3 × health_interval_s``."""
        return (
            self._loop is not None and not self._stopping and self._monitor is not None
            and time.monotonic() - self._last_ok < 3 * self.health_interval_s
        )

    def ensure_alive(self) -> bool:
        """Restart the health monitor if it died; True if it was restarted."""
        if self._stopping or self._monitor is None or not self._monitor.done():
            return False
        if self._monitor.cancelled() or self._monitor.exception() is not None:
            log.error("pool health monitor died; restarting it (restart #%d)", self.restarts + 1)
        self.restarts += 1
        assert self._loop is not None
        self._monitor = self._loop.create_task(self._watch())
        return True

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        """Queue a request for the pool.

        Returns:
            A future resolving to an :class:`InferenceResult`, or failing with :class:`Superseded`
            (replaced, session cancelled, worker stopped) or the engine's exception.

        Raises:
            QueueFull: the gateway queue is at its bound.
        """
        assert self._loop is not None, "worker not started"
        if self._stopping:
            raise QueueFull("inference pool client is stopped")
        self.ensure_alive()
        future: asyncio.Future = self._loop.create_future()
        replaced = self.scheduler.submit(request, time.monotonic(), future)
        for old in replaced:
            settle_future(old, exc=Superseded("replaced by a newer request" if old is not future
                                              else "refresh dropped: the partial it would replace has started"))
        self._pump()
        return future

    def cancel_session(self, session_id: str) -> None:
        """Forget a session: its queued requests, and cancel those in flight."""
        for future in self.scheduler.drop_session(session_id):
            settle_future(future, exc=Superseded("session closed"))
        for future, call in list(self._calls.items()):
            if call.request.session_id == session_id:
                if call.task is not None:
                    call.task.cancel()
                settle_future(future, exc=Superseded("session closed"))

    def stats(self) -> dict:
        return {
            "queued": len(self.scheduler), "inflight": len(self._calls), "completed": self.completed,
            "retries": self.retries, "failures": self.failures, "restarts": self.restarts,
            "last_ping": self.last_ping,
        }

    def status(self) -> PoolStatus:
        stats = self.stats()
        gateway = WorkerStatus(self.description, self.queue_depth, self.last_batch_at, self.alive, self.restarts,
                               {"pool": self.description, **stats})
        engine_stats = {k: v for k, v in self.engine.stats().items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return PoolStatus(
            alive=gateway.alive, queue_depth=gateway.queue_depth, max_queue=self.scheduler.max_queue,
            restarts=self.restarts, workers=(gateway,), engine_stats=engine_stats,
            queue_events={key: getattr(self.scheduler.stats, key) for key in QUEUE_EVENTS},
        )

    def add_observer(self, observer: WorkerObserver) -> None:
        """Nothing to observe here: batches run inside the replicas (their time is in each result's
        ``info["pool"]``)."""

    def remove_observer(self, observer: WorkerObserver) -> None:
        """Nothing to detach (:meth:`add_observer` attaches none)."""

    def _counters(self) -> dict:
        return {"pool_completed": self.completed, "pool_retries": self.retries, "pool_failures": self.failures}

    # ---- internals ----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move queued requests into flight while there is room (finals first, oldest first)."""
        assert self._loop is not None
        while not self._stopping and len(self.scheduler) and len(self._calls) < self.max_inflight:
            room = self.max_inflight - len(self._calls)
            full = self.scheduler.max_batch
            self.scheduler.max_batch = max(1, min(full, room))
            try:
                batch = self.scheduler.take_batch(time.monotonic(), force=True)
            finally:
                self.scheduler.max_batch = full
            for request, future in batch:
                if future.done():
                    continue
                call = _Call(request)
                self._calls[future] = call
                call.task = self._loop.create_task(self._run(call, future))

    async def _run(self, call: _Call, future: asyncio.Future) -> None:
        request = call.request
        started = time.monotonic()
        try:
            while not future.done():
                call.attempts += 1
                call.response = self.handle.transcribe.remote(request)
                try:
                    result = await asyncio.wait_for(_awaitable(call.response), self.request_timeout_s)
                except asyncio.CancelledError:
                    call.response.cancel()
                    raise
                except asyncio.TimeoutError:
                    call.response.cancel()
                    self.failures += 1
                    settle_future(future, exc=TimeoutError(f"the inference pool did not answer within {self.request_timeout_s:g} s"))
                    return
                except self._retryable as exc:
                    if call.attempts > self.max_retries:
                        self.failures += 1
                        log.error("request %s/%s failed after %d attempts: %s", request.session_id,
                                  request.utterance_id, call.attempts, exc)
                        settle_future(future, exc=RuntimeError(f"inference pool unavailable: {type(exc).__name__}"))
                        return
                    self.retries += 1
                    delay = self.retry_backoff_s * (2 ** (call.attempts - 1))
                    log.warning("replica failed under %s request %s/%s (%s); resending in %.2f s (attempt %d)",
                                request.kind, request.session_id, request.utterance_id, type(exc).__name__,
                                delay, call.attempts + 1)
                    await asyncio.sleep(delay)
                    continue
                except Exception as exc:  # noqa: BLE001 - the engine's failure becomes this request's error
                    self.failures += 1
                    settle_future(future, exc=_engine_error(exc))
                    return
                self._last_ok = self.last_batch_at = time.monotonic()
                self.completed += 1
                if self.on_result is not None:
                    try:
                        self.on_result(request, result, time.monotonic() - started)
                    except Exception:  # noqa: BLE001
                        log.exception("result observer failed")
                settle_future(future, result=result)
                return
        finally:
            self._calls.pop(future, None)
            if not self._stopping:
                self._pump()

    async def _watch(self) -> None:
        """Ping the pool every ``health_interval_s`` (any answered request counts too)."""
        while not self._stopping:
            if time.monotonic() - self._last_ok >= self.health_interval_s:
                response = self.handle.ping.remote()
                try:
                    self.last_ping = await asyncio.wait_for(_awaitable(response), 2 * self.health_interval_s)
                    self._last_ok = time.monotonic()
                except asyncio.CancelledError:
                    response.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001
                    response.cancel()
                    log.warning("inference pool ping failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.health_interval_s / 2)


async def _awaitable(response):
    return await response


# ---- configuration -----------------------------------------------------------------------------


_BUILDER_KEYS = ("engine", "model", "device", "cpu_threads", "max_batch", "batch_wait_s", "num_replicas",
                 "min_replicas", "max_replicas", "target_ongoing_requests", "gpus_per_replica", "cpus_per_replica",
                 "max_ongoing_requests")


def app_builder(args: dict):
    """Serve application builder, for ``serve run``/``serve deploy`` and KubeRay's ``serveConfigV2``.

    ``import_path: stream_server.inference.ray_pool:app_builder`` with ``args`` among: engine, model, device,
    cpu_threads, max_batch, batch_wait_s, num_replicas, min_replicas, max_replicas,
    target_ongoing_requests, gpus_per_replica, cpus_per_replica, max_ongoing_requests.

    Raises:
        ValueError: an unknown argument.
    """
    unknown = sorted(set(args) - set(_BUILDER_KEYS))
    if unknown:
        raise ValueError(f"unknown pool argument(s) {unknown}; known: {list(_BUILDER_KEYS)}")
    # `serve run module:app_builder key=value` passes strings; a config file passes YAML types.
    kinds = {f.name: str(f.type) for f in dataclasses.fields(RayPoolSettings)}
    values = {}
    for key, value in args.items():
        kind = kinds[key]
        if isinstance(value, str) and kind != "str":
            if value.lower() in ("", "none", "null") and "None" in kind:
                value = None
            elif kind.startswith("int"):
                value = int(value)
            elif kind.startswith("float"):
                value = float(value)
        values[key] = value
    return build_app(RayPoolSettings(**values))
