"""End to end through ``granite-stream serve`` itself: the production entry point on a GPU.

``gpu_server_bench`` builds its server in-process with a forced decode length. This check instead
saves a random-weight Granite checkpoint (full-size architecture, or the tiny one with ``--tiny``)
to a directory, starts the real command line on it with the flags ``docs/deployment.md`` gives for
one GPU, and plays real speech at real time into it with the same load generator, over loopback:

    python -m benchmarks.gpu_serve_check --streams 100,200 --data .gpudata
    python -m benchmarks.gpu_serve_check --tiny --cpu --streams 4 --seconds 10 --data .gpudata   # smoke

What differs from the bench, on purpose: the engine is built by ``serve`` from the checkpoint with
its defaults, so nothing forces the decode length; random weights rarely produce EOS, so a final
decodes its whole budget (``tokens_per_second`` 8 + 20 tokens: ~60 for 5 s of speech, four times
the bench's forced 3 per second). Latencies are therefore not comparable with the bench's; the
check is that the served path works under load (no failures, no errors) and what it costs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.gpu_server_bench import _level_jobs, _raise_nofile, loadgen_chunk, summarize_level
from benchmarks.servers import _wait_ready, stop_process, wait_for_port
from granite_stream_testing.net import free_port


def save_checkpoint(directory: Path, tiny: bool, device: str) -> float:
    """Write a random-weight checkpoint (model + tokenizer) that ``serve --model`` can load; returns seconds."""
    import torch

    from benchmarks.granite_gpu_bench import build_full, build_tiny

    t0 = time.perf_counter()
    model, tokenizer = build_tiny("cpu") if tiny else build_full(device, torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def serve_command(args, model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "stream_server.cli", "serve", "--engine", "granite", "--model", str(model_dir),
            "--device", "cpu" if args.cpu else "cuda", "--port", str(port), "--log-level", "WARNING",
            "--granite-encoder-batching", "exact" if args.cpu else "padded",
            "--max-batch", str(args.max_batch), "--max-queue", "8192",
            "--max-sessions", "5000", "--max-sessions-per-ip", "5000",  # every stream comes from 127.0.0.1
            *args.serve_arg]


COUNTERS = ("granite_stream_engine_events_total", "granite_stream_queue_events_total", "granite_stream_finals_total",
            "granite_stream_partials_total", "granite_stream_errors_total")
GAUGES = ("granite_stream_gpu_memory_bytes",)


def metrics(port: int) -> dict:
    """The engine and queue counters and the GPU memory gauge from ``/metrics``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(COUNTERS + GAUGES)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="100", help="comma list of concurrent stream counts, one level each")
    ap.add_argument("--seconds", type=float, default=30.0, help="audio per stream per level")
    ap.add_argument("--stagger", type=float, default=5.0)
    ap.add_argument("--data", default=None, help="folder of *.wav/*.txt (default: the librivox set from the dataset "
                    "cache; `python -m benchmarks.gpu_server_bench --build-data DIR` makes the folder)")
    ap.add_argument("--loadgen-procs", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny random model")
    ap.add_argument("--cpu", action="store_true", help="serve on the CPU (smoke run)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra serve flag, repeatable")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)
    # _level_jobs reads the bench's names for these.
    args.seconds_per_level, args.frame_ms, args.partials, args.partial_interval = args.seconds, 100.0, "ctc", 0.5
    out: dict = {"argv": list(sys.argv[1:] if argv is None else argv), "levels": []}
    with tempfile.TemporaryDirectory(prefix="granite-ckpt-") as tmp:
        model_dir = Path(tmp)
        out["checkpoint_s"] = round(save_checkpoint(model_dir, args.tiny, "cpu" if args.cpu else "cuda"), 1)
        port = free_port()
        cmd = serve_command(args, model_dir, port)
        out["command"] = " ".join(cmd[2:])
        print(f"checkpoint written in {out['checkpoint_s']} s; {out['command']}", flush=True)
        log = open(model_dir / "serve.log", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 600, proc)
            _wait_ready(f"http://127.0.0.1:{port}/readyz", 600)
            out["startup_s"] = round(time.perf_counter() - t0, 1)
            print(f"serve ready after {out['startup_s']} s (load + warm-up)", flush=True)
            url = f"ws://127.0.0.1:{port}/v1/listen"
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.loadgen_procs, mp_context=ctx,
                                                        initializer=_raise_nofile) as pool:
                for n in [int(x) for x in args.streams.split(",") if x]:
                    before = metrics(port)
                    started = time.perf_counter()
                    chunks = list(pool.map(loadgen_chunk, _level_jobs(url, n, args)))
                    results = [r for c in chunks for r in c["results"]]
                    row: dict = {"streams": n, "wall_s": round(time.perf_counter() - started, 1)}
                    row.update(summarize_level(results, chunks))
                    after = metrics(port)
                    row["server_counters"] = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(COUNTERS)}
                    row["server_gauges"] = {k: after[k] for k in after if k.startswith(GAUGES)}
                    out["levels"].append(row)
                    fl, pl = row["final_latency"], row["partial_lag"]
                    print(f"{n:5d} streams | final p50 {fl['p50']} p95 {fl['p95']} ({row['clips_finalized']}/"
                          f"{row['clips']}) | partial lag p50 {pl['p50']} p95 {pl['p95']} | stream failures "
                          f"{row['stream_failures']} {row['stream_failure_examples']} | errors {row['errors']}",
                          flush=True)
                    time.sleep(2.0)
        finally:
            stop_process(proc)
            log.close()
            tail = (model_dir / "serve.log").read_text(errors="replace")[-3000:]
            out["serve_log_tail"] = tail
            if tail.strip():
                print("serve log (tail):\n" + tail, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0 if out["levels"] and all(r["stream_failures"] == 0 for r in out["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
