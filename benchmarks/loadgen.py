"""Load generator: N concurrent WebSocket clients replaying real speech at real-time pace.

Each client ("stream") plays a :class:`StreamPlan`: clips of real speech separated by natural
pauses (digital silence, 1–2 s by default), laid out on the stream's audio clock before anything
is sent. Frames of ``frame_ms`` are sent when the audio they hold would have been captured
(``speed`` × real time), and the wall clock of every send is recorded, so the time at which any
point of the stream's audio left the client is known exactly. Every message received is logged
with its arrival time. Scoring (latency, lag, revisions, WER) happens afterwards in
:mod:`benchmarks.scoring` from these logs; the clients do no analysis while streaming.

Protocols (adapters):

* ``granite`` — granite-stream wire protocol v1: ``start`` (``pcm_s16le`` at the clip's native
  rate, or a resampled rate), binary frames, ``stop``; waits for ``end``.
* ``whisperlive`` — WhisperLive 0.10.0: a JSON options message, float32 16 kHz binary frames,
  ``END_OF_AUDIO``. WhisperLive does not finish an open segment on ``END_OF_AUDIO`` (its
  server closes the socket), so after the plan's audio the client keeps streaming silence, as
  a live microphone would, until a completed segment covers the last clip or ``drain_s``
  passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from granite_stream_testing.datasets import Clip, read_audio

log = logging.getLogger(__name__)

PROTOCOLS = ("granite", "whisperlive")


@dataclass
class PlannedClip:
    """A clip placed on a stream's audio clock (seconds, sample-exact at the send rate)."""

    clip: Clip
    start: float
    end: float


@dataclass
class StreamPlan:
    """What one client sends: the whole stream's audio at ``sample_rate`` and where the clips are."""

    index: int
    sample_rate: int
    audio: np.ndarray
    clips: list[PlannedClip]
    language: str
    start_delay: float = 0.0  # seconds after the level starts before this client connects

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def speech_seconds(self) -> float:
        return sum(c.end - c.start for c in self.clips)


@dataclass
class StreamLog:
    """What happened on one connection."""

    plan: StreamPlan
    protocol: str
    frame_end_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    frame_sent_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    messages: list[tuple[float, dict]] = field(default_factory=list)
    connected_at: float | None = None
    started_at: float | None = None  # first frame sent
    finished_at: float | None = None
    error: str | None = None
    ready: dict | None = None

    def sent_at(self, t_audio: float) -> float:
        """Wall clock (``time.perf_counter``) at which the audio up to ``t_audio`` seconds had been sent."""
        if len(self.frame_end_samples) == 0:
            return float("nan")
        target = t_audio * self.plan.sample_rate
        i = int(np.searchsorted(self.frame_end_samples, target - 1e-6, side="left"))
        i = min(i, len(self.frame_sent_at) - 1)
        return float(self.frame_sent_at[i])


def save_logs(logs: Sequence[StreamLog], path) -> None:
    """Write what the clients saw (plans without audio, send times, messages) as gzipped JSON."""
    import gzip

    data = []
    for slog in logs:
        data.append({
            "protocol": slog.protocol, "error": slog.error,
            "plan": {"index": slog.plan.index, "sample_rate": slog.plan.sample_rate, "language": slog.plan.language,
                     "samples": len(slog.plan.audio), "start_delay": slog.plan.start_delay,
                     "clips": [{"id": c.clip.id, "audio_path": str(c.clip.audio_path), "text": c.clip.text,
                                "language": c.clip.language, "sample_rate": c.clip.sample_rate, "set": c.clip.set,
                                "start": c.start, "end": c.end} for c in slog.plan.clips]},
            "frame_end_samples": slog.frame_end_samples.tolist(), "frame_sent_at": slog.frame_sent_at.tolist(),
            "messages": slog.messages,
        })
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)


def load_logs(path) -> list[StreamLog]:
    """Inverse of :func:`save_logs` (audio is not kept: ``plan.audio`` is silence of the right length)."""
    import gzip
    from pathlib import Path

    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    logs = []
    for d in data:
        p = d["plan"]
        clips = [PlannedClip(Clip(c["id"], Path(c["audio_path"]), c["text"], c["language"], c["sample_rate"], c["set"]),
                             c["start"], c["end"]) for c in p["clips"]]
        plan = StreamPlan(p["index"], p["sample_rate"], np.zeros(p["samples"], np.float32), clips, p["language"],
                          p["start_delay"])
        slog = StreamLog(plan, d["protocol"], np.asarray(d["frame_end_samples"], np.int64),
                         np.asarray(d["frame_sent_at"]), [tuple(m) for m in d["messages"]], error=d["error"])
        logs.append(slog)
    return logs


# ---- planning -----------------------------------------------------------------------------------


_AUDIO_CACHE: dict[tuple[str, int], np.ndarray] = {}


def clip_audio(clip: Clip, rate: int) -> np.ndarray:
    """The clip's samples at ``rate`` (float32 mono), cached per process."""
    key = (str(clip.audio_path), rate)
    if key not in _AUDIO_CACHE:
        audio, native = read_audio(clip)
        if native != rate:
            import soxr

            audio = soxr.resample(audio, native, rate, quality="HQ").astype(np.float32)
        _AUDIO_CACHE[key] = np.ascontiguousarray(audio, dtype=np.float32)
    return _AUDIO_CACHE[key]


def build_plan(
    index: int,
    clips: Sequence[Clip],
    sample_rate: int | None,
    pause_range: tuple[float, float] = (1.0, 2.0),
    rng: random.Random | None = None,
    lead_in: float = 0.5,
    start_delay: float = 0.0,
) -> StreamPlan:
    """Lay clips out on one stream: ``lead_in`` silence, clip, pause, clip, …, pause.

    Args:
        sample_rate: send rate; ``None`` sends at the clips' native rate (they must share one,
            otherwise 16 kHz is used).
        pause_range: each pause (and the trailing one) is drawn uniformly from this range.
    """
    if not clips:
        raise ValueError("a stream needs at least one clip")
    rng = rng or random.Random(index)
    if sample_rate is None:
        rates = {c.sample_rate for c in clips}
        sample_rate = rates.pop() if len(rates) == 1 else 16_000
    pieces: list[np.ndarray] = [np.zeros(int(round(lead_in * sample_rate)), np.float32)]
    position = len(pieces[0])
    placed: list[PlannedClip] = []
    for clip in clips:
        audio = clip_audio(clip, sample_rate)
        placed.append(PlannedClip(clip, position / sample_rate, (position + len(audio)) / sample_rate))
        pieces.append(audio)
        position += len(audio)
        pause = np.zeros(int(round(rng.uniform(*pause_range) * sample_rate)), np.float32)
        pieces.append(pause)
        position += len(pause)
    language = clips[0].language
    return StreamPlan(index, sample_rate, np.concatenate(pieces), placed, language, start_delay)


def plan_split(
    clips: Sequence[Clip], n_streams: int, sample_rate: int | None, pause_range=(1.0, 2.0), seed: int = 0,
    stagger: float = 2.0,
) -> list[StreamPlan]:
    """Every clip exactly once, dealt round-robin over ``n_streams`` streams (accuracy passes)."""
    n_streams = max(1, min(n_streams, len(clips)))
    plans = []
    for i in range(n_streams):
        mine = list(clips[i::n_streams])
        rng = random.Random(seed * 1000 + i)
        plans.append(build_plan(i, mine, sample_rate, pause_range, rng, start_delay=stagger * i / n_streams))
    return plans


def plan_budget(
    clips: Sequence[Clip], n_streams: int, seconds: float, sample_rate: int | None, pause_range=(1.0, 2.0),
    seed: int = 0, stagger: float = 2.0,
) -> list[StreamPlan]:
    """Capacity levels: stream ``i`` starts at position ``i·len/n`` of the clip list and takes clips
    in order (wrapping) until it holds at least ``seconds`` of speech, so concurrent streams play
    different clips and together cover the set evenly."""
    from granite_stream_testing.datasets import audio_duration

    durations = [audio_duration(c) for c in clips]
    plans = []
    for i in range(n_streams):
        offset = (i * len(clips)) // n_streams
        mine: list[Clip] = []
        total = 0.0
        k = 0
        while total < seconds and k < 10 * len(clips):
            j = (offset + k) % len(clips)
            mine.append(clips[j])
            total += durations[j]
            k += 1
        rng = random.Random(seed * 1000 + i)
        plans.append(build_plan(i, mine, sample_rate, pause_range, rng, start_delay=stagger * i / n_streams))
    return plans


# ---- clients ------------------------------------------------------------------------------------


async def _connect(url: str):
    from websockets.asyncio.client import connect

    # No permessage-deflate: PCM does not compress and deflate costs CPU on both ends.
    return await connect(url, compression=None, max_size=None, ping_interval=None, open_timeout=60,
                         close_timeout=10)


def _frames(plan: StreamPlan, frame_ms: float) -> list[tuple[int, int]]:
    step = max(1, int(round(plan.sample_rate * frame_ms / 1000.0)))
    n = len(plan.audio)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


async def _pace(began: float, audio_seconds: float, speed: float) -> None:
    if speed <= 0:
        await asyncio.sleep(0)
        return
    delay = began + audio_seconds / speed - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_granite_stream(
    url: str, plan: StreamPlan, speed: float = 1.0, frame_ms: float = 40.0, partials: bool = True,
    timeout: float = 120.0, extra_start: dict | None = None,
) -> StreamLog:
    """One protocol-v1 client: ``start``, paced ``pcm_s16le`` frames, ``stop``; waits for ``end``."""
    slog = StreamLog(plan, "granite")
    if plan.start_delay:
        await asyncio.sleep(plan.start_delay)
    try:
        ws = await _connect(url)
    except Exception as exc:  # noqa: BLE001 - refused/unreachable: record and go on
        slog.error = f"connect: {type(exc).__name__}: {exc}"
        return slog
    slog.connected_at = time.perf_counter()
    start = {"type": "start", "audio": {"encoding": "pcm_s16le", "sample_rate": plan.sample_rate, "channels": 1},
             "language": plan.language, "partials": partials, **(extra_start or {})}
    pcm = (np.clip(plan.audio, -1.0, 32767 / 32768) * 32768.0).astype("<i2")
    frames = _frames(plan, frame_ms)
    ends: list[int] = []
    sent: list[float] = []
    done = asyncio.Event()

    async def receiver() -> None:
        try:
            async for event in _logged_events(ws, slog):
                if event.get("type") == "ready":
                    slog.ready = event
                    done.set()
                elif event.get("type") == "error" and event.get("fatal"):
                    slog.error = f"server error {event.get('code')}: {event.get('message')}"
                    done.set()
                elif event.get("type") == "end":
                    return
        except Exception as exc:  # noqa: BLE001
            if slog.error is None:
                slog.error = f"receive: {type(exc).__name__}: {exc}"
        finally:
            done.set()

    rx = asyncio.create_task(receiver())
    try:
        began = await _start_and_play(ws, slog, json.dumps(start), done, 60, "no ready event", frames,
                                      lambda a, b: pcm[a:b].tobytes(), plan, speed, ends, sent)
        if began is None:
            return slog
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rx, timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        slog.error = slog.error or f"{type(exc).__name__}: {exc}"
    finally:
        slog.frame_end_samples, slog.frame_sent_at = np.asarray(ends, np.int64), np.asarray(sent)
        slog.finished_at = time.perf_counter()
        rx.cancel()
        await ws.close()
    return slog


async def _logged_events(ws, slog):
    """The server's JSON messages (binary ones skipped), each logged in ``slog`` with its arrival time."""
    async for message in ws:
        if isinstance(message, bytes):
            continue
        now = time.perf_counter()
        event = json.loads(message)
        slog.messages.append((now, event))
        yield event


async def _start_and_play(ws, slog, start: str, ready: asyncio.Event, ready_timeout: float, no_ready: str,
                          frames, payload, plan, speed: float, ends: list[int], sent: list[float]) -> float | None:
    """Send the protocol's start message, wait for the server's ready, then send every frame at the
    wall-clock moment its audio would have been captured, logging each frame's end sample and send time.

    Args:
        start: the start message (JSON text); ``ready`` is set by the caller's receiver on the server's
            ready message (``slog.ready`` then holds it) or on a failure (``slog.error``).
        frames: ``(first, end)`` sample ranges; ``payload(first, end)`` gives each frame's bytes.
        ends, sent: appended to as frames go out.

    Returns:
        The wall-clock moment (``perf_counter``) the audio began, or ``None`` when the server never
        became ready (``slog.error`` says why).
    """
    await ws.send(start)
    await asyncio.wait_for(ready.wait(), timeout=ready_timeout)
    if slog.ready is None:
        slog.error = slog.error or no_ready
        return None
    began = time.perf_counter()
    slog.started_at = began
    for a, b in frames:
        await _pace(began, b / plan.sample_rate, speed)
        await ws.send(payload(a, b))
        ends.append(b)
        sent.append(time.perf_counter())
    return began


WHISPERLIVE_DEFAULTS = {
    "task": "transcribe",
    "use_vad": True,
    "send_last_n_segments": 10,
    "no_speech_thresh": 0.45,
    "clip_audio": False,
    "same_output_threshold": 10,
}
"""The options WhisperLive's own ``Client`` sends by default (whisper_live/client.py)."""


async def run_whisperlive_stream(
    url: str, plan: StreamPlan, model: str, speed: float = 1.0, frame_ms: float = 40.0,
    drain_s: float = 15.0, timeout: float = 30.0, options: dict | None = None,
) -> StreamLog:
    """One WhisperLive client (see the module doc). ``plan`` must be at 16 kHz."""
    if plan.sample_rate != 16_000:
        raise ValueError("WhisperLive takes 16 kHz float32 audio; plan the stream at 16 kHz")
    slog = StreamLog(plan, "whisperlive")
    if plan.start_delay:
        await asyncio.sleep(plan.start_delay)
    try:
        ws = await _connect(url)
    except Exception as exc:  # noqa: BLE001
        slog.error = f"connect: {type(exc).__name__}: {exc}"
        return slog
    slog.connected_at = time.perf_counter()
    uid = uuid.uuid4().hex
    config = {"uid": uid, "language": plan.language, "model": model, **WHISPERLIVE_DEFAULTS, **(options or {})}
    audio = plan.audio.astype("<f4")
    frames = _frames(plan, frame_ms)
    step = frames[0][1] - frames[0][0]
    ends: list[int] = []
    sent: list[float] = []
    ready = asyncio.Event()
    last_clip_end = plan.clips[-1].end
    covered = asyncio.Event()  # a completed segment reaches into the last clip's end

    async def receiver() -> None:
        try:
            async for event in _logged_events(ws, slog):
                if event.get("message") == "SERVER_READY":
                    slog.ready = event
                    ready.set()
                elif event.get("status") in ("WAIT", "ERROR"):
                    slog.error = f"server {event['status']}: {event.get('message')}"
                    ready.set()
                for seg in event.get("segments") or ():
                    if seg.get("completed") and float(seg["end"]) >= last_clip_end - 0.5:
                        covered.set()
        except Exception as exc:  # noqa: BLE001 - the server closes abruptly after END_OF_AUDIO
            log.debug("whisperlive receive ended: %s", exc)
        finally:
            ready.set()

    rx = asyncio.create_task(receiver())
    try:
        began = await _start_and_play(ws, slog, json.dumps(config), ready, 120, "no SERVER_READY", frames,
                                      lambda a, b: audio[a:b].tobytes(), plan, speed, ends, sent)
        if began is None:
            return slog
        # Drain: keep the "microphone" open with silence until the last clip is committed.
        silence = np.zeros(step, "<f4").tobytes()
        position = len(audio)
        drain_until = time.perf_counter() + drain_s
        while not covered.is_set() and time.perf_counter() < drain_until and not rx.done():
            position += step
            await _pace(began, position / plan.sample_rate, speed)
            await ws.send(silence)
        await ws.send(b"END_OF_AUDIO")
        try:
            await asyncio.wait_for(rx, timeout=timeout)
        except asyncio.TimeoutError:
            pass
    except Exception as exc:  # noqa: BLE001
        slog.error = slog.error or f"{type(exc).__name__}: {exc}"
    finally:
        slog.frame_end_samples = np.asarray(ends, np.int64)
        slog.frame_sent_at = np.asarray(sent)
        slog.finished_at = time.perf_counter()
        rx.cancel()
        await ws.close()
    return slog


async def run_streams(
    url: str, plans: Sequence[StreamPlan], protocol: str = "granite", speed: float = 1.0, frame_ms: float = 40.0,
    **kwargs,
) -> list[StreamLog]:
    """Run every plan concurrently on this event loop; returns one log per plan, in order."""
    if protocol == "granite":
        coros = [run_granite_stream(url, p, speed, frame_ms, **kwargs) for p in plans]
    elif protocol == "whisperlive":
        coros = [run_whisperlive_stream(url, p, speed=speed, frame_ms=frame_ms, **kwargs) for p in plans]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    return list(await asyncio.gather(*coros))
