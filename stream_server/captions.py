"""Caption files from final events: plain text, SubRip (.srt) and WebVTT (.vtt).

A final with a ``speaker`` (sessions with ``diarize``) is attributed in the caption: WebVTT's voice
span ``<v Speaker 1>`` (speakers are numbered from 1 for people; the protocol counts from 0), a
``Speaker 1: `` prefix in SubRip and plain text. ``web_demo/captions.js`` writes the same bytes.
"""

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


def speaker_name(speaker: int) -> str:
    """How captions name protocol speaker ``speaker`` (0-based): ``Speaker 1`` for 0."""
    return f"Speaker {int(speaker) + 1}"


def _prefixed(f: dict) -> str:
    text = f["text"].strip()
    return f"{speaker_name(f['speaker'])}: {text}" if f.get("speaker") is not None else text


def _voiced(f: dict) -> str:
    # A cue's text may not contain "-->"; a voice name may not contain ">" (neither can occur here).
    text = f["text"].strip()
    return f"<v {speaker_name(f['speaker'])}>{text}" if f.get("speaker") is not None else text


def to_text(finals: Iterable[dict]) -> str:
    """One line per non-empty final, ``Speaker N: `` first when it has a speaker."""
    return "".join(f"{_prefixed(f)}\n" for f in _cues(finals))


def to_srt(finals: Iterable[dict]) -> str:
    """SubRip captions, one cue per non-empty final, numbered from 1 (``Speaker N: `` first when it has a speaker)."""
    blocks = []
    for index, f in enumerate(_cues(finals), start=1):
        blocks.append(
            f"{index}\n{_timestamp(f['start'], ',')} --> {_timestamp(f['end'], ',')}\n{_prefixed(f)}\n"
        )
    return "\n".join(blocks)


def to_vtt(finals: Iterable[dict]) -> str:
    """WebVTT captions, one cue per non-empty final, in a ``<v Speaker N>`` voice span when it has a speaker."""
    blocks = ["WEBVTT\n"]
    for f in _cues(finals):
        blocks.append(f"{_timestamp(f['start'], '.')} --> {_timestamp(f['end'], '.')}\n{_voiced(f)}\n")
    return "\n".join(blocks)
