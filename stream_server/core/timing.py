"""Word timings of a final on the stream clock, made to match the text the final publishes (pure).

An engine times the words of the text *it* decoded (:attr:`InferenceResult.words`, seconds from the
start of the request's audio). The session may publish a slightly different text (the stable
prefix it already promised, spliced with the decode: see :mod:`stream_server.core.stabilizer`), and the
protocol promises that a final's ``words`` joined with spaces give its ``text``. :func:`final_words`
maps the engine's timed words onto the published words: words the decode also produced keep their
times and confidence; the others get times interpolated between their neighbours and no confidence
(the final decode did not produce them, so it gives them no probability).
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

from stream_server.inference.types import Word

_KEY = re.compile(r"[\W_]+", re.UNICODE)


def _key(word: str) -> str:
    return _KEY.sub("", word.lower())


def final_words(text: str, timed: Sequence[Word] | None, offset: float, end: float,
                earliest: float | None = None) -> list[Word] | None:
    """The published ``text``'s words, timed on the stream clock.

    Args:
        text: the final's text (words separated by single spaces).
        timed: the engine's words for its own decode, relative to the request audio; ``None`` when
            the engine could not time words.
        offset: stream time of the request audio's first sample (the utterance's start).
        end: stream time of the utterance's end; no word ends after it.
        earliest: no word starts before this stream time: where the VAD heard the first voiced
            frame. The utterance's audio begins with a pre-roll of silence, and Whisper's
            alignment puts its first word at the very start of the audio it was given.

    Returns:
        One :class:`Word` per space-separated word of ``text``, in order, with
        ``max(offset, earliest) <= start <= end_of_word <= end``; ``None`` when ``timed`` is ``None`` or empty while
        ``text`` is not.
    """
    tokens = text.split()
    if timed is None or (tokens and not timed):
        return None
    if not tokens:
        return []
    placed: list[Word | None] = [None] * len(tokens)
    matcher = difflib.SequenceMatcher(None, [_key(t) for t in tokens], [_key(w.word) for w in timed], autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            source = timed[block.b + k]
            placed[block.a + k] = Word(tokens[block.a + k], offset + source.start, offset + source.end, source.confidence)
    # Words the decode did not produce: spread over the gap their neighbours leave.
    i = 0
    while i < len(tokens):
        if placed[i] is not None:
            i += 1
            continue
        j = i
        while j < len(tokens) and placed[j] is None:
            j += 1
        previous = placed[i - 1] if i > 0 else None
        following = placed[j] if j < len(tokens) else None
        before = previous.end if previous is not None else offset
        after = following.start if following is not None else end
        after = max(after, before)
        step = (after - before) / (j - i)
        for k in range(i, j):
            placed[k] = Word(tokens[k], before + step * (k - i), before + step * (k - i + 1), None)
        i = j
    words: list[Word] = []
    floor = offset if earliest is None else min(max(offset, earliest), end)
    for word in placed:
        assert word is not None
        start = min(max(word.start, floor), end)
        stop = min(max(word.end, start), end)
        words.append(Word(word.word, round(start, 3), round(stop, 3), word.confidence))
        floor = start
    return words
