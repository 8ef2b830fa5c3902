"""The batching worker: queueing policy without threads, then the threaded shell with a fake engine."""

import asyncio
import dataclasses

import numpy as np
import pytest

from stream_server.inference.types import InferenceRequest
from stream_server.inference.ray_pool import RayServeWorker
from stream_server.inference.worker import BatchScheduler, InferencePool, InferenceWorker, QueueFull, Superseded, WorkerPool
from tests.fakes import CountingEngine, GatedEngine


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until true (bounded): the worker thread's progress, not a guessed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def req(session="s", utterance=0, kind="partial", seconds=1.0):
    return InferenceRequest(session, utterance, kind, np.zeros(int(seconds * 16000), np.float32))


def test_finals_go_before_partials_and_oldest_first():
    s = BatchScheduler(max_batch=3, max_wait=0.0)
    s.submit(req("a", 0, "partial"), now=0.0, token="pa")
    s.submit(req("b", 0, "partial"), now=0.1, token="pb")
    s.submit(req("c", 0, "final"), now=0.2, token="fc")
    s.submit(req("d", 0, "final"), now=0.3, token="fd")
    assert [t for _, t in s.take_batch(now=1.0)] == ["fc", "fd", "pa"]
    assert [t for _, t in s.take_batch(now=1.0)] == ["pb"]
    assert s.take_batch(now=1.0) == []


def test_newer_partial_replaces_queued_one_and_final_drops_it():
    s = BatchScheduler(max_batch=8, max_wait=0.0)
    assert s.submit(req("a", 0), 0.0, "old") == []
    assert s.submit(req("a", 0), 0.1, "new") == ["old"]
    assert len(s) == 1
    assert s.submit(req("a", 0, "final"), 0.2, "final") == ["new"]
    assert [t for _, t in s.take_batch(1.0)] == ["final"]


def test_queue_bound_refuses_partials_but_reserves_room_for_finals():
    s = BatchScheduler(max_batch=8, max_wait=0.0, max_queue=2, final_reserve=1)
    s.submit(req("a", 0), 0.0, "t")
    s.submit(req("b", 0), 0.0, "t")
    with pytest.raises(QueueFull):
        s.submit(req("c", 0), 0.0, "t")
    s.submit(req("c", 0, "final"), 0.0, "t")
    with pytest.raises(QueueFull):
        s.submit(req("d", 0, "final"), 0.0, "t")
    assert s.stats.rejected == 2


def test_batch_waits_for_max_wait_unless_full():
    s = BatchScheduler(max_batch=2, max_wait=0.010)
    s.submit(req("a", 0), now=100.0, token="t")
    assert s.wait_time(100.0) == pytest.approx(0.010)
    assert s.take_batch(100.005) == []
    s.submit(req("b", 0), now=100.006, token="t")
    assert s.wait_time(100.006) == 0.0
    assert len(s.take_batch(100.006)) == 2


def test_drop_session_removes_only_that_session():
    s = BatchScheduler()
    s.submit(req("a", 0), 0.0, "a0")
    s.submit(req("a", 1, "final"), 0.0, "a1")
    s.submit(req("b", 0), 0.0, "b0")
    assert sorted(s.drop_session("a")) == ["a0", "a1"]
    assert len(s) == 1


async def test_worker_batches_across_sessions_and_resolves_futures():
    engine = CountingEngine(delay=0.05)
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.02))
    worker.start()
    try:
        futures = [worker.submit(req(f"s{i}", 0, "final", seconds=0.45 * (i + 1))) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert [r.text for r in results] == ["w0", "w0 w1", "w0 w1 w2", "w0 w1 w2 w3"]
        assert max(len(b) for b in engine.batches) > 1
    finally:
        worker.stop()


async def test_engine_failure_fails_only_its_batch_and_worker_continues():
    engine = CountingEngine(fail_on={7})
    worker = InferenceWorker(engine, BatchScheduler(max_batch=1, max_wait=0.0))
    worker.start()
    try:
        bad = worker.submit(req("s", 7, "final"))
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(bad, 5)
        good = await asyncio.wait_for(worker.submit(req("s", 8, "final")), 5)
        assert good.text == "w0 w1"
        assert worker.failures == 1
    finally:
        worker.stop()


async def test_replaced_and_cancelled_requests_fail_with_superseded():
    engine = CountingEngine(delay=0.2)
    worker = InferenceWorker(engine, BatchScheduler(max_batch=1, max_wait=0.0))
    worker.start()
    try:
        blocker = worker.submit(req("x", 0, "final"))
        await until(lambda: engine.batches, "the worker to be busy with the blocker")
        first = worker.submit(req("s", 0))
        second = worker.submit(req("s", 0))
        other = worker.submit(req("t", 0))
        worker.cancel_session("t")
        with pytest.raises(Superseded):
            await asyncio.wait_for(first, 5)
        with pytest.raises(Superseded):
            await asyncio.wait_for(other, 5)
        assert (await asyncio.wait_for(second, 5)).text == "w0 w1"
        await blocker
    finally:
        worker.stop()


async def test_a_failing_request_in_a_batch_fails_alone():
    from tests.fakes import PoisonEngine

    engine = PoisonEngine(delay=0.0)
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.05))
    worker.start()
    try:
        futures = [worker.submit(req(f"s{i}", u, "final")) for i, u in enumerate([1, 13, 2])]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
        assert isinstance(outcomes[1], RuntimeError) and "out of memory" in str(outcomes[1])
        assert outcomes[0].text == outcomes[2].text == "w0 w1"
    finally:
        worker.stop()


async def _until_dead(worker, timeout=10.0):
    """Wait for the worker thread to die (a CrashOnceEngine kills it on its first batch)."""
    await until(lambda: not worker.alive, "the worker thread to die", timeout)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_worker_thread_is_restarted_and_its_batch_requeued():
    from tests.fakes import CrashOnceEngine

    engine = CrashOnceEngine()
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.0))
    worker.start()
    try:
        future = worker.submit(req("s", 0, "final"))
        await _until_dead(worker)
        assert worker.ensure_alive() and worker.restarts == 1
        result = await asyncio.wait_for(future, 5)
        assert result.text == "w0 w1"
    finally:
        worker.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_refresh_in_the_batch_of_a_dead_worker_thread_is_answered_after_the_restart():
    from tests.fakes import CrashOnceEngine

    engine = CrashOnceEngine()
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.05))
    worker.start()
    try:
        waiting = worker.submit(ctc_partial("s", 0))
        refresh = ctc_partial("s", 0, seconds=1.5)
        refresh.refresh_only = True
        fresh = worker.submit(refresh)  # replaces the waiting one before the batch is taken
        with pytest.raises(Superseded):
            await asyncio.wait_for(waiting, 5)
        await _until_dead(worker)  # the refresh's batch killed the thread; it was put back
        assert worker.ensure_alive()
        assert (await asyncio.wait_for(fresh, 5)).text == "w0 w1 w2"  # not dropped as a refresh
    finally:
        worker.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_pool_spreads_sessions_and_survives_one_worker_dying():
    from tests.fakes import CrashOnceEngine

    healthy, fragile = CountingEngine(), CrashOnceEngine()
    pool = WorkerPool([InferenceWorker(healthy), InferenceWorker(fragile)])
    pool.start()
    try:
        workers = {pool.worker_for(f"s{i}") for i in range(4)}
        assert len(workers) == 2
        assert [w.detail["sessions"] for w in pool.status().workers] == [2, 2]
        futures = [pool.submit(req(f"s{i}", 0, "final")) for i in range(4)]
        await _until_dead(pool.workers[1])  # the fragile worker's thread dies on its first batch
        assert pool.workers[0].alive
        pool.ensure_alive()
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert all(r.text == "w0 w1" for r in results)
        assert pool.restarts == 1 and len(healthy.batches) >= 1
        pool.cancel_session("s0")
        assert sum(w.detail["sessions"] for w in pool.status().workers) == 3
    finally:
        pool.stop()


class EarlyPartialsEngine(CountingEngine):
    """Answers partials at once through ``on_result``, then spends a while on the finals."""

    def __init__(self, fail_after_early=False):
        super().__init__(early_results=True)
        self.fail_after_early = fail_after_early
        self.release = None  # threading.Event set by the test once it saw the early answer

    def transcribe_batch(self, requests, on_result=None):
        results = CountingEngine.transcribe_batch(self, requests)
        for i, r in enumerate(requests):
            if r.kind == "partial":
                on_result(i, results[i])
        assert self.release.wait(5), "the test never saw the early partial"
        if self.fail_after_early:
            raise RuntimeError("finals failed after the partials went out")
        return results


@pytest.mark.parametrize("fail_after_early", [False, True])
async def test_early_results_reach_their_futures_before_the_batch_ends(fail_after_early):
    import threading

    engine = EarlyPartialsEngine(fail_after_early)
    engine.release = threading.Event()
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.05))
    worker.start()
    try:
        final = worker.submit(req("a", 0, "final", seconds=1.0))
        partial = worker.submit(req("b", 0, "partial", seconds=0.85))
        early = await asyncio.wait_for(partial, 5)  # while the engine still holds the batch
        assert early.text == "w0 w1" and not final.done()
        engine.release.set()
        if fail_after_early:
            # The batch failed after the partial went out: only the final is retried alone (and fails
            # again here); the partial is neither answered twice nor decoded again.
            with pytest.raises(Exception):
                await asyncio.wait_for(final, 5)
            assert sum(len(b) for b in engine.batches) == 3  # the batch of two, then the final alone
        else:
            assert (await asyncio.wait_for(final, 5)).text == "w0 w1"
    finally:
        engine.release.set()
        worker.stop()


# ------------------------------------------------------------------------------ partial refreshes
def ctc_partial(session="s", utterance=0, seconds=1.0, mode="ctc"):
    r = req(session, utterance, "partial", seconds)
    r.partial_mode = mode
    return r


def test_a_refresh_replaces_the_waiting_partial_in_its_place_or_is_dropped_when_none_waits():
    s = BatchScheduler(max_batch=1, max_wait=10.0)
    s.submit(ctc_partial("a", 0), 0.0, "a0")
    s.submit(ctc_partial("b", 0), 0.5, "b0")
    refresh = ctc_partial("a", 0, seconds=1.5)
    refresh.refresh_only = True
    assert s.submit(refresh, 1.0, "a1") == ["a0"]  # the waiting one is replaced ...
    assert [t for _, t in s.take_batch(1.0, force=True)] == ["a1"]  # ... in its place in line, before "b0"
    late = ctc_partial("a", 0, seconds=2.0)
    late.refresh_only = True
    assert s.submit(late, 2.0, "a2") == ["a2"] and len(s) == 1  # "a" has started: nothing to refresh
    assert s.stats.refreshes_dropped == 1


async def test_a_refresh_of_a_partial_the_worker_has_started_fails_as_superseded():
    engine = GatedEngine()
    worker = InferenceWorker(engine, BatchScheduler(max_batch=8, max_wait=0.01))
    worker.start()
    try:
        running = worker.submit(ctc_partial("a", 0, seconds=0.85, mode="llm"))  # decodes until released
        await until(engine.entered.is_set, "the partial to be decoding")
        refresh = ctc_partial("a", 0, seconds=1.35, mode="llm")
        refresh.refresh_only = True
        with pytest.raises(Superseded):
            await asyncio.wait_for(worker.submit(refresh), 5)
        engine.gate.set()
        assert (await asyncio.wait_for(running, 5)).text == "w0 w1"
    finally:
        engine.gate.set()
        worker.stop()


def test_a_lane_kept_for_finals_sees_and_takes_only_finals():
    s = BatchScheduler(max_batch=4, max_wait=0.0)
    s.submit(req("a", 0, "partial"), now=0.0, token="pa")
    assert s.wait_time(1.0, partials=False) is None  # nothing it may take
    assert s.take_batch(1.0, partials=False) == []
    s.submit(req("b", 0, "final"), now=0.5, token="fb")
    assert s.wait_time(1.0, partials=False) == 0.0
    assert [t for _, t in s.take_batch(1.0, partials=False)] == ["fb"]
    assert [t for _, t in s.take_batch(1.0)] == ["pa"]  # still queued for a lane that may take it


class PartialGatedEngine(CountingEngine):
    """Two lanes; every batch holding a partial waits for ``gate``; finals run at once."""

    def __init__(self):
        super().__init__(concurrency=2)
        import threading

        self.gate = threading.Event()
        self.partial_batches_running = 0
        self.most_partial_batches_at_once = 0

    def transcribe_batch(self, requests):
        if any(r.kind == "partial" for r in requests):
            with self.lock:
                self.partial_batches_running += 1
                self.most_partial_batches_at_once = max(self.most_partial_batches_at_once,
                                                        self.partial_batches_running)
            try:
                self.gate.wait(30)
                return super().transcribe_batch(requests)
            finally:
                with self.lock:
                    self.partial_batches_running -= 1
        return super().transcribe_batch(requests)


async def test_with_two_lanes_a_final_does_not_wait_behind_a_running_batch_of_partials():
    engine = PartialGatedEngine()
    worker = InferenceWorker(engine, BatchScheduler(max_batch=1, max_wait=0.0))
    assert worker.lanes == 2
    worker.start()
    try:
        first = worker.submit(req("a", 0, "partial"))
        await until(lambda: engine.partial_batches_running == 1, "the partial batch to start")
        second = worker.submit(req("b", 0, "partial"))  # must wait: the other lane is kept for finals
        final = worker.submit(req("c", 0, "final"))
        assert (await asyncio.wait_for(final, 5)).text == "w0 w1"
        assert not first.done() and not second.done()
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert engine.most_partial_batches_at_once == 1
    finally:
        engine.gate.set()
        worker.stop()


async def test_with_one_lane_a_final_waits_for_the_batch_in_progress():
    engine = PartialGatedEngine()
    engine.capabilities = dataclasses.replace(engine.capabilities, concurrency=1)
    worker = InferenceWorker(engine, BatchScheduler(max_batch=1, max_wait=0.0))
    worker.start()
    try:
        first = worker.submit(req("a", 0, "partial"))
        await until(lambda: engine.partial_batches_running == 1, "the partial batch to start")
        final = worker.submit(req("c", 0, "final"))
        await asyncio.sleep(0.2)
        assert not final.done()
        engine.gate.set()
        assert (await asyncio.wait_for(final, 5)).text == "w0 w1"
        await asyncio.wait_for(first, 5)
    finally:
        engine.gate.set()
        worker.stop()


class _Recorder:
    """A worker observer that records what it saw; ``fail`` makes every call raise after recording."""

    def __init__(self, fail: bool = False):
        self.events: list[tuple] = []
        self.fail = fail

    def _record(self, *event) -> None:
        self.events.append(event)
        if self.fail:
            raise RuntimeError("observer bug")

    def on_submit(self, request):
        self._record("submit", request.utterance_id)

    def on_batch_start(self, requests):
        self._record("start", tuple(r.utterance_id for r in requests))

    def on_batch_end(self, requests, seconds):
        assert seconds >= 0.0
        self._record("end", tuple(r.utterance_id for r in requests))


async def test_observers_see_submits_and_batches_and_cannot_break_them():
    engine = CountingEngine(delay=0.0)
    worker = InferenceWorker(engine, BatchScheduler(max_batch=4, max_wait=0.05))
    broken, watching = _Recorder(fail=True), _Recorder()
    worker.add_observer(broken)
    worker.add_observer(watching)
    worker.start()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(worker.submit(req("s", u, "final")) for u in (1, 2))), 5)
        assert [r.text for r in results] == ["w0 w1", "w0 w1"]  # the failing observer changed nothing
        await until(lambda: len(watching.events) == 4, "the batch end to be observed")
        assert watching.events == [("submit", 1), ("submit", 2), ("start", (1, 2)), ("end", (1, 2))]
        assert broken.events == watching.events and worker.failures == 0
        worker.remove_observer(watching)
        await asyncio.wait_for(worker.submit(req("s", 3, "final")), 5)
        assert len(watching.events) == 4
    finally:
        worker.stop()


async def test_every_pool_detaches_an_observer_through_the_pool_interface():
    """InferencePool.remove_observer, on each implementation: a detached observer sees no later
    submit or batch, and detaching one never attached is ignored (the Ray pool attaches none)."""
    pools: list[InferencePool] = [
        InferenceWorker(CountingEngine(), BatchScheduler(max_batch=4, max_wait=0.01)),
        WorkerPool([InferenceWorker(CountingEngine(), BatchScheduler(max_batch=4, max_wait=0.01))]),
        RayServeWorker(None, CountingEngine().capabilities),
    ]
    for pool in pools:
        kept, detached = _Recorder(), _Recorder()
        pool.add_observer(kept)
        pool.add_observer(detached)
        pool.remove_observer(detached)
        pool.remove_observer(_Recorder())
        if isinstance(pool, RayServeWorker):
            continue  # its batches run in the replicas: nothing to run here
        pool.start()
        try:
            await asyncio.wait_for(pool.submit(req("s", 1, "final")), 5)
            await until(lambda: len(kept.events) == 3, "the batch end to be observed")
        finally:
            pool.stop()
        assert [event for event, _ in kept.events] == ["submit", "start", "end"] and detached.events == []
