"""Word timings mapped onto the published final text (stream_server.core.timing), and Whisper's word times
on real speech."""

import json

import numpy as np
import pytest

from granite_stream_testing.datasets import read_audio
from stream_server.inference.types import InferenceRequest, Word
from stream_server.core.timing import final_words


def decoded(*spec):
    """Words of a decode: (word, start, end, confidence) tuples."""
    return tuple(Word(*s) for s in spec)


def test_words_of_an_unchanged_decode_are_shifted_onto_the_stream_clock():
    words = final_words("Go forward 10 meters.", decoded(("Go", 0.1, 0.4, 0.9), ("forward", 0.4, 0.9, 0.8),
                                                       ("10", 0.9, 1.2, 0.5), ("meters.", 1.2, 1.7, 0.95)),
                        offset=10.0, end=11.9)
    assert [(w.word, w.start, w.end, w.confidence) for w in words] == [
        ("Go", 10.1, 10.4, 0.9), ("forward", 10.4, 10.9, 0.8), ("10", 10.9, 11.2, 0.5), ("meters.", 11.2, 11.7, 0.95)]


def test_a_stable_word_the_decode_lacks_is_interpolated_and_unscored():
    # The session published "so this" as stable; the final decode lost "this".
    words = final_words("Alright, so this is the end.", decoded(
        ("Alright,", 0.0, 0.5, 0.9), ("so", 0.5, 0.7, 0.8), ("is", 1.1, 1.3, 0.9), ("the", 1.3, 1.4, 0.9),
        ("end.", 1.4, 1.9, 0.9)), offset=2.0, end=4.0)
    assert " ".join(w.word for w in words) == "Alright, so this is the end."
    this = words[2]
    assert (this.start, this.end, this.confidence) == (2.7, 3.1, None)  # the gap between "so" and "is"
    assert words[1].confidence == 0.8 and words[3].start == 3.1


def test_punctuation_and_case_of_the_published_text_win():
    words = final_words("Hello, world.", decoded(("hello", 0.0, 0.5, 0.7), ("world", 0.6, 1.0, 0.6)), 0.0, 1.0)
    assert [(w.word, w.confidence) for w in words] == [("Hello,", 0.7), ("world.", 0.6)]


def test_times_stay_in_order_and_inside_the_utterance():
    # A decode whose times run past the utterance's end and backwards must still give ordered times.
    words = final_words("a b c d", decoded(("a", 0.5, 0.2, 0.9), ("b", 0.1, 0.3, 0.9), ("c", 0.9, 3.0, 0.9),
                                           ("d", 2.5, 2.8, 0.9)), offset=1.0, end=2.5)
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(1.0 <= w.start <= w.end <= 2.5 for w in words)


def test_no_timing_without_engine_words():
    assert final_words("some text", None, 0.0, 1.0) is None
    assert final_words("some text", (), 0.0, 1.0) is None
    assert final_words("", (), 0.0, 1.0) == []


@pytest.mark.slow
def test_whisper_times_and_scores_the_words_of_real_speech(whisper_engine, goforward, librivox_clips):
    requests = [InferenceRequest("s", 0, "final", read_audio(goforward)[0])] + [
        InferenceRequest("s", i + 1, "final", read_audio(c)[0]) for i, c in enumerate(librivox_clips[:2])]
    results = whisper_engine.transcribe_batch(requests)
    for request, result in zip(requests, results):
        assert result.words is not None, result.text
        assert " ".join(w.word for w in result.words) == result.text
        starts = [w.start for w in result.words]
        assert starts == sorted(starts) and all(0 <= w.start <= w.end <= request.duration for w in result.words)
        assert all(0.0 < w.confidence <= 1.0 for w in result.words)
        assert 0.0 < result.confidence <= 1.0
    # "Go forward 10 meters": the words follow the speech (goforward's speech is ~0.4-2.5 s) and the
    # last word ends near where the speech does, not at the end of the padded window.
    go = results[0].words
    assert go[-1].word.lower().startswith("meters") and 1.5 <= go[-1].end <= 2.79
    assert go[1].start >= 0.4
    # A partial is not timed (its words would only be replaced), and neither is a translation.
    partial = whisper_engine.transcribe_batch([InferenceRequest("s", 0, "partial", requests[0].audio)])[0]
    assert partial.words is None


@pytest.mark.slow
def test_whisper_without_word_timestamps_gives_no_words(goforward):
    from stream_server.engines.whisper import WhisperEngine

    engine = WhisperEngine(cpu_threads=1, word_timestamps=False)
    [result] = engine.transcribe_batch([InferenceRequest("s", 0, "final", read_audio(goforward)[0])])
    assert result.words is None and result.confidence is None and result.text


@pytest.mark.slow
def test_wrong_words_score_lower_on_real_speech(whisper_engine, librivox_clips):
    """The confidence is informative: on LibriVox, tiny.en's words that differ from the reference
    (after alignment) have a lower mean confidence than the ones it gets right."""
    import difflib

    from granite_stream_testing.textnorm import normalizer_for

    normalize = normalizer_for("en")
    right, wrong = [], []
    for clip in librivox_clips:
        [result] = whisper_engine.transcribe_batch([InferenceRequest("s", 0, "final", read_audio(clip)[0])])
        hyp = [normalize(w.word) for w in result.words]
        ref = normalize(clip.text).split()
        matcher = difflib.SequenceMatcher(None, hyp, ref, autojunk=False)
        matched = {block.a + k for block in matcher.get_matching_blocks() for k in range(block.size)}
        for i, word in enumerate(result.words):
            (right if i in matched else wrong).append(word.confidence)
    assert wrong and right
    assert np.mean(wrong) < np.mean(right)


# ---- the final event and the adapters ---------------------------------------------------------------


def _stream(session, engine, audio_s: list[float]):
    """Feed speech/silence stretches (alternating, speech first after 0.5 s of silence); return events."""
    from tests.adapters.test_adapters import buzz, pcm16, quiet, run_session

    events, closes = [], []
    run_session(session, engine, session.receive_text('{"type": "start", "partials": false}'), events, closes)
    pieces = [quiet(0.5)] + [buzz(s) if i % 2 == 0 else quiet(s) for i, s in enumerate(audio_s)]
    audio = np.concatenate(pieces)
    for i in range(0, len(audio), 1600):
        run_session(session, engine, session.receive_bytes(pcm16(audio[i : i + 1600])), events, closes)
    run_session(session, engine, session.receive_text('{"type": "stop"}'), events, closes)
    return events


def test_final_event_carries_words_on_the_stream_clock():
    from tests.fakes import CountingEngine
    from stream_server.core.multichannel import MultichannelSession

    engine = CountingEngine(timed=True)
    events = _stream(MultichannelSession("s", engine.capabilities), engine, [1.6, 1.0, 1.2, 1.0])
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 2
    for final in finals:
        words = final["words"]
        assert " ".join(w["word"] for w in words) == final["text"]
        assert all(final["start"] <= w["start"] <= w["end"] <= final["end"] + 1e-9 for w in words)
        # The fake's first word starts at 0 of the request audio: moved to the first voiced frame,
        # after the VAD's 300 ms pre-roll.
        assert words[0]["start"] == pytest.approx(final["start"] + 0.3, abs=0.001)
        assert final["confidence"] == pytest.approx(np.mean([w["confidence"] for w in words]), abs=0.001)
        assert "timing" not in final
    assert finals[1]["words"][0]["start"] > finals[0]["end"]


def test_final_without_engine_words_says_its_timing_is_the_utterance():
    from tests.fakes import CountingEngine
    from stream_server.core.multichannel import MultichannelSession

    engine = CountingEngine()
    [final] = [e for e in _stream(MultichannelSession("s", engine.capabilities), engine, [1.6, 1.0]) if e["type"] == "final"]
    assert final["timing"] == "utterance" and "words" not in final and "confidence" not in final


def test_deepgram_results_carry_the_real_word_times_and_confidences():
    from tests.fakes import CountingEngine
    from tests.adapters.test_adapters import buzz, deepgram_harness, dg_validate, pcm16, quiet

    h = deepgram_harness("encoding=linear16&sample_rate=16000&interim_results=true", engine=CountingEngine(timed=True))
    data = pcm16(np.concatenate([quiet(0.5), buzz(2.0), quiet(1.0)]))
    for i in range(0, len(data), 3200):
        h.binary(data[i : i + 3200])
    for message in h.replies:
        dg_validate(message)
    [final] = [m for m in h.replies if m["type"] == "Results" and m["is_final"]]
    alternative = final["channel"]["alternatives"][0]
    words = alternative["words"]
    assert [w["punctuated_word"] for w in words] == alternative["transcript"].split()
    assert [w["confidence"] for w in words] == [0.5 + 0.1 * (i % 5) for i in range(len(words))]
    assert words[2]["start"] == pytest.approx(words[1]["start"] + 0.4, abs=0.002)
    assert alternative["confidence"] == pytest.approx(np.mean([w["confidence"] for w in words]), abs=0.001)
    interim = [m for m in h.replies if m["type"] == "Results" and not m["is_final"]]
    assert interim and all(m["channel"]["alternatives"][0]["confidence"] == 0.0 for m in interim)  # not scored


def test_openai_logprobs_when_the_session_includes_them():
    from openai.types.realtime import ConversationItemInputAudioTranscriptionCompletedEvent

    from tests.fakes import CountingEngine
    from tests.adapters.test_adapters import append, buzz, openai_harness, pcm16, quiet, sdk_validate

    h = openai_harness(engine=CountingEngine(timed=True))
    [updated] = h.text({"type": "session.update", "session": {
        "type": "transcription", "include": ["item.input_audio_transcription.logprobs"]}})
    assert sdk_validate(updated).session.include == ["item.input_audio_transcription.logprobs"]
    append(h, pcm16(np.concatenate([quiet(0.5, 24000), buzz(2.0, 24000), quiet(1.0, 24000)])))
    [completed] = h.of("type", "conversation.item.input_audio_transcription.completed")
    parsed = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(completed)
    assert "".join(p.token for p in parsed.logprobs) == completed["transcript"]
    assert parsed.logprobs[0].logprob == pytest.approx(np.log(0.5), abs=1e-3)
    assert all(bytes(p.bytes).decode() == p.token for p in parsed.logprobs)

    plain = openai_harness(engine=CountingEngine(timed=True))
    append(plain, pcm16(np.concatenate([quiet(0.5, 24000), buzz(2.0, 24000), quiet(1.0, 24000)])))
    [completed] = plain.of("type", "conversation.item.input_audio_transcription.completed")
    assert "logprobs" not in completed
    [error] = plain.text({"type": "session.update", "session": {"type": "transcription", "include": ["nope"]}})
    assert error["type"] == "error" and error["error"]["param"] == "session.include"


def test_twilio_final_transcripts_carry_words():
    from stream_server.adapters.twilio import TwilioTranslator
    from stream_server.core.session import SessionSettings
    from tests.fakes import CountingEngine
    from tests.adapters.test_adapters import Harness, buzz, feed_twilio, quiet, twilio_start

    engine = CountingEngine(timed=True)
    h = Harness(TwilioTranslator(engine.capabilities, SessionSettings()), engine)
    h.text(twilio_start(tracks=("inbound",)))
    feed_twilio(h, {"inbound": np.concatenate([quiet(0.5, 8000), buzz(1.6, 8000), quiet(1.0, 8000)])})
    [final] = [r for r in h.replies if r["event"] == "transcript" and r["is_final"]]
    assert " ".join(w["word"] for w in final["words"]) == final["text"] and 0 < final["confidence"] <= 1


def test_no_word_starts_before_the_first_voiced_frame():
    # Whisper puts the first word at the start of the audio, which begins with the VAD's pre-roll.
    words = final_words("Go forward", decoded(("Go", 0.0, 0.5, 0.9), ("forward", 0.5, 0.9, 0.9)),
                        offset=5.0, end=6.0, earliest=5.3)
    assert [(w.start, w.end) for w in words] == [(5.3, 5.5), (5.5, 5.9)]


def test_the_vad_says_where_voicing_starts():
    from tests.vad.test_vad import voiced
    from vad import SpeechStarted, VadConfig, VadSegmenter

    segmenter = VadSegmenter(VadConfig(pre_roll_ms=300))
    events = segmenter.feed(np.concatenate([np.zeros(16000, np.float32), voiced(1.0)]))
    [started] = [e for e in events if isinstance(e, SpeechStarted)]
    assert started.voiced - started.start == 300 * 16 and abs(started.voiced - 16000) <= 30 * 16


def test_multichannel_finals_carry_each_channels_words():
    from stream_server.core.multichannel import MultichannelSession
    from tests.fakes import CountingEngine
    from tests.adapters.test_adapters import buzz, quiet, run_session, stereo

    engine = CountingEngine(timed=True)
    session = MultichannelSession("mc", engine.capabilities)
    events, closes = [], []
    start = {"type": "start", "multichannel": True, "partials": False,
             "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 2}}
    run_session(session, engine, session.receive_text(json.dumps(start)), events, closes)
    run_session(session, engine, session.receive_bytes(stereo(np.concatenate([quiet(0.5), buzz(1.6), quiet(2.4)]),
                                                              np.concatenate([quiet(2.0), buzz(1.2), quiet(1.3)]))),
                events, closes)
    run_session(session, engine, session.receive_text('{"type": "stop"}'), events, closes)
    finals = {e["channel"]: e for e in events if e["type"] == "final"}
    assert set(finals) == {0, 1}
    for final in finals.values():
        assert " ".join(w["word"] for w in final["words"]) == final["text"]
        assert all(final["start"] <= w["start"] <= w["end"] <= final["end"] for w in final["words"])
    assert finals[1]["words"][0]["start"] > finals[0]["words"][0]["start"] + 1.0  # each on its own channel's clock


def test_final_confidence_is_the_mean_of_the_published_scored_words():
    """Not the engine's own figure: the final may publish words the decode did not score."""
    from stream_server.core.multichannel import MultichannelSession
    from tests.fakes import CountingEngine

    class OwnFigure(CountingEngine):
        def timing(self, request, text):
            timing = super().timing(request, text)
            return {**timing, "confidence": 0.123} if timing else timing

    engine = OwnFigure(timed=True)
    [final] = [e for e in _stream(MultichannelSession("s", engine.capabilities), engine, [1.6, 1.0])
               if e["type"] == "final"]
    scored = [w["confidence"] for w in final["words"] if w["confidence"] is not None]
    assert final["confidence"] == pytest.approx(np.mean(scored), abs=0.001) != 0.123
