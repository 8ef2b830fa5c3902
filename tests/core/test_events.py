"""The typed events' wire form is protocol v1 (docs/protocol.md), field for field and in order."""

import json
from dataclasses import fields

from stream_server.core.events import (
    AudioFormat, ConfigChange, Configure, Configured, End, Error, Final, Finalize, FinalWord, Partial, Ready, SpeechEnded,
    UNSET, SpeechStarted, Start, Stop, StreamConfig, VadChange,
)
from stream_server.core.protocol import parse_command
from stream_server.speakers.clustering import SpeakerTurn


def wire(event) -> str:
    """The JSON text the client receives (key order included)."""
    return json.dumps(event.to_wire())


def test_utterance_events_as_documented():
    assert wire(SpeechStarted(0, 0.69)) == '{"type": "speech_started", "utterance_id": 0, "start": 0.69}'
    assert wire(SpeechEnded(0, 2.97, "silence")) == \
        '{"type": "speech_ended", "utterance_id": 0, "end": 2.97, "reason": "silence"}'
    assert wire(Partial(0, "Press.", "", 0.06, 0.6, channel=0)) == (
        '{"type": "partial", "utterance_id": 0, "text": "Press.", "stable_text": "", "start": 0.06, "end": 0.6, '
        '"channel": 0}')


def test_a_final_without_words_says_its_timing_is_per_utterance():
    assert wire(Final(0, "Go forward 10 meters.", 0.69, 2.97, "en", "transcribe")) == (
        '{"type": "final", "utterance_id": 0, "text": "Go forward 10 meters.", "start": 0.69, "end": 2.97, '
        '"language": "en", "task": "transcribe", "timing": "utterance"}')


def test_a_full_final_keeps_the_field_order():
    final = Final(3, "Hola amigo", 1.0, 2.0, "es", "translate", target_language="en", truncated=True,
                  words=(FinalWord("Hola", 1.0, 1.4, 0.9, speaker=0), FinalWord("amigo", 1.5, 2.0, None, speaker=1)),
                  confidence=0.9, speaker=0, speaker_turns=(SpeakerTurn(0, 1.0, 1.45), SpeakerTurn(1, 1.45, 2.0)),
                  channel=1)
    assert list(final.to_wire()) == ["type", "utterance_id", "text", "start", "end", "language", "task",
                                     "target_language", "truncated", "words", "confidence", "speaker",
                                     "speaker_turns", "channel"]
    assert final.to_wire()["words"] == [
        {"word": "Hola", "start": 1.0, "end": 1.4, "confidence": 0.9, "speaker": 0},
        {"word": "amigo", "start": 1.5, "end": 2.0, "confidence": None, "speaker": 1},
    ]
    assert final.to_wire()["speaker_turns"] == [{"speaker": 0, "start": 1.0, "end": 1.45},
                                                {"speaker": 1, "start": 1.45, "end": 2.0}]


def test_errors_carry_the_utterance_only_when_about_one():
    assert wire(Error("overloaded", "busy")) == \
        '{"type": "error", "code": "overloaded", "message": "busy", "fatal": false}'
    assert wire(Error("internal", "x", utterance_id=2, start=1.0, end=2.5, channel=1)) == (
        '{"type": "error", "code": "internal", "message": "x", "fatal": false, "utterance_id": 2, "start": 1.0, '
        '"end": 2.5, "channel": 1}')


def test_ready_configured_and_end():
    engine = {"name": "fake", "model": "m"}
    audio, config = AudioFormat("pcm_s16le", 16000, 2), StreamConfig()
    ready = Ready("s1", engine, audio, config, multichannel=True).to_wire()
    assert list(ready) == ["type", "session_id", "protocol", "engine", "config"] and ready["protocol"] == 1
    assert ready["config"] == {"audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 2},
                               **config.to_wire(), "multichannel": True}
    assert "multichannel" not in Configured(audio, config).to_wire()["config"]
    assert wire(End(2, 12.5)) == '{"type": "end", "utterances": 2, "audio_seconds": 12.5}'


def test_commands_parse_from_and_print_to_the_same_message():
    text = '{"type": "start", "audio": {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}, "language": "fr"}'
    start = parse_command(text)
    assert start == Start(AudioFormat("mulaw", 8000, 1), ConfigChange(language="fr"))
    assert start.to_wire() == json.loads(text)
    assert parse_command('{"type": "configure", "keywords": ["a"]}') == Configure(ConfigChange(keywords=("a",)))
    assert parse_command('{"type": "finalize"}') == Finalize() and parse_command('{"type": "stop"}') == Stop()
    assert parse_command('{"type": "start", "multichannel": true}').multichannel is True


def test_a_configuration_change_names_the_configurations_fields_in_its_order():
    """The fields' rules are walked in declaration order, which must be the protocol's (the first fault named)."""
    assert [f.name for f in fields(ConfigChange)] == list(StreamConfig().to_wire())
    assert [f.name for f in fields(VadChange)] == list(StreamConfig().to_wire()["vad"])


def test_a_configuration_change_prints_the_fields_given_in_protocol_order():
    text = ('{"type": "configure", "diarize": false, "vad": {"max_utterance_s": 9, "silence_ms": 300}, '
            '"target_language": null, "partials": true, "keywords": ["a"], "partial_interval": 1, "task": "translate"}')
    command = parse_command(text)
    assert command.options.language is UNSET and command.options.target_language is None  # null is a value
    assert json.dumps(command.to_wire()) == (
        '{"type": "configure", "task": "translate", "target_language": null, "keywords": ["a"], "partials": true, '
        '"partial_interval": 1, "vad": {"silence_ms": 300, "max_utterance_s": 9}, "diarize": false}')
    assert Configure().to_wire() == {"type": "configure"}
    assert Start(options=ConfigChange(vad=VadChange(aggressiveness=2))).to_wire() == {
        "type": "start", "audio": AudioFormat().to_wire(), "vad": {"aggressiveness": 2}}
