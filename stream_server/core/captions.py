"""Caption files from final events: plain text, SubRip (.srt) and WebVTT (.vtt).

Subtitles follow broadcast conventions: a final longer than one cue is split at word boundaries
into cues of at most ``MAX_LINES`` lines of ``MAX_LINE_CHARS`` characters and ``MAX_CUE_S`` seconds
(a single word longer than a line keeps a line of its own). A cue's times come from its words'
(``final.words``) where the final has them, else from the final's span shared out in proportion to
the characters. Plain text stays one line per final.

A final with a ``speaker`` (sessions with ``diarize``) is attributed in the caption: WebVTT's voice
span ``<v Speaker 1>`` (speakers are numbered from 1 for people; the protocol counts from 0), a
``Speaker 1: `` prefix in SubRip and plain text (counted in the first line's length). Words with
their own ``speaker`` start a new cue where the speaker changes. ``web_demo/captions.js`` writes
the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

MAX_LINE_CHARS = 42
MAX_LINES = 2
MAX_CUE_S = 7.0


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, math.floor(seconds * 1000 + 0.5))  # halves up, as JavaScript's Math.round
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


def to_text(finals: Iterable[dict]) -> str:
    """One line per non-empty final, ``Speaker N: `` first when it has a speaker."""
    return "".join(f"{_prefixed(f)}\n" for f in _cues(finals))


@dataclass(frozen=True)
class Cue:
    """One subtitle: its lines (without speaker attribution) and times."""

    start: float
    end: float
    lines: tuple[str, ...]
    speaker: int | None = None


def _timed_words(final: dict) -> list[tuple[str, float, float, int | None]]:
    """``(word, start, end, speaker)`` for each word of a final: its own times where it has words, else
    the final's span shared out in proportion to the characters (a space counts as one)."""
    speaker = final.get("speaker")
    words = final.get("words")
    if words:
        return [(w["word"], w["start"], w["end"], speaker if w.get("speaker") is None else w["speaker"]) for w in words]
    tokens = final["text"].split()
    total = sum(len(t) + 1 for t in tokens)
    out, at = [], final["start"]
    for token in tokens:
        span = (final["end"] - final["start"]) * (len(token) + 1) / total
        out.append((token, at, at + span, speaker))
        at += span
    return out


def split_cues(final: dict) -> list[Cue]:
    """A final's cues: words filled greedily into lines of at most ``MAX_LINE_CHARS`` characters (the
    speaker prefix counted in the first line), at most ``MAX_LINES`` lines and ``MAX_CUE_S`` seconds
    a cue; a change of the words' speaker starts a new cue."""
    cues: list[Cue] = []
    lines: list[str] = []
    start = end = 0.0
    speaker: int | None = None

    def close() -> None:
        if lines:
            cues.append(Cue(start, end, tuple(lines), speaker))

    for word, word_start, word_end, word_speaker in _timed_words(final):
        if lines and (word_speaker != speaker or word_end - start > MAX_CUE_S):
            close()
            lines = []
        if lines:
            prefix = len(speaker_name(speaker)) + 2 if speaker is not None and len(lines) == 1 else 0
            if len(lines[-1]) + 1 + len(word) <= MAX_LINE_CHARS - prefix:
                lines[-1] += " " + word
            elif len(lines) < MAX_LINES:
                lines.append(word)
            else:
                close()
                lines = []
        if not lines:  # a new cue
            lines, start, end, speaker = [word], word_start, word_end, word_speaker
        end = max(end, word_end)
    close()
    return cues


def _cue_text(cue: Cue, voice: bool) -> str:
    # A cue's text may not contain "-->"; a voice name may not contain ">" (neither can occur here).
    text = "\n".join(cue.lines)
    if cue.speaker is None:
        return text
    return f"<v {speaker_name(cue.speaker)}>{text}" if voice else f"{speaker_name(cue.speaker)}: {text}"


def to_srt(finals: Iterable[dict]) -> str:
    """SubRip captions, the cues of every non-empty final numbered from 1 (``Speaker N: `` first when
    it has a speaker)."""
    cues = [cue for f in _cues(finals) for cue in split_cues(f)]
    return "\n".join(
        f"{index}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{_cue_text(c, voice=False)}\n"
        for index, c in enumerate(cues, start=1)
    )


def to_vtt(finals: Iterable[dict]) -> str:
    """WebVTT captions, the cues of every non-empty final, in a ``<v Speaker N>`` voice span when it
    has a speaker."""
    blocks = ["WEBVTT\n"]
    for f in _cues(finals):
        for c in split_cues(f):
            blocks.append(f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{_cue_text(c, voice=True)}\n")
    return "\n".join(blocks)
