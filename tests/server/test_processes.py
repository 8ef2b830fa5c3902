"""``serve --processes N``: several server processes on one port, supervised, stopped together."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from granite_stream_testing.datasets import read_audio
from granite_stream_testing.net import free_port
from stream_server.server.app import LISTEN_PATH
from tests.server.test_server import http_get, stream_clip

REPO = Path(__file__).resolve().parents[2]


async def _ready_pids(port: int, want: int, timeout: float) -> set[int]:
    """Ask /readyz over fresh connections until ``want`` different processes have answered."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < deadline:
        try:
            status, _, body = await http_get(port, "/readyz")
        except OSError:
            await asyncio.sleep(0.5)  # not listening yet
            continue
        if status == 200:
            pids.add(json.loads(body)["pid"])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_two_processes_share_the_port_serve_speech_survive_a_crash_and_stop_on_sigterm(librivox_clips):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_server.cli", "serve", "--engine", "whisper", "--port", str(port),
         "--processes", "2", "--cpu-threads", "1", "--log-level", "WARNING"], cwd=REPO)
    try:
        pids = await _ready_pids(port, want=2, timeout=180)
        assert len(pids) == 2 and proc.pid not in pids, f"answered by {pids}"
        audio, rate = read_audio(librivox_clips[0])
        events = await stream_clip(f"ws://127.0.0.1:{port}{LISTEN_PATH}", audio[: rate * 3], rate, pace=4.0)
        assert [e["type"] for e in events][-1] == "end"
        assert any(e["type"] == "final" and e["text"] for e in events)
        # A process that dies is replaced; the port keeps being served meanwhile by the other one.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 180
        now_serving: set[int] = set()
        while time.monotonic() < deadline and not (now_serving - pids):
            now_serving |= await _ready_pids(port, want=2, timeout=5)
        replacement = now_serving - pids
        assert replacement, f"no new process answered after {victim} was killed (saw {now_serving})"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(_alive(pid) for pid in pids | replacement)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_processes_need_a_fixed_port():
    result = subprocess.run([sys.executable, "-m", "stream_server.cli", "serve", "--port", "0", "--processes", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "fixed --port" in result.stderr


def test_processes_refuse_a_private_ray_cluster_each():
    result = subprocess.run([sys.executable, "-m", "stream_server.cli", "serve", "--port", "8799", "--processes", "2",
                             "--inference", "ray"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "shared cluster" in result.stderr
