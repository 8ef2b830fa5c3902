"""Caption files from final events: plain text, SubRip (.srt) and WebVTT (.vtt)."""

from __future__ import annotations

from typing import Iterable


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(finals: Iterable[dict]) -> list[dict]:
    return [f for f in finals if f.get("text", "").strip()]


def to_text(finals: Iterable[dict]) -> str:
    """One line per non-empty final."""
    return "".join(f"{f['text'].strip()}\n" for f in _cues(finals))


def to_srt(finals: Iterable[dict]) -> str:
    """SubRip captions, one cue per non-empty final, numbered from 1."""
    blocks = []
    for index, f in enumerate(_cues(finals), start=1):
        blocks.append(
            f"{index}\n{_timestamp(f['start'], ',')} --> {_timestamp(f['end'], ',')}\n{f['text'].strip()}\n"
        )
    return "\n".join(blocks)


def to_vtt(finals: Iterable[dict]) -> str:
    """WebVTT captions, one cue per non-empty final."""
    blocks = ["WEBVTT\n"]
    for f in _cues(finals):
        blocks.append(f"{_timestamp(f['start'], '.')} --> {_timestamp(f['end'], '.')}\n{f['text'].strip()}\n")
    return "\n".join(blocks)
