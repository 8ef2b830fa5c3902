"""Caption cues (stream_server.core.captions): broadcast limits, word times, speakers."""

import pytest

from stream_server.core import captions
from stream_server.core.captions import MAX_CUE_S, MAX_LINE_CHARS, MAX_LINES, split_cues

LONG = ("And Mister John Dashwood had then leisure to consider how much there might be prudently in his "
        "power to do for them, which he did at length after a long deliberation with his wife")


def worded(text: str, start: float, seconds_per_word: float, speaker_of=None) -> dict:
    words = [{"word": w, "start": start + i * seconds_per_word, "end": start + (i + 0.8) * seconds_per_word,
              "confidence": 0.9} for i, w in enumerate(text.split())]
    if speaker_of is not None:
        for i, w in enumerate(words):
            w["speaker"] = speaker_of(i)
    return {"text": text, "start": start, "end": words[-1]["end"] + 0.1, "words": words}


@pytest.mark.parametrize("final", [
    worded(LONG, 10.0, 0.35),  # words timed: ~12 s of speech
    {"text": LONG, "start": 10.0, "end": 22.0},  # no words: the span is shared out
    {**worded(LONG, 10.0, 0.35), "speaker": 1},  # the "Speaker 2: " prefix counts in the first line
], ids=["words", "no-words", "speaker"])
def test_cues_keep_the_broadcast_limits_and_every_word(final):
    cues = split_cues(final)
    assert len(cues) > 1
    assert " ".join(" ".join(c.lines) for c in cues) == final["text"]  # nothing lost, order kept
    for cue in cues:
        assert 1 <= len(cue.lines) <= MAX_LINES
        prefix = len(captions.speaker_name(cue.speaker)) + 2 if cue.speaker is not None else 0
        assert len(cue.lines[0]) + prefix <= MAX_LINE_CHARS and all(len(line) <= MAX_LINE_CHARS for line in cue.lines)
        assert cue.end - cue.start <= MAX_CUE_S
        assert final["start"] <= cue.start < cue.end <= final["end"]
    assert [c.start for c in cues] == sorted(c.start for c in cues)
    # Greedy filling: a cue ends only because the next word would not fit (lines or seconds).
    for cue, following in zip(cues, cues[1:]):
        first = following.lines[0].split()[0]
        too_long = len(cue.lines[-1]) + 1 + len(first) > MAX_LINE_CHARS - (prefix if len(cue.lines) == 1 else 0)
        assert (len(cue.lines) == MAX_LINES and too_long) or following.end - cue.start > MAX_CUE_S


def test_cue_times_come_from_the_words():
    final = worded("one two three", 5.0, 1.0)
    [cue] = split_cues(final)
    assert (cue.start, cue.end) == (5.0, 7.8)


def test_a_speaker_change_inside_a_final_starts_a_cue():
    final = {**worded("hello there how are you", 0.0, 0.4, speaker_of=lambda i: 0 if i < 2 else 1), "speaker": 0}
    cues = split_cues(final)
    assert [(c.speaker, c.lines) for c in cues] == [(0, ("hello there",)), (1, ("how are you",))]
    vtt = captions.to_vtt([final])
    assert "<v Speaker 1>hello there\n" in vtt and "<v Speaker 2>how are you\n" in vtt


def test_a_word_longer_than_a_line_keeps_a_line_of_its_own():
    word = "x" * 50
    cues = split_cues({"text": f"a {word} b", "start": 0.0, "end": 3.0})
    assert [c.lines for c in cues] == [("a", word), ("b",)]


def test_srt_numbers_every_cue_and_text_stays_one_line_a_final():
    finals = [worded(LONG, 0.0, 0.35), {"text": "Short.", "start": 20.0, "end": 21.0}]
    srt = captions.to_srt(finals)
    blocks = srt.strip().split("\n\n")
    assert [b.split("\n")[0] for b in blocks] == [str(i) for i in range(1, len(blocks) + 1)]
    assert blocks[-1].endswith("Short.")
    assert captions.to_text(finals) == f"{LONG}\nShort.\n"
