"""The inference worker: one per device, shared by every session.

:class:`BatchScheduler` is the pure queueing policy (testable without threads): finals before
partials, a newer partial for an utterance replaces a queued older one (a ``refresh_only`` one
does nothing else), bounded depth, and dynamic batching (up to ``max_batch`` requests, waiting at
most ``max_wait`` for a batch to fill).

:class:`InferenceWorker` is the thin shell: a thread that takes batches from the scheduler, runs
the blocking engine, and resolves asyncio futures on the event loop. Inference never runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Generic, Mapping, Protocol, Sequence, TypeVar

from stream_server.engines.base import Engine
from stream_server.inference.types import InferenceRequest, InferenceResult, WorkerSettings

log = logging.getLogger(__name__)

Token = TypeVar("Token")
"""What a scheduler's user attaches to each request (the shells: the request's future)."""


class WorkerObserver(Protocol):
    """Watches an :class:`InferenceWorker`'s traffic (the server's metrics, benchmarks, tracing); never
    changes it.

    Several may be attached (:meth:`InferencePool.add_observer`). An observer's exception is
    logged and otherwise ignored: observing never fails a request or a batch. Keep the methods
    cheap: :meth:`on_submit` runs on the event loop, the batch methods on the lane's thread, around
    the engine call. A class that subclasses this one explicitly overrides only what it watches (the
    others do nothing).
    """

    def on_submit(self, request: InferenceRequest) -> None:
        """``request`` was queued (a refused one is not reported)."""
        return None

    def on_batch_start(self, requests: Sequence[InferenceRequest]) -> None:
        """A lane took ``requests`` from the queue and is about to run them."""
        return None

    def on_batch_end(self, requests: Sequence[InferenceRequest], seconds: float) -> None:
        """The engine call for ``requests`` returned (or failed) after ``seconds``; results are delivered."""
        return None


QUEUE_EVENTS = ("submitted", "replaced", "refreshes_dropped", "rejected", "batches")
"""The scheduler counters a pool reports (see :class:`SchedulerStats`)."""


@dataclass(frozen=True)
class WorkerStatus:
    """One worker (or one remote pool seen through its gateway), as ``/readyz`` reports it.

    Attributes:
        name: the engine's model, or the remote pool's description.
        queue_depth: requests queued (and, for a remote pool, in flight).
        last_batch_at: ``time.monotonic()`` when its last batch finished (0: none yet); the server's
            stuck-worker check compares it with ``queue_depth``.
        alive: its thread (or the remote pool's health check) is running.
        restarts: times its thread (or health monitor) was restarted.
        detail: further facts for ``/readyz`` (sessions pinned, busy seconds, retries, …).
    """

    name: str
    queue_depth: int
    last_batch_at: float
    alive: bool
    restarts: int
    detail: Mapping[str, object] = field(default_factory=dict)

    def to_wire(self) -> dict:
        return {"engine": self.name, "queue_depth": self.queue_depth, "alive": self.alive,
                "restarts": self.restarts, **self.detail}


@dataclass(frozen=True)
class PoolStatus:
    """What the server reads of its inference pool (``/readyz``, ``/metrics``, admission).

    Attributes:
        alive: every worker is alive.
        queue_depth: requests queued over all workers.
        max_queue: the queue bound past which new sessions are refused.
        restarts: worker restarts, summed.
        workers: one entry per worker.
        engine_stats: the engines' numeric counters (:meth:`Engine.stats`), summed over workers.
        queue_events: the schedulers' counters (:data:`QUEUE_EVENTS`), summed over workers.
    """

    alive: bool
    queue_depth: int
    max_queue: int
    restarts: int
    workers: tuple[WorkerStatus, ...]
    engine_stats: Mapping[str, float]
    queue_events: Mapping[str, int]


class InferencePool(Protocol):
    """The inference side as the server and the session drivers use it.

    Implemented by :class:`InferenceWorker` (one engine on a thread), :class:`WorkerPool` (one
    worker per GPU) and :class:`stream_server.inference.ray_pool.RayServeWorker` (a Ray Serve pool). All
    methods but :meth:`stop` are called on the event loop given to :meth:`start`.
    """

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start serving; results are delivered on ``loop`` (default: the running loop)."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; queued requests fail with :class:`Superseded`. Callable from any thread."""
        ...

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        """Queue a request; the future resolves to an :class:`InferenceResult` or fails with
        :class:`Superseded` or the engine's exception. Raises :class:`QueueFull` at the bound."""
        ...

    def cancel_session(self, session_id: str) -> None:
        """Forget every queued request of a session (its futures fail with :class:`Superseded`)."""
        ...

    def ensure_alive(self) -> bool:
        """Restart what died (a worker thread, a health monitor); True if something was restarted."""
        ...

    def status(self) -> PoolStatus:
        """A snapshot of the pool's state."""
        ...

    def add_observer(self, observer: WorkerObserver) -> None:
        """Attach ``observer`` to every engine call this pool runs locally (a pool whose batches run
        elsewhere, such as the Ray pool, reports none)."""
        ...

    def remove_observer(self, observer: WorkerObserver) -> None:
        """Detach ``observer`` (it sees no call that starts afterwards); unknown observers are ignored."""
        ...


def decode_isolated(
    engine: Engine, requests: Sequence[InferenceRequest], answered: Collection[int] = (), **hooks
) -> tuple[list[InferenceResult | BaseException | None], bool]:
    """Run one batch on ``engine`` so that a failure fails only the requests that fail alone.

    If the batch raises (a bad input, or memory pressure such as CUDA out-of-memory that a smaller
    batch avoids), every request not in ``answered`` is retried on its own. Used by the local
    worker and the Ray replica alike.

    Args:
        engine: the engine (called on the caller's thread).
        requests: the batch.
        answered: indices already answered during the batch (early results); checked after the
            batch ran, so the engine's ``on_result`` hook may add to it.
        hooks: passed to the batch call only (``on_result``), never to retries.

    Returns:
        ``(outcomes, failed)``: per request its result, the exception that failed it alone, or
        ``None`` for one in ``answered``; ``failed`` says whether the batch call itself failed.
    """
    try:
        results = list(engine.transcribe_batch(requests, **hooks))
        if len(results) != len(requests):
            raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
        return [None if i in answered else result for i, result in enumerate(results)], False
    except Exception as exc:  # noqa: BLE001 - one bad batch must not fail every request in it
        log.warning("engine failed on a batch of %d (%s: %s)", len(requests), type(exc).__name__, exc)
        if len(requests) == 1:
            return [None if 0 in answered else exc], True
        outcomes: list[InferenceResult | BaseException | None] = []
        for index, request in enumerate(requests):
            if index in answered:
                outcomes.append(None)
                continue
            try:
                [result] = engine.transcribe_batch([request])
            except Exception as single:  # noqa: BLE001
                outcomes.append(single)
            else:
                outcomes.append(result)
        return outcomes, True


def settle_future(future: asyncio.Future, result: InferenceResult | None = None, exc: BaseException | None = None) -> None:
    """Complete ``future`` with ``result`` or ``exc`` unless it is already done (e.g. cancelled).

    Must run on the future's event loop.
    """
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class QueueFull(Exception):
    """The worker queue is at its bound; the request was not queued."""


class Superseded(Exception):
    """A newer partial for the same utterance replaced this one, a ``refresh_only`` partial found
    nothing queued to replace, or its session went away."""


@dataclass
class _Entry(Generic[Token]):
    request: InferenceRequest
    enqueued_at: float
    token: Token  # the shell's handle (a future); the scheduler never looks inside


@dataclass
class SchedulerStats:
    submitted: int = 0
    replaced: int = 0
    refreshes_dropped: int = 0  # refresh_only partials that found nothing queued to replace
    rejected: int = 0
    batches: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)


class BatchScheduler(Generic[Token]):
    """Queueing policy for one worker.

    Args:
        max_batch: most requests per engine call.
        max_wait: seconds the oldest queued request may wait for a batch to fill.
        max_queue: bound on queued requests; partials beyond it are refused, finals may use
            ``final_reserve`` extra places so a flood of partials cannot starve endpoints.
        final_reserve: extra places only finals may take.
    """

    def __init__(self, max_batch: int = WorkerSettings.max_batch, max_wait: float = WorkerSettings.max_wait_ms / 1000.0,
                 max_queue: int = WorkerSettings.max_queue, final_reserve: int = WorkerSettings.final_reserve):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.final_reserve = final_reserve
        self._finals: collections.deque[_Entry[Token]] = collections.deque()
        self._partials: dict[tuple[str, int], _Entry[Token]] = {}
        self.stats = SchedulerStats()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> BatchScheduler[Token]:
        """The scheduler the ``worker`` settings describe (``max_wait_ms`` in milliseconds)."""
        return cls(settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue, settings.final_reserve)

    def __len__(self) -> int:
        return len(self._finals) + len(self._partials)

    @property
    def queued_finals(self) -> int:
        return len(self._finals)

    def submit(self, request: InferenceRequest, now: float, token: Token) -> list[Token]:
        """Queue a request.

        Returns:
            Tokens of requests that will never run: queued ones this one replaced, or this one's own
            ``token`` when it is a ``refresh_only`` partial that found nothing queued to replace.

        Raises:
            QueueFull: the queue is at its bound for this kind of request.
        """
        replaced: list[Token] = []
        if request.kind == "partial":
            key = (request.session_id, request.utterance_id)
            if request.refresh_only and key not in self._partials:
                self.stats.refreshes_dropped += 1
                return [token]
            old = self._partials.pop(key, None)
            if old is not None:
                replaced.append(old.token)
                self.stats.replaced += 1
            elif len(self) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"inference queue is full ({len(self)} requests)")
            # A replacement keeps its predecessor's place in line so a busy stream's partials are not starved.
            entry = _Entry(request, old.enqueued_at if old else now, token)
            self._partials[key] = entry
        else:
            if len(self) >= self.max_queue + self.final_reserve:
                self.stats.rejected += 1
                raise QueueFull(f"inference queue is full ({len(self)} requests)")
            self._finals.append(_Entry(request, now, token))
            # The utterance ended: a queued partial for it is pointless now.
            old = self._partials.pop((request.session_id, request.utterance_id), None)
            if old is not None:
                replaced.append(old.token)
                self.stats.replaced += 1
        self.stats.submitted += 1
        return replaced

    def drop_session(self, session_id: str) -> list[Token]:
        """Remove every queued request of a session; returns their tokens."""
        tokens = [e.token for e in self._finals if e.request.session_id == session_id]
        self._finals = collections.deque(e for e in self._finals if e.request.session_id != session_id)
        for key in [k for k in self._partials if k[0] == session_id]:
            tokens.append(self._partials.pop(key).token)
        return tokens

    def drop_all(self) -> list[Token]:
        """Empty the queue; returns the tokens of everything that was queued."""
        tokens = [e.token for e in self._finals] + [e.token for e in self._partials.values()]
        self._finals.clear()
        self._partials.clear()
        return tokens

    def wait_time(self, now: float, partials: bool = True) -> float | None:
        """Seconds until :meth:`take_batch` would return a batch: 0 when ready, ``None`` when empty.

        Args:
            now: current time.
            partials: whether queued partials count (a lane kept free for finals passes False).
        """
        queued = len(self) if partials else len(self._finals)
        if not queued:
            return None
        if queued >= self.max_batch:
            return 0.0
        oldest = min(
            (self._finals[0].enqueued_at if self._finals else now),
            min((e.enqueued_at for e in self._partials.values()), default=now) if partials else now,
        )
        return max(0.0, oldest + self.max_wait - now)

    def take_batch(self, now: float, force: bool = False, partials: bool = True
                   ) -> list[tuple[InferenceRequest, Token]]:
        """Pop the next batch: finals first (oldest first), then partials (oldest first).

        Args:
            now: current time, for the max-wait rule.
            force: take what is queued even if the batch is not full and ``max_wait`` has not passed.
            partials: whether the batch may hold partials (False: finals only).
        """
        wait = self.wait_time(now, partials)
        if wait is None or (wait > 0 and not force):
            return []
        batch: list[tuple[InferenceRequest, Token]] = []
        while self._finals and len(batch) < self.max_batch:
            entry = self._finals.popleft()
            batch.append((entry.request, entry.token))
        if partials:
            batch += self._pop_oldest_partials(self.max_batch - len(batch))
        self.stats.batches += 1
        self.stats.batch_sizes[len(batch)] += 1
        return batch

    def _pop_oldest_partials(self, limit: int) -> list[tuple[InferenceRequest, Token]]:
        """Remove and return up to ``limit`` queued partials, oldest first."""
        if limit <= 0 or not self._partials:
            return []
        chosen = sorted(self._partials.items(), key=lambda item: item[1].enqueued_at)[:limit]
        for key, _ in chosen:
            del self._partials[key]
        return [(entry.request, entry.token) for _, entry in chosen]


class InferenceWorker:
    """Runs an engine on dedicated threads ("lanes"), fed by :class:`BatchScheduler`.

    ``submit`` must be called on the event loop's thread; results come back as asyncio futures.

    An engine whose capabilities declare ``concurrency`` > 1 gets that many lanes, each calling
    ``transcribe_batch`` on its own thread. At most ``concurrency - 1`` lanes run batches holding
    partials at any time, so one lane always stays free for finals: a final never waits behind a
    batch of partials, and partials get whatever compute the finals leave (under load they are
    refreshed, not queued, so they follow the free capacity). With one lane everything runs in
    order on one thread, finals first.

    Args:
        engine: the engine this worker owns (only this worker's threads call it).
        scheduler: queueing policy; ``max_batch`` is capped by the engine's capability.
    """

    def __init__(self, engine: Engine, scheduler: BatchScheduler[asyncio.Future] | None = None):
        self.engine = engine
        # Not `scheduler or ...`: an empty scheduler has len() 0 and is falsy.
        self.scheduler: BatchScheduler[asyncio.Future] = scheduler if scheduler is not None else BatchScheduler()
        self.scheduler.max_batch = min(self.scheduler.max_batch, engine.capabilities.max_batch)
        self._observers: list[WorkerObserver] = []
        self.lanes = max(1, engine.capabilities.concurrency)
        self._partial_lanes_max = max(1, self.lanes - 1)
        self._partial_lanes_busy = 0  # lanes now running a batch that holds partials (guarded by _cond)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread | None] = [None] * self.lanes
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.busy_seconds = 0.0
        self.last_batch_at = 0.0
        self.failures = 0
        self.restarts = 0

    def _spawn(self, lane: int) -> None:
        name = f"inference-{self.engine.capabilities.name}" + (f"-{lane}" if self.lanes > 1 else "")
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._threads[lane] = thread
        thread.start()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the lanes' threads; results are delivered on ``loop`` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._partial_lanes_busy = 0  # a stopped worker's lanes have finished (or were abandoned)
        for lane in range(self.lanes):
            self._spawn(lane)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batches in progress; queued requests fail with :class:`Superseded`."""
        with self._cond:
            self._stopping = True
            tokens = self.scheduler.drop_all()
            self._cond.notify_all()
        for fut in tokens:
            self._resolve(fut, exc=Superseded("worker stopped"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler)

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        """Queue a request.

        Returns:
            A future resolving to an :class:`InferenceResult`, or failing with :class:`Superseded`
            (replaced or cancelled) or the engine's exception.

        Raises:
            QueueFull: the queue is at its bound.
        """
        assert self._loop is not None, "worker not started"
        self.ensure_alive()
        future: asyncio.Future = self._loop.create_future()
        with self._cond:
            replaced = self.scheduler.submit(request, time.monotonic(), future)
            self._cond.notify_all()  # every lane: one kept for finals cannot take a partial
        for old in replaced:
            self._resolve(old, exc=Superseded("replaced by a newer request" if old is not future
                                              else "refresh dropped: the partial it would replace has started"))
        self._notify(lambda observer: observer.on_submit(request))
        return future

    def add_observer(self, observer: WorkerObserver) -> None:
        """Attach ``observer`` (see :class:`WorkerObserver`); each attached observer is called in order."""
        self._observers.append(observer)

    def remove_observer(self, observer: WorkerObserver) -> None:
        """Detach ``observer``; unknown observers are ignored."""
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, call: Callable[[WorkerObserver], None]) -> None:
        for observer in list(self._observers):  # a copy: observers may be added from another thread
            try:
                call(observer)
            except Exception:  # noqa: BLE001 - observing must never fail the traffic it observes
                log.exception("worker observer %r failed", observer)

    @property
    def lane_thread_ids(self) -> list[int]:
        """Native ids of the lanes' live threads (per-thread CPU accounting)."""
        return [t.native_id for t in self._threads if t is not None and t.is_alive() and t.native_id is not None]

    def cancel_session(self, session_id: str) -> None:
        """Forget every queued request of a session (its client went away)."""
        with self._cond:
            tokens = self.scheduler.drop_session(session_id)
        for fut in tokens:
            self._resolve(fut, exc=Superseded("session closed"))

    def _resolve(self, future: asyncio.Future, result: InferenceResult | None = None, exc: BaseException | None = None) -> None:
        assert self._loop is not None
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(settle_future, future, result, exc)
        except RuntimeError:  # loop closed during shutdown
            pass

    def ensure_alive(self) -> bool:
        """Restart any lane thread that died (a crash outside the per-batch error handling).

        Returns:
            True if a restart happened. Requests of the batch in flight when it died were re-queued.
        """
        if self._stopping:
            return False
        restarted = False
        for lane, thread in enumerate(self._threads):
            if thread is None or thread.is_alive():
                continue
            log.error("inference worker thread died; restarting it (restart #%d)", self.restarts + 1)
            self.restarts += 1
            self._spawn(lane)
            restarted = True
        return restarted

    @property
    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in self._threads)

    def worker_status(self, **detail: object) -> WorkerStatus:
        return WorkerStatus(self.engine.capabilities.model, self.queue_depth, self.last_batch_at, self.alive,
                            self.restarts, {"busy_seconds": round(self.busy_seconds, 3), **detail})

    def status(self) -> PoolStatus:
        return _pool_status([self], [self.worker_status()])

    def _run(self) -> None:
        self.engine.bind_thread()
        batch: list[tuple[InferenceRequest, asyncio.Future]] = []
        holds_partials = False
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stopping:
                            return
                        partials = self._partial_lanes_busy < self._partial_lanes_max
                        wait = self.scheduler.wait_time(time.monotonic(), partials)
                        if wait == 0.0:
                            break
                        self._cond.wait(timeout=wait)
                    batch = self.scheduler.take_batch(time.monotonic(), partials=partials)
                    holds_partials = any(r.kind != "final" for r, _ in batch)
                    if holds_partials:
                        self._partial_lanes_busy += 1
                if batch:
                    try:
                        self._run_batch(batch)
                    finally:
                        if holds_partials:
                            with self._cond:
                                self._partial_lanes_busy -= 1
                                self._cond.notify_all()  # a lane kept for finals may take partials now
                    batch = []
        except BaseException:
            # Something killed the thread itself (not an engine error, those are handled per batch).
            # Put the batch back so its utterances are not lost when ensure_alive() restarts us.
            log.exception("inference worker thread crashed")
            superseded: list[asyncio.Future] = []
            refused: list[tuple[asyncio.Future, QueueFull]] = []
            with self._cond:
                for request, token in batch:
                    if not token.done():
                        # It was taken once: queue it as a plain request (a refresh with nothing left
                        # to replace would be dropped unanswered), and answer whatever it displaces.
                        request.refresh_only = False
                        try:
                            superseded += self.scheduler.submit(request, time.monotonic(), token)
                        except QueueFull as refusal:  # answered, not lost, and the crash still reported
                            refused.append((token, refusal))
                self._cond.notify_all()
            for old in superseded:
                self._resolve(old, exc=Superseded("replaced by a request re-queued after a worker crash"))
            for token, error in refused:
                self._resolve(token, exc=error)
            raise

    def _run_batch(self, batch: list[tuple[InferenceRequest, asyncio.Future]]) -> None:
        requests = [r for r, _ in batch]
        self._notify(lambda observer: observer.on_batch_start(requests))
        started = time.monotonic()
        delivered: set[int] = set()

        def early(index: int, result: InferenceResult) -> None:
            # A result ready before the batch ends (e.g. a CTC partial ahead of the finals' decode).
            if index not in delivered:
                delivered.add(index)
                self._resolve(batch[index][1], result=result)

        capabilities = self.engine.capabilities
        hooks: dict = {}
        if capabilities.early_results:
            hooks["on_result"] = early
        outcomes, failed = decode_isolated(self.engine, requests, delivered, **hooks)
        for (_, future), outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                self._resolve(future, exc=outcome)
            elif outcome is not None:
                self._resolve(future, result=outcome)
        elapsed = time.monotonic() - started
        with self._cond:  # lanes finish concurrently
            self.failures += failed
            self.busy_seconds += elapsed
            self.last_batch_at = time.monotonic()
        self._notify(lambda observer: observer.on_batch_end(requests, elapsed))


class WorkerPool:
    """Several inference workers behind the single-worker interface (one per GPU of a host).

    A session is pinned to one worker for its whole life (its requests share that worker's batches
    and the engine's caches); a new session goes to the worker with the fewest sessions, ties broken
    by queue depth. A worker whose thread dies is restarted without disturbing the others.

    Args:
        workers: the workers, typically one per device, each owning its own engine.
    """

    def __init__(self, workers: list[InferenceWorker]):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers = workers
        self._assignment: dict[str, InferenceWorker] = {}
        self._sessions_per_worker = collections.Counter({id(w): 0 for w in workers})

    @property
    def engine(self) -> Engine:
        """The first worker's engine (all workers serve the same model and capabilities)."""
        return self.workers[0].engine

    @property
    def scheduler(self) -> BatchScheduler:
        """The first worker's scheduler, for its bounds (``max_queue``, ``max_batch``)."""
        return self.workers[0].scheduler

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        for worker in self.workers:
            worker.start(loop)

    def stop(self, timeout: float = 10.0) -> None:
        for worker in self.workers:
            worker.stop(timeout)

    @property
    def queue_depth(self) -> int:
        return sum(w.queue_depth for w in self.workers)

    @property
    def alive(self) -> bool:
        return all(w.alive for w in self.workers)

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    @property
    def failures(self) -> int:
        return sum(w.failures for w in self.workers)

    def ensure_alive(self) -> bool:
        return any([w.ensure_alive() for w in self.workers])

    def worker_for(self, session_id: str) -> InferenceWorker:
        """The worker a session is pinned to, choosing the least-loaded one on first use."""
        worker = self._assignment.get(session_id)
        if worker is None:
            worker = min(self.workers, key=lambda w: (self._sessions_per_worker[id(w)], w.queue_depth))
            self._assignment[session_id] = worker
            self._sessions_per_worker[id(worker)] += 1
        return worker

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        return self.worker_for(request.session_id).submit(request)

    def cancel_session(self, session_id: str) -> None:
        worker = self._assignment.pop(session_id, None)
        if worker is not None:
            self._sessions_per_worker[id(worker)] -= 1
            worker.cancel_session(session_id)

    def status(self) -> PoolStatus:
        return _pool_status(
            self.workers, [w.worker_status(sessions=self._sessions_per_worker[id(w)]) for w in self.workers]
        )

    def add_observer(self, observer: WorkerObserver) -> None:
        """Attach ``observer`` to every worker (it sees each worker's batches on that worker's lanes)."""
        for worker in self.workers:
            worker.add_observer(observer)

    def remove_observer(self, observer: WorkerObserver) -> None:
        for worker in self.workers:
            worker.remove_observer(observer)


def _pool_status(workers: Sequence[InferenceWorker], statuses: list[WorkerStatus]) -> PoolStatus:
    """Sum local workers' engines and schedulers into one :class:`PoolStatus`."""
    engine_stats: collections.defaultdict[str, float] = collections.defaultdict(float)
    queue_events: collections.Counter[str] = collections.Counter()
    for worker in workers:
        for key, value in worker.engine.stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                engine_stats[key] += value
        for key in QUEUE_EVENTS:
            queue_events[key] += getattr(worker.scheduler.stats, key)
    return PoolStatus(
        alive=all(s.alive for s in statuses), queue_depth=sum(s.queue_depth for s in statuses),
        max_queue=workers[0].scheduler.max_queue, restarts=sum(s.restarts for s in statuses),
        workers=tuple(statuses), engine_stats=dict(engine_stats), queue_events=dict(queue_events),
    )
