"""The offline ``engine`` reference on clips longer than Whisper's window."""

import numpy as np

from benchmarks.offline import quiet_pieces, transcribe_engine
from granite_stream_testing.datasets import Clip
from stream_server.engines.whisper import LONGEST_AUDIO_S
from tests.fakes import CountingEngine

RATE = 16_000


def speech_with_a_pause(seconds: float, pause_at: float) -> np.ndarray:
    """Loud noise for ``seconds``, with 300 ms of near-silence starting at ``pause_at``."""
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, int(seconds * RATE)).astype(np.float32)
    audio[int(pause_at * RATE) : int((pause_at + 0.3) * RATE)] *= 0.001
    return audio


def test_a_long_clip_is_cut_where_it_is_quiet_into_pieces_that_fit_the_window():
    audio = speech_with_a_pause(45.0, pause_at=24.0)
    pieces = quiet_pieces(audio, RATE)
    assert len(pieces) == 2 and all(len(p) <= LONGEST_AUDIO_S * RATE for p in pieces)
    assert np.array_equal(np.concatenate(pieces), audio)  # nothing lost, nothing repeated
    assert 24.0 <= len(pieces[0]) / RATE <= 24.3  # inside the pause
    assert len(quiet_pieces(audio[: 20 * RATE], RATE)) == 1  # a clip that fits stays whole


def test_each_piece_is_decoded_with_the_text_before_it_as_context(monkeypatch):
    from benchmarks import offline

    audio = speech_with_a_pause(45.0, pause_at=24.0)
    monkeypatch.setattr(offline, "clip_audio", lambda clip, rate: audio)
    engine = CountingEngine()
    [text], _ = transcribe_engine(engine, [Clip("fake/long", None, "x", "en", RATE, "fake")])
    first, second = [r for batch in engine.batches for r in batch]
    assert first.context == "" and second.context == engine.text_for(first)
    # The whole clip's words: 0.4 s per word in the fake, so none lost at the cut.
    assert text == engine.text_for(first) + " " + engine.text_for(second)
    assert len(text.split()) >= int(45.0 / 0.4) - 1
