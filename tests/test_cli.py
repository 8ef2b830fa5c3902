"""`granite-stream transcribe`: a real file through the session path, with caption files written."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def words(text):
    return re.sub(r"[^a-z ]", " ", text.lower()).split()


def test_transcribe_prints_finals_and_writes_captions(librivox_clips, tmp_path):
    clip = librivox_clips[0]
    result = subprocess.run(
        [sys.executable, "-m", "stream_server.cli", "transcribe", str(clip.audio_path), "--engine", "whisper",
         "--cpu-threads", "2", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reference = set(words(clip.text)) - {"mister"}
    printed = set(words(result.stdout))
    assert len(reference & printed) >= 0.8 * len(reference), result.stdout
    stem = clip.audio_path.stem
    srt = (tmp_path / f"{stem}.srt").read_text()
    vtt = (tmp_path / f"{stem}.vtt").read_text()
    txt = (tmp_path / f"{stem}.txt").read_text()
    assert srt.startswith("1\n00:00:0") and " --> " in srt
    assert vtt.startswith("WEBVTT\n") and "dashwood" in vtt.lower()
    assert "dashwood" in txt.lower()


def test_transcribe_reports_unreadable_files(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not audio at all")
    result = subprocess.run(
        [sys.executable, "-m", "stream_server.cli", "transcribe", str(bad), str(tmp_path / "missing.wav"),
         "--engine", "whisper", "--formats", ""],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "cannot decode" in result.stderr and "no such file" in result.stderr


def test_transcribe_rejects_unknown_caption_formats(librivox_clips):
    result = subprocess.run(
        [sys.executable, "-m", "stream_server.cli", "transcribe", str(librivox_clips[0].audio_path),
         "--engine", "whisper", "--formats", "txt,docx"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "docx" in result.stderr


# ---- serve --engine auto: which engine, and why, in the log and on /readyz ---------------------------


def _serve_auto(monkeypatch, capsys) -> tuple[dict, list[dict]]:
    """Run ``granite-stream serve --engine auto`` in this process until /readyz answers, then SIGTERM it.

    Returns /readyz's JSON (plus ``"routes"``: the server's WebSocket paths) and the JSON log lines. Device detection and Granite loading are faked by the
    callers at the seams auto-selection itself uses (``engines.cuda_available``, ``engines._granite``).
    """
    import json
    import logging
    import os
    import signal
    import threading
    import time
    import urllib.request

    import stream_server.server.app as server_module
    from stream_server.inference import memory
    from stream_server.cli import main

    servers = []

    class Recorded(server_module.StreamServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(server_module, "StreamServer", Recorded)
    monkeypatch.setattr(memory, "limit_arenas", lambda n: False)  # glibc state of this test process: left alone
    monkeypatch.setattr(memory, "fix_mmap_threshold", lambda n: False)
    ready: dict = {}
    returned = threading.Event()

    def probe() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not returned.is_set() and not (servers and servers[0].port):
            time.sleep(0.05)
        if returned.is_set() or not (servers and servers[0].port):
            return  # serve failed before listening: nothing to stop (main's error shows in the test)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{servers[0].port}/readyz", timeout=30) as response:
                ready.update(json.loads(response.read()), routes=sorted(servers[0].routes))
        finally:
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # the serve command's own shutdown path

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        status = main(["serve", "--engine", "auto", "--port", "0", "--cpu-threads", "2", "--log-format", "json"])
    finally:
        returned.set()
        signal.signal(signal.SIGTERM, lambda *_: None)  # a late SIGTERM from the prober must not end pytest
        prober.join(60)
        root.handlers[:] = handlers
        root.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)
    assert status == 0 and ready, "the server did not answer /readyz"
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return ready, logs


def _engine_line(logs: list[dict]) -> str:
    return next(entry["message"] for entry in logs if entry["message"].startswith("engine: "))


def test_auto_without_cuda_serves_bundled_whisper_and_says_why(monkeypatch, capsys):
    from stream_server import engines

    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    monkeypatch.setattr(engines, "_granite", lambda *a, **k: pytest.fail("auto tried Granite without CUDA"))
    ready, logs = _serve_auto(monkeypatch, capsys)
    reason = "auto: no CUDA GPU, so the bundled Whisper serves on the CPU"
    assert (ready["engine"]["name"], ready["engine"]["model"], ready["reason"]) == ("whisper", "tiny.en", reason)
    assert _engine_line(logs) == f"engine: whisper tiny.en — {reason}"
    # serve hands the protocol adapters' routes to the shell, which knows none of its own
    assert ready["routes"] == ["/deepgram/v1/listen", "/v1/listen", "/v1/realtime", "/v1/twilio"]


def test_auto_with_cuda_serves_granite_and_says_why(monkeypatch, capsys):
    import dataclasses

    from stream_server import engines
    from tests.fakes import CountingEngine

    asked = []

    def granite(model, device, max_batch, options=None):
        asked.append((model, device))
        engine = CountingEngine()
        engine.capabilities = dataclasses.replace(engine.capabilities, name="granite",
                                                  model=model or engines.DEFAULT_GRANITE_MODEL)
        return engine

    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setattr(engines, "_granite", granite)
    ready, logs = _serve_auto(monkeypatch, capsys)
    reason = "auto: a CUDA GPU is present and Granite weights loaded"
    assert asked == [(None, "cuda")]
    assert (ready["engine"]["name"], ready["reason"]) == ("granite", reason)
    assert _engine_line(logs) == f"engine: granite {engines.DEFAULT_GRANITE_MODEL} — {reason}"


def test_auto_falls_back_to_whisper_when_granite_cannot_load(monkeypatch, capsys):
    from stream_server import engines

    def granite(*args, **kwargs):
        raise OSError("ibm-granite/granite-4.0-1b-speech is not in the local cache")

    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setattr(engines, "_granite", granite)
    ready, logs = _serve_auto(monkeypatch, capsys)
    reason = ("auto: Granite failed to load (OSError: ibm-granite/granite-4.0-1b-speech is not in the local cache); "
              "bundled Whisper serves")
    assert (ready["engine"]["name"], ready["reason"]) == ("whisper", reason)
    assert _engine_line(logs) == f"engine: whisper tiny.en — {reason}"
    assert any(e["level"] == "WARNING" and "Granite could not be loaded" in e["message"] for e in logs)
