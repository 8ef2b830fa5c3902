"""Keeping resident memory flat: allocator settings and the server's periodic heap trim.

The glibc tests run in a fresh interpreter each (``probe``): arenas and the mmap threshold are
process-wide state that earlier tests' threads have already shaped. What they observe is glibc's
own account (``malloc_info``'s heaps, ``mallinfo2``'s mmapped blocks) and the kernel's (RSS).
"""

import asyncio
import ctypes.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stream_server.inference import memory
from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer
from stream_server.inference.memory import MemorySettings
from tests.fakes import CountingEngine
from tests.server.test_server import http_get

GLIBC = bool(ctypes.util.find_library("c")) and memory._libc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc only")

LIBC = textwrap.dedent("""
    import ctypes, json, os, re, sys, tempfile, threading
    from stream_server.inference import memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Mallinfo2

    def heaps():
        libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
        with tempfile.NamedTemporaryFile("r") as out:
            f = libc.fopen(out.name.encode(), b"w")
            libc.malloc_info(0, f)
            libc.fclose(f)
            return len(re.findall(r'<heap nr="[0-9]+">', out.read()))
""")


def probe(code: str) -> dict:
    """Run ``code`` (after the LIBC helpers) in a fresh interpreter; it prints one JSON object."""
    result = subprocess.run([sys.executable, "-c", LIBC + textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_glibc
@pytest.mark.parametrize("cap", [0, 1, 2, 4])
def test_arena_cap_bounds_the_heaps_of_concurrent_threads(cap):
    # Eight threads malloc at the same time; glibc gives each its own arena up to the cap.
    out = probe(f"""
        applied = memory.limit_arenas({cap})
        barrier = threading.Barrier(8)
        def work():
            block = libc.malloc(1000)
            barrier.wait()
            libc.free(block)
        threads = [threading.Thread(target=work) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(json.dumps({{"applied": applied, "heaps": heaps()}}))
    """)
    if cap:
        assert out == {"applied": True, "heaps": cap}
    else:  # 0 keeps glibc's default (up to 8 per core): here an arena per thread plus the main one
        assert out["applied"] is False and out["heaps"] > 4, out


@needs_glibc
@pytest.mark.parametrize("threshold_kb", [0, 256])
def test_fixed_mmap_threshold_keeps_large_buffers_out_of_the_heap(threshold_kb):
    # glibc raises its threshold to the size of a freed mmapped block (here 1 MiB), after which a 512 KiB
    # buffer comes from the heap; a fixed threshold keeps it in its own mapping, returned on free.
    out = probe(f"""
        applied = memory.fix_mmap_threshold({threshold_kb} * 1024)
        libc.free(libc.malloc(1 << 20))
        mapped = libc.mallinfo2().hblks
        block = libc.malloc(512 << 10)
        print(json.dumps({{"applied": applied, "mmapped": libc.mallinfo2().hblks - mapped}}))
    """)
    assert out == {"applied": bool(threshold_kb), "mmapped": 1 if threshold_kb else 0}


@needs_glibc
def test_trim_gives_freed_heap_pages_back_to_the_kernel():
    # 64 MiB of touched heap blocks, freed below a live block that pins the top of the heap: free()
    # alone cannot shrink the heap (and automatic trimming is off); trim() must release the pages.
    out = probe("""
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no trimming on free
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap
        blocks = [libc.malloc(1 << 20) for _ in range(64)]
        for block in blocks:
            libc.memset(block, 1, 1 << 20)
        pin = libc.malloc(64)
        before = memory.rss_bytes()
        for block in blocks:
            libc.free(block)
        freed = memory.rss_bytes()
        released = memory.trim()
        print(json.dumps({"before": before, "freed": freed, "after": memory.rss_bytes(), "released": released}))
    """)
    mib = 1 << 20
    assert out["released"] is True
    assert out["before"] - out["freed"] < 8 * mib, out  # free() kept the pages
    assert out["freed"] - out["after"] > 56 * mib, out  # trim() returned (nearly) all 64 MiB


def test_rss_is_what_the_kernel_reports():
    status = Path("/proc/self/status").read_text()
    vm_rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    assert memory.rss_bytes() == pytest.approx(vm_rss, rel=0.05)


def test_onednn_cache_bound_respects_the_environment(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    memory.limit_onednn_cache(16)
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    memory.limit_onednn_cache(16)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"  # an operator's choice wins


async def _supervisor_rounds(server, monkeypatch, rounds: int) -> None:
    """Wait (bounded) until the server's supervisor loop has run ``rounds`` more times."""
    seen = []
    ensure_alive = server.worker.ensure_alive
    monkeypatch.setattr(server.worker, "ensure_alive", lambda: (seen.append(1), ensure_alive())[1])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(seen) < rounds:
        assert loop.time() < deadline, "the supervisor loop stopped running"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("trim_s", [0.5, 0])
async def test_server_trims_the_heap_periodically_and_reports_resident_memory(monkeypatch, trim_s):
    trims = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(1) or True)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 123_456_789)
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0),
                                                             memory=MemorySettings(memory_trim_s=trim_s))) as server:
        await _supervisor_rounds(server, monkeypatch, 4)  # 4 rounds of 0.5 s: at least one trim is due
        _, _, body = await http_get(server.port, "/metrics")
    line = next(x for x in body.decode().splitlines() if x.startswith("granite_stream_resident_memory_bytes"))
    if trim_s:
        assert trims and float(line.split()[-1]) == 123_456_789  # sampled at the trim
    else:
        assert not trims and float(line.split()[-1]) == 0  # 0: never
