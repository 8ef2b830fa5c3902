"""Command line: ``granite-stream serve | transcribe | bench``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream_server.engines import load_engine
from stream_server.engines.granite.options import GraniteOptions
from stream_server.inference.types import SAMPLE_RATE
from stream_server.engines.base import Engine
from stream_server.core.events import Audio, AudioFormat, ConfigChange, Event, Start, Stop, VadChange
from stream_server.core.protocol import ProtocolLimits, StreamConfig
from stream_server.core.session import Session, SessionSettings
from stream_server.server.loopback import Loopback
from stream_server.server.logs import configure_logging
from stream_server.settings import (SETTINGS, ConfigError, ServeConfig, add_arguments, cli_values, load_config,
                                    load_config_and_sources, render, resolve_preset)
from stream_server.inference.worker import BatchScheduler, InferencePool, InferenceWorker, WorkerPool

if TYPE_CHECKING:
    from stream_server.server.app import ServerSettings

log = logging.getLogger("granite_stream")



TRANSCRIBE_SETTINGS = [s.key for s in SETTINGS if s.section in ("engine", "granite") and s.key not in ("gpus", "preset")
                       ] + ["max_batch", "log_level"]
"""The serve settings ``transcribe`` takes (as flags): one session on a local engine."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-stream", description="Real-time streaming speech recognition server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the WebSocket server (protocol v1 on /v1/listen, demo on /)",
        description="Settings come from defaults < TOML (--config) < GRANITE_STREAM_* environment < flags.",
    )
    add_arguments(serve)
    # Internal: set by --processes for its children, not a user setting (so not in the table).
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    tr = sub.add_parser("transcribe", help="stream audio files through the same session path and print finals")
    tr.add_argument("files", nargs="+", type=Path, help="audio files (anything ffmpeg/PyAV decodes: wav, mp3, flac…)")
    # The serve command's engine sections, batch bound and log level: flags only (no environment or TOML here).
    add_arguments(tr, TRANSCRIBE_SETTINGS, environment=False)
    tr.add_argument("--language", default="en", help="spoken language, or 'auto' where the engine detects it")
    tr.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    tr.add_argument("--target-language", default=None)
    tr.add_argument("--keywords", default="", help="comma-separated terms to bias towards")
    tr.add_argument("--speed", type=float, default=0.0,
                    help="feed audio at this multiple of real time (0: as fast as the engine goes)")
    tr.add_argument("--partials", action="store_true", help="also compute and print partial hypotheses")
    tr.add_argument("--silence-ms", type=int, default=500, help="silence that ends an utterance")
    tr.add_argument("--output-dir", type=Path, default=None, help="where to write captions (default: next to each file)")
    tr.add_argument("--formats", default="txt,srt,vtt", help="caption files to write: any of txt,srt,vtt; '' for none")
    tr.add_argument("--json", action="store_true", help="print every event as a JSON line instead of text")
    tr.add_argument("--diarize", action="store_true",
                    help="label speakers (one channel, several people): finals and captions say who spoke")

    bench = sub.add_parser("bench", help="benchmarks: see `granite-stream bench --help`", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from benchmarks.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            try:
                config, explicit = load_config_and_sources(cli_values(args), toml_path=args.config)
            except ConfigError as exc:
                print(f"granite-stream: {exc}", file=sys.stderr)
                return 2
            config, why = resolve_preset(config, explicit)
            if args.print_config:
                print(render(config, args.print_config_format, why))
                return 0
            configure_logging(config.logging.log_level, config.logging.log_format)
            log.info("settings: %s", why)
            if config.pool.processes > 1:
                return run_processes(config, argv[argv.index("serve") + 1 :])
            return asyncio.run(_serve(config, reuse_port=args.reuse_port))
        if args.command == "transcribe":
            try:
                config = load_config(cli_values(args), env={})
            except ConfigError as exc:
                print(f"granite-stream: {exc}", file=sys.stderr)
                return 2
            configure_logging(config.logging.log_level)
            return _transcribe(args, config)
    except KeyboardInterrupt:
        return 130
    return 2


def server_settings(config: ServeConfig, reuse_port: bool = False) -> "ServerSettings":
    """The server's settings object built from the merged configuration (``reuse_port``: see ``--processes``).

    Raises:
        OSError, ValueError: an unreadable API key file or a malformed key.
    """
    from stream_server.server.app import ServerSettings

    # The limits section's per-session bounds reach the sessions through ServerSettings, which
    # copies them into ``session``.
    session = SessionSettings(
        early_final_s=config.session.early_final_ms / 1000.0,
        refresh_waiting_partials=config.session.partial_refresh == "on",
        stable_agreement_s=config.session.stable_agreement_s, speakers=config.speakers,
    )
    return ServerSettings(
        network=config.network, limits=config.limits, security=config.security, memory=config.memory, session=session,
        logging=config.logging, worker=config.worker, access=config.security.access_policy(), reuse_port=reuse_port,
    )


def granite_options(config: ServeConfig) -> GraniteOptions:
    """The ``engine.granite`` section as the engine's options, with the ``worker`` section's batch bound
    (:meth:`~stream_server.settings.GraniteSettings.options`)."""
    return config.granite.options(config.worker.max_batch)


def load_configured_engine(config: ServeConfig, device: str | None = None) -> tuple[Engine, str]:
    """The engine the ``engine`` sections (and the batch bound) describe, on ``device`` if given."""
    engine = config.engine
    return load_engine(engine.name, engine.model or None, device or engine.device, engine.cpu_threads,
                       config.worker.max_batch, granite_options(config), preload_speakers=config.speakers.preload)


def build_workers(config: ServeConfig) -> tuple[list[InferenceWorker], str]:
    """One worker per GPU when ``gpus`` > 0 (each with its own engine), else one worker.

    Returns:
        The workers and why their engine serves.
    """
    def scheduler() -> BatchScheduler:
        return BatchScheduler.from_settings(config.worker)

    gpus = config.engine.gpus
    if gpus > 0:
        workers, reason = [], ""
        for index in range(gpus):
            engine, reason = load_configured_engine(config, f"cuda:{index}")
            workers.append(InferenceWorker(engine, scheduler()))
        return workers, f"{reason}; {gpus} GPU workers"
    engine, reason = load_configured_engine(config)
    return [InferenceWorker(engine, scheduler())], reason


async def _serve(config: ServeConfig, reuse_port: bool = False) -> int:
    from stream_server.adapters import ROUTES as ADAPTER_ROUTES
    from stream_server.inference import memory
    from stream_server.server.app import StreamServer

    # Before the engine and worker threads exist, so that they share the capped arenas. (oneDNN's
    # kernel cache is bounded by the Whisper engine itself, whose onednn_cache argument says how far.)
    memory.limit_arenas(config.memory.malloc_arenas)
    memory.fix_mmap_threshold(config.memory.malloc_mmap_threshold_kb * 1024)

    try:
        settings = server_settings(config, reuse_port)
    except (OSError, ValueError) as exc:
        print(f"granite-stream: {exc}", file=sys.stderr)
        return 2
    engine: Engine
    worker: InferencePool
    if config.pool.inference == "ray":
        from stream_server.inference.ray_pool import connect_pool
        from stream_server.settings import ray_pool_settings

        # Joins the cluster, deploys the pool if needed and waits for it (blocking: off the loop).
        pool = await asyncio.get_running_loop().run_in_executor(None, connect_pool, ray_pool_settings(config))
        worker, engine, reason = pool, pool.engine, pool.description
        log.info("engine: %s %s — %s", engine.capabilities.name, engine.capabilities.model, reason)
    else:
        workers, reason = build_workers(config)
        engine = workers[0].engine
        log.info("engine: %s %s — %s", engine.capabilities.name, engine.capabilities.model, reason)
        for local in workers:
            await asyncio.get_running_loop().run_in_executor(None, local.engine.warmup)
        worker = workers[0] if len(workers) == 1 else WorkerPool(workers)
    server = StreamServer(engine, settings, reason, worker=worker, routes=ADAPTER_ROUTES)  # OpenAI, Deepgram, Twilio
    await server.start()
    web = "https" if settings.security.cert_path else "http"
    print(f"granite-stream: serving {engine.capabilities.name} ({engine.capabilities.model}) on {server.url} "
          f"and {web}://{config.network.host}:{server.port}/", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing open sessions (deadline %.1f s)", config.limits.drain_deadline_s)
    left = await server.drain(config.limits.drain_deadline_s)
    log.info("stopped (%d session(s) cut off at the deadline)", left)
    return 0


def run_processes(config: ServeConfig, serve_argv: list[str]) -> int:
    """Run ``config.pool.processes`` server processes on one port and supervise them.

    Each child is this command again with ``--processes 1 --reuse-port``: its own event loop, GIL and
    engine, so that several GPUs (or CPU engines) are not funnelled through one Python process. With
    ``gpus`` > 1, child ``i`` sees only GPU ``i % gpus`` (``CUDA_VISIBLE_DEVICES``) and runs one
    worker on it. SIGTERM/SIGINT are passed on (each child drains as a single server does); a child
    that exits otherwise is restarted, unless it dies within 10 s of its start three times in a row.

    Returns:
        0 after a clean stop, 1 if a child kept failing, 2 for a configuration this mode cannot serve.
    """
    import os
    import subprocess
    import time

    if config.network.port == 0:
        print("granite-stream: --processes needs a fixed --port (the processes must bind the same one)",
              file=sys.stderr)
        return 2
    if config.pool.inference == "ray" and config.ray.address == "local":
        print("granite-stream: --processes with --inference ray needs a shared cluster (--ray-address auto or "
              "ray://…); with 'local' every process would start its own", file=sys.stderr)
        return 2
    stopping = False

    def spawn(index: int) -> tuple[subprocess.Popen, float]:
        env = dict(os.environ, GRANITE_STREAM_PROCESS_INDEX=str(index))
        extra = ["--processes", "1", "--reuse-port"]
        if config.engine.gpus > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(index % config.engine.gpus)
            extra += ["--gpus", "0"]
        cmd = [sys.executable, "-m", "stream_server.cli", "serve", *serve_argv, *extra]
        return subprocess.Popen(cmd, env=env), time.monotonic()

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child, _ in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    children = {i: spawn(i) for i in range(config.pool.processes)}
    quick_deaths = {i: 0 for i in children}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    log.info("supervising %d server processes on port %d", config.pool.processes, config.network.port)
    failed = False
    while children:
        time.sleep(0.2)
        for index, (child, started) in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            if stopping:
                del children[index]
                continue
            quick_deaths[index] = quick_deaths[index] + 1 if time.monotonic() - started < 10.0 else 0
            if quick_deaths[index] >= 3:
                log.error("server process %d keeps exiting (code %s); stopping all", index, code)
                failed = True
                forward(signal.SIGTERM, None)
                del children[index]
                continue
            log.error("server process %d exited with code %s; restarting it", index, code)
            children[index] = spawn(index)
    return 1 if failed else 0


def load_audio(path: Path) -> np.ndarray:
    """Decode any audio file to mono float32 at 16 kHz (PyAV, shipped with faster-whisper).

    Raises:
        FileNotFoundError, ValueError: unreadable file.
    """
    from faster_whisper.audio import decode_audio

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return decode_audio(str(path), sampling_rate=SAMPLE_RATE).astype(np.float32)
    except Exception as exc:  # PyAV raises many types for undecodable input
        raise ValueError(f"cannot decode {path}: {exc}") from exc


def stream_audio(
    loopback: Loopback,
    audio: np.ndarray,
    start: Start,
    speed: float = 0.0,
    chunk_s: float = 0.1,
    on_event=None,
) -> list[dict]:
    """Stream 16 kHz float audio through a session as a client would, and collect its events.

    The session and the engine run in one thread through a :class:`Loopback` (each inference request
    is decoded as soon as the frame that asked for it is handled); the decisions are the session's,
    on the audio clock, as in the server.

    Args:
        loopback: a fresh session joined to the engine.
        audio: mono float32 at 16 kHz.
        start: the ``start`` command (its ``audio`` is replaced here by the float samples fed).
        speed: multiple of real time to feed at (at most); 0 feeds as fast as the engine keeps up.
        chunk_s: seconds of audio per frame.
        on_event: called with each event (in its wire form) as it is produced.

    Returns:
        Every event the session sent, in order, in its wire form (what ``--json`` prints).
    """
    events: list[dict] = []

    def take(new: list[Event]) -> None:
        for event in new:
            events.append(event.to_wire())  # what leaves for the user: printed as JSON, written as captions
            if on_event is not None:
                on_event(events[-1])

    take(loopback.send(replace(start, audio=AudioFormat("pcm_f32le", SAMPLE_RATE, 1))))
    step = int(chunk_s * SAMPLE_RATE)
    began = time.monotonic()
    for offset in range(0, len(audio), step):
        take(loopback.send(Audio(audio[offset : offset + step].astype("<f4").tobytes())))
        if speed > 0:
            time.sleep(max(0.0, began + (offset + step) / SAMPLE_RATE / speed - time.monotonic()))
    take(loopback.send(Stop()))
    return events


def _transcribe(args, config: ServeConfig) -> int:
    from tqdm import tqdm

    from stream_server.core import captions

    formats = [f for f in args.formats.split(",") if f]
    unknown = set(formats) - {"txt", "srt", "vtt"}
    if unknown:
        print(f"granite-stream: unknown caption format(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    engine, reason = load_configured_engine(config)
    log.info("engine: %s %s — %s", engine.capabilities.name, engine.capabilities.model, reason)
    # As serve does: compiles and captures (Granite's word aligner, its graphs) happen here, not
    # inside the first final.
    engine.warmup()
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    start = Start(options=ConfigChange(
        task=args.task, language=None if args.language == "auto" else args.language,
        target_language=args.target_language, keywords=tuple(keywords), partials=bool(args.partials),
        vad=VadChange(silence_ms=args.silence_ms), diarize=True if args.diarize else None,
    ))
    settings = SessionSettings(default_config=StreamConfig(), limits=ProtocolLimits())
    status = 0
    try:
        for path in args.files:
            try:
                audio = load_audio(path)
            except (FileNotFoundError, ValueError) as exc:
                print(f"granite-stream: {exc}", file=sys.stderr)
                status = 1
                continue
            bar = tqdm(total=round(len(audio) / SAMPLE_RATE, 1), unit="s", desc=path.name, disable=None, leave=False)

            def show(event: dict) -> None:
                if event["type"] in ("partial", "final") and not bar.disable:
                    bar.update(max(0.0, round(event["end"] - bar.n, 1)))
                if args.json:
                    print(json.dumps(event, ensure_ascii=False), flush=True)
                elif event["type"] == "final" and event["text"]:
                    who = f"{captions.speaker_name(event['speaker'])}: " if "speaker" in event else ""
                    tqdm.write(f"[{event['start']:7.2f} → {event['end']:7.2f}] {who}{event['text']}")
                elif event["type"] == "partial":
                    tqdm.write(f"  … {event['text']}", file=sys.stderr)
                elif event["type"] == "error":
                    tqdm.write(f"error ({event['code']}): {event['message']}", file=sys.stderr)

            session = Session(uuid.uuid4().hex[:12], engine.capabilities, settings)
            loopback = Loopback(session, engine, config.worker.max_batch)
            events = stream_audio(loopback, audio, start, speed=args.speed, on_event=show)
            bar.close()
            if any(e["type"] == "error" and e.get("fatal") or e.get("code") == "bad_config" for e in events):
                status = 1
                continue
            finals = [e for e in events if e["type"] == "final"]
            out_dir = args.output_dir or path.parent
            out_dir.mkdir(parents=True, exist_ok=True)
            writers = {"txt": captions.to_text, "srt": captions.to_srt, "vtt": captions.to_vtt}
            for fmt in formats:
                (out_dir / f"{path.stem}.{fmt}").write_text(writers[fmt](finals), encoding="utf-8")
    finally:
        engine.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
