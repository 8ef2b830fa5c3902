"""What the Ray Serve hop costs a final: in-process worker vs the pool, in one run.

Same clips, same engine (Whisper tiny.en, int8, one thread), same batching wait (5 ms), finals
submitted one at a time (sequential: no batching, no queueing — the pure per-request cost):

* ``local``: :class:`~stream_server.inference.worker.InferenceWorker` in this process (what ``serve`` runs);
* ``pool``: :class:`~stream_server.inference.ray_pool.RayServeWorker` → a one-replica Serve application on a
  local Ray instance (``--ray-address local``, the default) or on a cluster (``auto``/``ray://``).

Each clip is decoded by both, in alternating order (local first on even clips, pool first on odd
ones) so drift in the machine's load hits both alike. Reported: p50/p95 submit-to-result latency of
each path, the difference of the p50s and p95s, the paired per-clip difference, each path's time
outside the engine (latency minus the engine time of that request's batch: the batching wait,
hand-offs and, for the pool, serialization and the Ray round trip) and their difference — the hop
overhead, which does not depend on the engine's run-to-run noise — and the round trip of an empty
call (``ping``).

    python -m benchmarks.remote_hop --out bench-results/remote_hop.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from stream_server.inference.types import SAMPLE_RATE, InferenceRequest
from stream_server.engines.base import Engine


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summary(values) -> dict:
    return {"n": len(values), "p50_ms": _ms(percentile(values, 50)), "p95_ms": _ms(percentile(values, 95)),
            "mean_ms": _ms(statistics.fmean(values) if values else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _machine() -> dict:
    try:
        from benchmarks.servers import machine_info

        info = machine_info()
    except Exception:  # noqa: BLE001 - the figures matter more than the description
        import platform

        info = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    from importlib import metadata

    packages = info.setdefault("packages", {})
    for name in ("ray", "ctranslate2", "faster-whisper", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    with contextlib.suppress(OSError):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def load_clips(sets: list[str], limit: int) -> list[tuple[str, np.ndarray]]:
    """Dev clips of the named sets, resampled to 16 kHz float32, at most ``limit`` (spread over the sets)."""
    import soxr

    from granite_stream_testing.datasets import load_set, read_audio

    per_set = [load_set(name, "dev") for name in sets]
    picked: list = []
    # Round-robin over the sets so a small --clips still mixes phone prompts and read speech.
    for i in range(max(len(s) for s in per_set)):
        for clips in per_set:
            if i < len(clips) and len(picked) < limit:
                picked.append(clips[i])
    out = []
    for clip in picked:
        audio, rate = read_audio(clip)
        if rate != SAMPLE_RATE:
            audio = soxr.resample(audio, rate, SAMPLE_RATE)
        out.append((clip.id, np.ascontiguousarray(audio[: int(30 * SAMPLE_RATE)], dtype=np.float32)))
    return out


class _TimedEngine(Engine):
    """The in-process engine, timing each batch before its results go back (so before the future resolves)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.capabilities = engine.capabilities
        self.seconds: dict[int, float] = {}

    def transcribe_batch(self, requests):
        started = time.perf_counter()
        results = self.engine.transcribe_batch(requests)
        elapsed = time.perf_counter() - started
        for request in requests:
            self.seconds[request.request_id] = elapsed
        return results


async def _timed(worker, request: InferenceRequest):
    started = time.perf_counter()
    result = await worker.submit(request)
    return time.perf_counter() - started, result


async def run(args) -> dict:
    from stream_server.engines import load_engine
    from stream_server.inference.ray_pool import RayPoolSettings, connect_pool
    from stream_server.inference.worker import BatchScheduler, InferenceWorker

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = load_clips(args.sets.split(","), args.clips)
    print(f"[remote_hop] {len(clips)} clips, {sum(len(a) for _, a in clips) / SAMPLE_RATE:.1f} s of audio", file=sys.stderr)
    machine = _machine()
    loop = asyncio.get_running_loop()

    engine, _ = load_engine("whisper", args.model, "cpu", args.cpu_threads, args.max_batch)
    timed = _TimedEngine(engine)
    local = InferenceWorker(timed, BatchScheduler(args.max_batch, args.batch_wait_ms / 1000.0))
    settings = RayPoolSettings(
        address=args.ray_address, app_name=args.app, deploy="always", engine="whisper", model=args.model,
        device="cpu", cpu_threads=args.cpu_threads, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000.0,
        num_replicas=1, local_num_cpus=args.local_cpus, log_to_driver=False,
    )
    started = time.monotonic()
    pool = await loop.run_in_executor(None, connect_pool, settings)
    pool_ready_s = time.monotonic() - started
    print(f"[remote_hop] pool ready in {pool_ready_s:.1f} s", file=sys.stderr)
    local.start(loop)
    pool.start(loop)
    try:
        warm = clips[0][1]
        for i in range(3):
            for worker in (local, pool):
                await worker.submit(InferenceRequest("warmup", i, "final", warm))
        pings = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            await pool.handle.ping.remote()
            pings.append(time.perf_counter() - t0)

        rows: list[dict] = []
        request_id = 0
        for r in range(args.rounds):
            for i, (clip_id, audio) in enumerate(clips):
                order = ("local", "pool") if (i + r) % 2 == 0 else ("pool", "local")
                row: dict = {"clip": clip_id, "round": r, "audio_s": round(len(audio) / SAMPLE_RATE, 3),
                       "payload_kb": round(audio.nbytes / 1024, 1)}
                for name in order:
                    worker = local if name == "local" else pool
                    request_id += 1
                    request = InferenceRequest(f"hop-{name}", request_id, "final", audio, request_id=request_id)
                    seconds, result = await _timed(worker, request)
                    row[f"{name}_s"] = round(seconds, 5)
                    row[f"{name}_text"] = result.text
                    if name == "pool":
                        row["pool_engine_s"] = result.info.get("pool", {}).get("engine_s")
                        row["pool_replica"] = result.info.get("pool", {}).get("replica")
                    else:
                        row["local_engine_s"] = round(timed.seconds.pop(request_id), 5)
                rows.append(row)
                print(f"[remote_hop] {len(rows):3d}/{len(clips) * args.rounds} {clip_id[-28:]:28s} "
                      f"{row['audio_s']:5.1f} s  local {row['local_s'] * 1000:7.1f} ms  pool {row['pool_s'] * 1000:7.1f} ms",
                      file=sys.stderr)
    finally:
        local.stop()
        pool.stop()
        if args.ray_address == "local":
            import ray
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        engine.close()

    local_s = [r["local_s"] for r in rows]
    pool_s = [r["pool_s"] for r in rows]
    paired = [r["pool_s"] - r["local_s"] for r in rows]
    outside_engine = [r["pool_s"] - r["pool_engine_s"] for r in rows if r.get("pool_engine_s") is not None]
    local_outside = [r["local_s"] - r["local_engine_s"] for r in rows]
    same_text = sum(r["local_text"] == r["pool_text"] for r in rows)
    with contextlib.suppress(OSError):
        machine["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "remote_hop",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {"engine": "whisper", "model": args.model or "tiny.en", "cpu_threads": args.cpu_threads,
                   "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "ray_address": args.ray_address,
                   "replicas": 1, "sets": args.sets, "clips": len(clips), "rounds": args.rounds,
                   "pool_ready_s": round(pool_ready_s, 1)},
        "local": summary(local_s),
        "pool": summary(pool_s),
        "difference_ms": {
            "p50": _round(_ms(percentile(pool_s, 50)), _ms(percentile(local_s, 50))),
            "p95": _round(_ms(percentile(pool_s, 95)), _ms(percentile(local_s, 95))),
        },
        "paired_difference": summary(paired),
        "pool_outside_engine": summary(outside_engine),
        "local_outside_engine": summary(local_outside),
        # The hop's own cost, free of the engine's run-to-run noise: time outside the engine, pool − local.
        "hop_overhead_ms": {
            "p50": _round(_ms(percentile(outside_engine, 50)), _ms(percentile(local_outside, 50))),
            "p95": _round(_ms(percentile(outside_engine, 95)), _ms(percentile(local_outside, 95))),
        },
        "ping": summary(pings),
        "identical_text": f"{same_text}/{len(rows)}",
        "rows": rows,
    }
    return result


def _round(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def print_table(result: dict) -> None:
    loc, pool, diff = result["local"], result["pool"], result["difference_ms"]
    paired, outside, ping = result["paired_difference"], result["pool_outside_engine"], result["ping"]
    local_outside, hop = result["local_outside_engine"], result["hop_overhead_ms"]
    print(f"\nremote hop: {result['config']['clips']} clips × {result['config']['rounds']} round(s), sequential finals, "
          f"{result['config']['model']} ({result['config']['cpu_threads']} thread), "
          f"{result['machine'].get('nproc')} cores {result['machine'].get('cpu_model', '')}")
    print("| path | n | p50 ms | p95 ms |")
    print("| --- | --- | --- | --- |")
    print(f"| in-process worker | {loc['n']} | {loc['p50_ms']} | {loc['p95_ms']} |")
    print(f"| Ray Serve pool (1 replica) | {pool['n']} | {pool['p50_ms']} | {pool['p95_ms']} |")
    print(f"| difference (pool − local) | | {diff['p50']} | {diff['p95']} |")
    print(f"| paired per-clip difference | {paired['n']} | {paired['p50_ms']} | {paired['p95_ms']} |")
    print(f"| in-process time outside the engine | {local_outside['n']} | {local_outside['p50_ms']} | {local_outside['p95_ms']} |")
    print(f"| pool time outside the engine | {outside['n']} | {outside['p50_ms']} | {outside['p95_ms']} |")
    print(f"| **hop overhead** (outside-engine, pool − local) | | {hop['p50']} | {hop['p95']} |")
    print(f"| empty call (ping) round trip | {ping['n']} | {ping['p50_ms']} | {ping['p95_ms']} |")
    print(f"identical text: {result['identical_text']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote_hop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="asterisk-en,librivox", help="dev sets (granite_stream_testing.datasets)")
    parser.add_argument("--clips", type=int, default=40, help="clips (round-robin over the sets)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the clips")
    parser.add_argument("--model", default=None, help="Whisper model (default: bundled tiny.en)")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--ray-address", default="local", help="local (start Ray here), auto or ray://head:10001")
    parser.add_argument("--app", default="granite-stream-hop-bench", help="Serve application name (deployed, then left running unless local)")
    parser.add_argument("--local-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout only)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print_table(result)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"[remote_hop] wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
