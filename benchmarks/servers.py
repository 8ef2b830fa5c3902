"""Servers under test: granite-stream in this process or in a child process, and resource probes.

``subprocess`` (the bench's default): the real ``granite-stream serve`` command in a child process,
with serve's own defaults; the load generator keeps its own process, so server CPU and memory are
measured alone and the clients' Python work does not hold the server's GIL. ``inprocess``: the
engine and :class:`~stream_server.server.app.StreamServer` live on the benchmark's own event loop,
next to the load generator (one process, one GIL), with the same defaults. ``docs/benchmarks.md``
says which one the figures used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator

from granite_stream_testing.net import free_port

SERVER_MODES = ("inprocess", "subprocess")


@dataclass
class ServerHandle:
    url: str
    pid: int
    label: str
    info: dict = field(default_factory=dict)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


LOAD_TEST_FLAGS = ("--max-sessions-per-ip", "4096")
"""What a benchmark's server needs that ``serve``'s defaults refuse: every client comes from
127.0.0.1. Everything else is ``serve``'s own default unless the bench was told otherwise."""


@contextlib.asynccontextmanager
async def granite_inprocess(engine_name: str = "whisper", model: str | None = None, cpu_threads: int | None = None,
                            max_batch: int | None = None, device: str | None = None,
                            engine_options: dict | None = None, early_final_ms: float | None = None,
                            partial_refresh: str | None = None,
                            realtime_factor: float | None = None) -> AsyncIterator[ServerHandle]:
    """The server on this event loop, with the product's defaults for every setting left ``None``
    (:class:`~stream_server.settings` sections), and :data:`LOAD_TEST_FLAGS`' limit."""
    from stream_server.engines import load_engine
    from stream_server.engines.base import Engine
    from stream_server.server.app import LimitsSettings, NetworkSettings, ServerSettings, StreamServer
    from stream_server.core.session import SessionSettings
    from stream_server.inference.types import WorkerSettings
    from stream_server.settings import EngineSettings

    loop = asyncio.get_running_loop()
    threads = EngineSettings.cpu_threads if cpu_threads is None else cpu_threads
    device = device or EngineSettings.device
    if engine_options:
        # What-if runs: build the Whisper engine directly with constructor overrides.
        from stream_server.engines.whisper import WhisperEngine

        if engine_name != "whisper":
            raise ValueError("--engine-option is only supported with --engine whisper")
        dev = "cuda" if device == "cuda" else "cpu"
        engine: Engine = await loop.run_in_executor(None, lambda: WhisperEngine(
            model, device=dev, compute_type="int8" if dev == "cpu" else "float16", cpu_threads=threads,
            max_batch=max_batch or WorkerSettings.max_batch, **engine_options))
        reason = f"bench --engine-option {engine_options}"
    else:
        engine, reason = await loop.run_in_executor(None, lambda: load_engine(engine_name, model, device, threads,
                                                                              max_batch))
    await loop.run_in_executor(None, engine.warmup)
    session = SessionSettings()
    if early_final_ms is not None:
        session = replace(session, early_final_s=early_final_ms / 1000.0)
    if partial_refresh is not None:
        session = replace(session, refresh_waiting_partials=partial_refresh == "on")
    limits = LimitsSettings(max_sessions_per_ip=int(LOAD_TEST_FLAGS[1]))
    if realtime_factor is not None:
        limits = replace(limits, realtime_factor=realtime_factor)
    settings = ServerSettings(network=NetworkSettings(port=0), limits=limits,
                              worker=WorkerSettings() if max_batch is None else WorkerSettings(max_batch=max_batch),
                              session=session)
    async with StreamServer(engine, settings, reason) as server:
        yield ServerHandle(server.url, os.getpid(), "granite-stream (in-process)",
                           {"engine": engine.capabilities.to_wire(), "reason": reason, "mode": "inprocess",
                            "model_path": str(getattr(engine, "model_path", "")),
                            "engine_options": engine_options or {},
                            "early_final_ms": round(session.early_final_s * 1000.0, 3),
                            "partial_refresh": "on" if session.refresh_waiting_partials else "off",
                            "max_batch": settings.worker.max_batch, "realtime_factor": limits.realtime_factor})


def serve_command(port: int, **options: object) -> list[str]:
    """The ``granite-stream serve`` command line a benchmark starts: serve's defaults, the port,
    :data:`LOAD_TEST_FLAGS`, and ``--flag value`` for each option given (``cpu_threads=2`` is
    ``--cpu-threads 2``; ``None`` leaves serve's default)."""
    cmd = [sys.executable, "-m", "stream_server.cli", "serve", "--log-level", "WARNING", "--port", str(port),
           *LOAD_TEST_FLAGS]
    for name, value in options.items():
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


@contextlib.contextmanager
def granite_subprocess(engine_name: str | None = "whisper", model: str | None = None, cpu_threads: int | None = None,
                       max_batch: int | None = None, device: str | None = None, log_path: Path | None = None,
                       early_final_ms: float | None = None, partial_refresh: str | None = None,
                       realtime_factor: float | None = None):
    """``granite-stream serve`` in a child process: its own defaults, :data:`LOAD_TEST_FLAGS`, and
    a flag for each argument given (not ``None``)."""
    port = free_port()
    cmd = serve_command(port, engine=engine_name, model=model, cpu_threads=cpu_threads, max_batch=max_batch,
                        device=device, early_final_ms=early_final_ms, partial_refresh=partial_refresh,
                        realtime_factor=realtime_factor)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    try:
        try:
            wait_for_port(port, 180, proc)
        except RuntimeError as exc:
            tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"{exc}: {' '.join(cmd[2:])}\n{tail}") from None
        _wait_ready(f"http://127.0.0.1:{port}/readyz", 60)
        info = {"mode": "subprocess", "command": " ".join(cmd[2:])}
        with contextlib.suppress(Exception):
            import json

            info |= json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
        yield ServerHandle(f"ws://127.0.0.1:{port}/v1/listen", proc.pid, "granite-stream (subprocess)", info)
    finally:
        stop_process(proc)
        if not isinstance(out, int):  # a log file, not subprocess.DEVNULL
            out.close()


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate one child process we started (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class ResourceMonitor:
    """Samples a process's CPU time and RSS (psutil) on a thread; CUDA memory where torch sees a GPU.

    ``cpu_percent`` is process CPU time over wall time × 100 (up to 100 × cores).
    """

    def __init__(self, pid: int, interval: float = 0.25):
        try:
            import psutil

            self.proc = psutil.Process(pid)
        except ImportError:  # Linux fallback: read /proc directly
            self.proc = _ProcReader(pid)
        self.interval = interval
        self.rss_peak = 0
        self.rss_samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ResourceMonitor":
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu()
        self._gpu0 = gpu_memory_used()
        self._thread = threading.Thread(target=self._run, daemon=True, name="resource-monitor")
        self._thread.start()
        return self

    def _cpu(self) -> float:
        times = self.proc.cpu_times()
        return times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                rss = self.proc.memory_info().rss
                self.rss_samples.append(rss)
                self.rss_peak = max(self.rss_peak, rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.wall = time.perf_counter() - self._t0
        self.cpu_seconds = self._cpu() - self._cpu0
        with contextlib.suppress(Exception):
            self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
        self.gpu_used = gpu_memory_used()

    def summary(self) -> dict:
        return {
            "cpu_percent": round(100.0 * self.cpu_seconds / self.wall, 1) if self.wall > 0 else None,
            "cpu_seconds": round(self.cpu_seconds, 2),
            "wall_seconds": round(self.wall, 2),
            "rss_peak_mb": round(self.rss_peak / 2**20, 1),
            "rss_mean_mb": round(sum(self.rss_samples) / len(self.rss_samples) / 2**20, 1) if self.rss_samples else None,
            "gpu_memory_used_mb": self.gpu_used,
        }


class _ProcReader:
    """The two psutil calls the monitor needs, from /proc (Linux)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def cpu_times(self):
        from types import SimpleNamespace

        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return SimpleNamespace(user=int(fields[11]) / self._tick, system=int(fields[12]) / self._tick)

    def memory_info(self):
        from types import SimpleNamespace

        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return SimpleNamespace(rss=int(line.split()[1]) * 1024)
        return SimpleNamespace(rss=0)


class SystemMonitor:
    """Whole-machine CPU use over a block (/proc/stat), to tell how much other processes took.

    ``system_cpu_percent`` is busy CPU time of all processes over wall time × 100 (up to 100 × cores);
    subtract the server's and the load generator's to get what everything else used meanwhile.
    """

    def __enter__(self) -> "SystemMonitor":
        self._t0 = time.perf_counter()
        self._busy0 = self._busy()
        self.loadavg_start = _loadavg()
        return self

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        busy1 = self._busy()
        self.busy = None if busy1 is None or self._busy0 is None else busy1 - self._busy0
        self.loadavg_end = _loadavg()

    def summary(self, *own_cpu_seconds: float) -> dict:
        if self.busy is None or self.wall <= 0:
            return {"system_cpu_percent": None, "other_cpu_percent": None}
        other = self.busy - sum(own_cpu_seconds)
        return {
            "system_cpu_percent": round(100 * self.busy / self.wall, 1),
            "other_cpu_percent": round(max(0.0, 100 * other / self.wall), 1),
            "loadavg_1m": [self.loadavg_start, self.loadavg_end],
        }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def gpu_memory_used() -> float | None:
    """Device-wide used GPU memory in MiB (``torch.cuda.mem_get_info``; sees CTranslate2 too), or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return round((total - free) / 2**20, 1)
    except Exception:  # noqa: BLE001 - no torch, no driver: no figure
        return None


def machine_info() -> dict:
    """nproc, CPU model, RAM, Python and key package versions."""
    import platform
    from importlib import metadata

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    versions = {}
    for name in ("ctranslate2", "faster-whisper", "websockets", "numpy", "jiwer", "whisper-live", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu or platform.processor(),
        "ram_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "gpu": _gpu_name(),
        "code": code_fingerprint(),
    }


def code_fingerprint() -> dict:
    """sha256 over the server's sources (stream_server/, vad/), to tell which code a result measured."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    files = sorted(p for d in ("stream_server", "vad") for p in (root / d).rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    newest = max((p.stat().st_mtime for p in files), default=0)
    import datetime as dt

    return {"sources_sha256": digest.hexdigest()[:16], "files": len(files),
            "newest_source_mtime": dt.datetime.fromtimestamp(newest, dt.timezone.utc).isoformat(timespec="seconds")}


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None
