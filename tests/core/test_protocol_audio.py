"""Protocol validation, audio decoding and the stabilizer: pure units, no socket, no model."""

import json

import numpy as np
import pytest

from stream_server.core.audio import AudioDecoder, encode_mulaw
from stream_server.core.protocol import (
    AudioFormat, ProtocolError, ProtocolLimits, StreamConfig, apply_config, parse_audio_format, parse_command, parse_message,
)
from stream_server.core.stabilizer import PartialStabilizer


@pytest.mark.parametrize(
    "text, code",
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"no": "type"}', "bad_message"),
        ('{"type": 5}', "bad_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "start", "x": NaN}', "bad_json"),
    ],
)
def test_malformed_messages_get_a_code(text, code):
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.code == code
    assert not info.value.fatal
    event = info.value.to_event().to_wire()
    assert event["type"] == "error" and event["code"] == code and event["message"]


def test_oversized_message_is_too_large():
    limits = ProtocolLimits(max_text_bytes=100)
    with pytest.raises(ProtocolError) as info:
        parse_message(json.dumps({"type": "start", "keywords": ["x" * 200]}), limits)
    assert info.value.code == "too_large"


@pytest.mark.parametrize(
    "audio, fragment",
    [
        ({"encoding": "opus"}, "audio.encoding"),
        ({"sample_rate": 4000}, "sample_rate"),
        ({"sample_rate": 96000}, "sample_rate"),
        ({"sample_rate": "16000"}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
        ({"channels": 0}, "channels"),
        ({"bits": 16}, "unknown field"),
        ("pcm", "object"),
    ],
)
def test_bad_audio_format(audio, fragment):
    with pytest.raises(ProtocolError) as info:
        parse_audio_format(audio)
    assert info.value.code == "bad_config"
    assert fragment in info.value.message


def test_audio_format_defaults_and_values():
    assert parse_audio_format(None) == AudioFormat()
    assert parse_audio_format({"encoding": "mulaw", "sample_rate": 8000}) == AudioFormat("mulaw", 8000, 1)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"task": "summarize"}, "task"),
        ({"language": "english"}, "language"),
        ({"language": 7}, "language"),
        ({"keywords": "IBM"}, "keywords"),
        ({"keywords": [1]}, "keywords"),
        ({"keywords": [""]}, "empty"),
        ({"keywords": ["a,b"]}, "comma"),
        ({"keywords": ["x" * 65]}, "longer"),
        ({"keywords": [f"k{i}" for i in range(101)]}, "at most"),
        ({"partials": "sometimes"}, "partials"),
        ({"partial_interval": 0.01}, "partial_interval"),
        # A 400-digit integer is valid JSON; it must be refused by range, not crash a float check.
        ({"partial_interval": 10**400}, "partial_interval"),
        ({"vad": {"max_utterance_s": 10**400}}, "max_utterance_s"),
        ({"vad": {"silence_ms": 10**400}}, "vad"),
        ({"vad": {"silence_ms": 10}}, "vad"),
        ({"vad": {"aggressiveness": 9}}, "vad"),
        ({"vad": {"max_utterance_s": 500}}, "max_utterance_s"),
        ({"vad": {"volume": 3}}, "unknown field"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_bad_config_fields_name_the_field(fields, fragment):
    with pytest.raises(ProtocolError) as info:
        _configure(fields, StreamConfig())
    assert info.value.code == "bad_config"
    assert fragment in info.value.message
    # What the client sent is quoted, but a huge value is not echoed back whole.
    assert len(info.value.message) < 300


@pytest.mark.parametrize("fields", [
    {"partial_interval": 10**400}, {"vad": {"silence_ms": 10**400}}, {"vad": {"max_utterance_s": -10**400}},
    {"task": "x" * 10_000}, {"partials": "y" * 10_000},
])
def test_a_huge_bad_value_is_named_not_echoed(fields):
    with pytest.raises(ProtocolError) as info:
        _configure(fields, StreamConfig())
    assert info.value.code == "bad_config"
    assert "characters)" in info.value.message and len(info.value.message) < 300


def _configure(fields: dict, base: StreamConfig) -> StreamConfig:
    """A ``configure`` with ``fields`` as the session applies it: typed at the edge, then checked."""
    command = parse_command(json.dumps({"type": "configure", **fields}))
    return apply_config(command.options, base)


def test_config_overlay_keeps_unspecified_fields():
    base = _configure({"language": "FR", "keywords": ["Granite", " IBM  Watson ", "Granite"]}, StreamConfig())
    assert base.language == "fr"
    assert base.keywords == ("Granite", "IBM Watson")
    changed = _configure({"vad": {"silence_ms": 300}, "partials": True}, base)
    assert changed.language == "fr" and changed.keywords == base.keywords
    assert changed.vad.silence_ms == 300 and changed.vad.aggressiveness == base.vad.aggressiveness
    assert changed.partials == "llm"


# ---- audio ----------------------------------------------------------------------------------------


def _tone(rate, seconds=1.0, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _decode_all(decoder, data, cuts):
    out = [decoder.decode(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)])]
    out.append(decoder.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampling_preserves_duration_and_pitch(rate):
    tone = _tone(rate, 2.0)
    data = (tone * 32767).astype("<i2").tobytes()
    out = _decode_all(AudioDecoder(AudioFormat("pcm_s16le", rate, 1)), data, [len(data) // 3])
    assert abs(len(out) - 32000) <= 2
    spectrum = np.abs(np.fft.rfft(out[4000:28000]))
    peak_hz = np.argmax(spectrum) * 16000 / 24000
    assert abs(peak_hz - 440) < 2


def test_odd_byte_counts_carry_over():
    tone = _tone(16000, 0.5)
    data = (tone * 32767).astype("<i2").tobytes()
    whole = _decode_all(AudioDecoder(AudioFormat()), data, [])
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(1, len(data) - 1, 50).tolist()))
    assert any(c % 2 for c in cuts)
    pieces = _decode_all(AudioDecoder(AudioFormat()), data, cuts)
    np.testing.assert_array_equal(whole, pieces)


def test_f32_nonfinite_samples_are_zeroed_and_counted():
    samples = np.array([0.1, np.nan, 0.2, np.inf, -np.inf, 3.0], np.float32)
    decoder = AudioDecoder(AudioFormat("pcm_f32le", 16000, 1))
    out = decoder.decode(samples.astype("<f4").tobytes())
    assert decoder.nonfinite_samples == 3
    np.testing.assert_allclose(out, [0.1, 0.0, 0.2, 0.0, 0.0, 1.0])


def test_mulaw_round_trip_and_stereo_downmix():
    tone = _tone(8000, 0.5)
    decoded = _decode_all(AudioDecoder(AudioFormat("mulaw", 8000, 1)), encode_mulaw(tone), [333])
    assert abs(len(decoded) - 8000) <= 2
    # G.711 is ~13-bit: the resampled signal keeps the tone's level.
    assert abs(np.sqrt(np.mean(decoded[1000:7000] ** 2)) - 0.5 / np.sqrt(2)) < 0.02
    stereo = np.stack([tone, -tone * 0 + 0.25], axis=1).astype("<f4")
    mono = AudioDecoder(AudioFormat("pcm_f32le", 16000, 2)).decode(stereo.tobytes())
    np.testing.assert_allclose(mono, (tone + 0.25) / 2, atol=1e-6)


# ---- stabilizer -----------------------------------------------------------------------------------


def test_stable_prefix_needs_two_agreeing_hypotheses_and_never_shrinks():
    stab = PartialStabilizer(agreement=2)
    text, stable = stab.update("the cat")
    assert (text, stable) == ("the cat", "")
    text, stable = stab.update("the cat sat on")
    assert stable == "the cat" and text.startswith(stable)
    # A hypothesis that disagrees with published words does not retract them.
    text, stable = stab.update("a cat sat on the mat")
    assert stable.startswith("the cat") and text.startswith("the cat")
    assert stab.revisions == 1
    assert stab.finish("a cat sat on the mat.") .startswith("the cat")


def test_last_word_of_newest_hypothesis_is_never_stable():
    stab = PartialStabilizer(agreement=2)
    stab.update("hello wor")
    _, stable = stab.update("hello wor")
    assert stable == "hello"


def test_agreement_ignores_case_and_punctuation_but_keeps_first_surface_form():
    stab = PartialStabilizer(agreement=2)
    stab.update("Hello, world and")
    _, stable = stab.update("hello world and more")
    assert stable == "hello world and"
    assert stab.agrees("HELLO WORLD AND MORE.")
    assert not stab.agrees("yellow world and more")


@pytest.mark.parametrize(
    "stable, final, expected",
    [
        ("Do we set your", "To reset your speaking volume.", "Do we set your speaking volume."),
        ("That pen is invalid for", "That pin is invalid for this conference.", "That pen is invalid for this conference."),
        ("Mr. John", "And Mr. John Dashwood had", "Mr. John Dashwood had"),
        ("hello there", "completely different words here", "hello there words here"),
        # The stable words lack a word: they stand for as many words of the final, which keeps the
        # rest (the old splice jumped to the next match and gave "Alright is the plan.").
        ("Alright is", "Alright so this is the plan.", "Alright is this is the plan."),
        # A stable word that also occurs later in the final does not make the splice jump there
        # (the old splice gave "here are the words", dropping five words).
        ("here are the", "here are some more words words words the words", "here are the more words words words the words"),
        # Words the stable prefix skipped are left out rather than the stable words repeated.
        ("Mr. John", "And so Mr. John Dashwood", "Mr. John Dashwood"),
    ],
)
def test_final_that_disagrees_is_spliced_after_the_stable_words(stable, final, expected):
    stab = PartialStabilizer()
    stab.stable_words = stable.split()
    assert stab.finish(final) == expected
    assert stab.revisions == 1


def test_agreement_of_three_and_minimum_audio():
    stab = PartialStabilizer(agreement=3, min_audio_s=1.0, min_span_s=0.0)
    stab.update("the cat sat", audio_s=0.5)  # too little audio to count
    stab.update("the cat sat", audio_s=1.2)
    _, stable = stab.update("the cat sat on", audio_s=1.7)
    assert stable == ""  # only two hypotheses with enough audio so far
    _, stable = stab.update("the cat sat on the", audio_s=2.2)
    assert stable == "the cat sat"
    with pytest.raises(ValueError):
        PartialStabilizer(agreement=1)


def test_sample_history_keeps_absolute_indices_across_growth_and_trimming():
    from stream_server.core.audio import SampleHistory

    history, reference = SampleHistory(), np.zeros(0, np.float32)
    rng = np.random.default_rng(3)
    for step in range(60):
        chunk = rng.standard_normal(int(rng.integers(0, 5000))).astype(np.float32)
        history.append(chunk)
        reference = np.concatenate([reference, chunk])
        if step % 7 == 6:
            history.forget_before(history.end - 20_000)
        start = int(rng.integers(history.origin, history.end + 1))
        end = int(rng.integers(start, history.end + 1))
        np.testing.assert_array_equal(history.slice(start, end), reference[start:end])
    assert history.end == len(reference) and history.origin > 0
    with pytest.raises(IndexError):
        history.slice(history.origin - 1, history.end)
    history.clear()
    assert history.origin == history.end == len(reference)
