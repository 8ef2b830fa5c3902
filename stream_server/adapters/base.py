"""What every protocol adapter shares: the translator outputs and helpers for foreign formats.

An adapter is a **translator** (sans-I/O, one per connection; the interface is
:class:`~stream_server.server.connection.Translator`): it turns the foreign client's frames into inputs for
one or more native sessions (typed commands, :mod:`stream_server.core.events`, and audio bytes), and
the sessions' typed events into the foreign server's messages (matched on their classes). It never touches a socket, a thread or a clock,
so it is tested by calling its methods directly. The connection itself (limits, idle timeout,
throttling, outbox, metrics, drain) is run by the one shell every route shares,
:func:`~stream_server.server.connection.serve_connection`.
"""

from __future__ import annotations

import base64
import binascii
import struct
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np

from stream_server.server.connection import Hangup, OpenStream, Out, Reply, StreamAudio, StreamCommand, Translator

__all__ = [
    "ALAW_TABLE", "Hangup", "OpenStream", "Out", "Reply", "StreamAudio", "StreamCommand", "Translator", "WavHeader",
    "alaw_to_pcm16", "audio_chunks", "decode_base64", "new_id", "parse_wav_header", "query_params",
]


def audio_chunks(key: str, data: bytes, max_bytes: int, sample_bytes: int = 1) -> list[StreamAudio]:
    """``data`` cut into frames the native session accepts (at most ``max_bytes``, whole samples)."""
    step = max(sample_bytes, max_bytes - max_bytes % sample_bytes)
    return [StreamAudio(key, data[i : i + step]) for i in range(0, len(data), step)]


# ---- helpers for translators ----------------------------------------------------------------------


def new_id(prefix: str, length: int = 24) -> str:
    """A random id in the style ``prefix`` + hex (``event_1f3a…``)."""
    return prefix + uuid.uuid4().hex[:length]


def decode_base64(value: object) -> bytes | None:
    """Strict base64 (the standard alphabet, padding checked); ``None`` when ``value`` is not valid."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def query_params(path: str) -> dict[str, list[str]]:
    """The query string of a request path (``ws.request.path``), every value kept."""
    return parse_qs(urlsplit(path).query, keep_blank_values=True)


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law expansion of all 256 byte values to 16-bit linear PCM."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign != 0, magnitude, -magnitude).astype("<i2")


ALAW_TABLE = _alaw_table()


def alaw_to_pcm16(data: bytes) -> bytes:
    """G.711 A-law bytes → 16-bit little-endian PCM (protocol v1 has no A-law encoding)."""
    return ALAW_TABLE[np.frombuffer(data, np.uint8)].tobytes()


@dataclass(frozen=True)
class WavHeader:
    encoding: str  # a protocol v1 encoding, or "alaw"
    sample_rate: int
    channels: int
    data_offset: int


def parse_wav_header(data: bytes) -> WavHeader | str:
    """The format of a RIFF/WAVE stream whose header is at the start of ``data``, or why it is unusable."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return "not a RIFF/WAVE stream"
    offset, fmt = 12, b""
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = data[body : body + size]
        elif chunk_id == b"data":
            if len(fmt) < 16:
                return "WAV data chunk without a complete fmt chunk before it"
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
            if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID names the format
                tag = struct.unpack("<H", fmt[24:26])[0]
            encoding = {(1, 16): "pcm_s16le", (3, 32): "pcm_f32le", (7, 8): "mulaw", (6, 8): "alaw"}.get((tag, bits))
            if encoding is None:
                return f"unsupported WAV format (format tag {tag}, {bits} bits per sample)"
            if not 1 <= channels <= 8:
                return f"unsupported WAV channel count {channels}"
            return WavHeader(encoding, rate, channels, body)
        offset = body + size + (size & 1)
    return "the WAV header is incomplete in the first audio frame"
