"""Keeping resident memory flat: allocator settings and the server's periodic heap trim."""

import asyncio
import ctypes.util

import pytest

from stream_server import memory
from stream_server.server import ServerSettings, StreamServer
from tests.fakes import CountingEngine
from tests.test_server import http_get

GLIBC = bool(ctypes.util.find_library("c")) and memory._libc() is not None


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_arena_cap_and_trim_talk_to_glibc():
    assert memory.limit_arenas(2) is True
    assert memory.limit_arenas(0) is False  # 0 keeps glibc's default
    assert memory.fix_mmap_threshold(256 * 1024) is True
    assert memory.fix_mmap_threshold(0) is False
    big = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB, then freed: something to give back
    del big
    assert isinstance(memory.trim(), bool)
    assert memory.rss_bytes() > 10 << 20


def test_onednn_cache_bound_respects_the_environment(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    memory.limit_onednn_cache(16)
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    memory.limit_onednn_cache(16)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"  # an operator's choice wins


async def test_server_trims_the_heap_and_reports_resident_memory():
    async with StreamServer(CountingEngine(), ServerSettings(port=0, memory_trim_s=0.5)) as server:
        await asyncio.sleep(1.5)
        _, _, body = await http_get(server.port, "/metrics")
    line = next(x for x in body.decode().splitlines() if x.startswith("granite_stream_resident_memory_bytes"))
    assert float(line.split()[-1]) > 10 << 20
