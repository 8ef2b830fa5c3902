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
