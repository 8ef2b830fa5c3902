"""The session's typed contract: the commands it takes and the events it emits (sans-I/O).

Everything inside the server speaks these frozen dataclasses: the session, multichannel, the
adapters, the connection shell and the metrics. JSON exists only at the edge: client text is parsed
into commands by :func:`stream_server.core.protocol.parse_command`, and an event becomes the wire
message of protocol v1 (``docs/protocol.md``) through its :meth:`to_wire` when it leaves for a
native client. ``to_wire`` is the protocol: it gives exactly the JSON object the client receives.

Times are seconds on the stream's audio clock, already rounded to the wire's millisecond
resolution (:func:`~stream_server.core.protocol.round_time`). ``channel`` is set only by
:class:`~stream_server.core.multichannel.MultichannelSession` (``None``: a mono stream, not sent).
"""

from __future__ import annotations

import enum
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, Iterator, Literal, Mapping

from vad import VadConfig, brief, is_real

from stream_server.speakers.clustering import SpeakerTurn

PROTOCOL_VERSION = 1
TASKS = ("transcribe", "translate")

# ---- configuration (what start/configure set; ready/configured restate it) -----------------------


@dataclass(frozen=True)
class AudioFormat:
    """The audio a client declared in ``start``."""

    encoding: str = "pcm_s16le"
    sample_rate: int = 16_000
    channels: int = 1

    def to_wire(self) -> dict:
        return {"encoding": self.encoding, "sample_rate": self.sample_rate, "channels": self.channels}


@dataclass(frozen=True)
class StreamConfig:
    """The effective recognition settings of a session (the parts ``configure`` may change).

    Attributes:
        task: ``transcribe`` or ``translate``.
        language: spoken language (ISO 639-1), or ``None`` for auto-detection where the engine allows it.
        target_language: translation target; ``None`` means English for ``translate``.
        keywords: terms to bias recognition towards.
        partials: ``False`` for no partials, else the partial mode (``"llm"`` or ``"ctc"``).
        partial_interval: seconds of audio between partial hypotheses.
        vad: voice-activity segmentation settings.
        diarize: label each final with its ``speaker`` (0, 1, … in order of first appearance);
            needs an engine whose capabilities say ``diarization`` (docs/diarization.md).
    """

    task: str = "transcribe"
    language: str | None = "en"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    partials: str | Literal[False] = "llm"  # a "start" with true means "llm"
    partial_interval: float = 0.5
    vad: VadConfig = field(default_factory=VadConfig)
    diarize: bool = False

    def to_wire(self) -> dict:
        return {
            "task": self.task,
            "language": self.language,
            "target_language": self.target_language,
            "keywords": list(self.keywords),
            "partials": self.partials,
            "partial_interval": self.partial_interval,
            "vad": {
                "silence_ms": self.vad.silence_ms,
                "aggressiveness": self.vad.aggressiveness,
                "max_utterance_s": self.vad.max_utterance_s,
            },
            "diarize": self.diarize,
        }


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset.UNSET
"""A field of a :class:`ConfigChange` the command did not give (where ``None`` is itself a value)."""


@dataclass(frozen=True)
class ProtocolLimits:
    """Bounds on what a client may send. All are enforced with a named error, never silently.

    Attributes:
        max_text_bytes: largest JSON control message.
        max_keywords: most keywords in one list.
        max_keyword_chars: longest keyword.
        max_utterance_s: upper bound a client may request for ``vad.max_utterance_s``.
    """

    max_text_bytes: int = 64 * 1024
    max_keywords: int = 100
    max_keyword_chars: int = 64
    max_utterance_s: float = 30.0


# ---- the configuration fields' rules ----------------------------------------------------------------
# A configurable field's rules live in its metadata (:func:`rule`), so that the protocol's parsing
# (:func:`stream_server.core.protocol.parse_config_change`), the session's overlay
# (:func:`stream_server.core.protocol.apply_config`) and ``to_wire`` walk the fields in declaration
# order, which is the protocol's order: the first fault of a message is the one named. A check sees
# the value in wire form (a list for ``keywords``), checks its type and range together and returns
# the value the configuration keeps; it raises ``ValueError`` with the sentence the client reads
# (the protocol answers ``bad_config`` with it). ``label`` is the field's name on the wire.

Check = Callable[[str, Any, ProtocolLimits], Any]


def rule(check: Check | None = None, *, json_check: Check | None = None, to_wire: Callable[[Any], Any] | None = None,
         from_json: Callable[[Any], Any] | None = None, nested: type | None = None) -> dict[str, Any]:
    """The metadata of a configurable field (of :class:`ConfigChange` or :class:`VadChange`).

    Args:
        check: checks a value both where JSON is parsed and where a change is applied.
        json_check: checks a JSON value only (the session leaves a typed value to a later check).
        to_wire: the value in wire form (default: as is); a check sees it in this form.
        from_json: the value a change holds for a checked JSON value (default: as is).
        nested: the partial-change type of a nested object (``vad``): its own fields carry the
            rules, and the value it overlays checks the result as a whole (``validate()``).
    """
    return {"check": check, "json_check": json_check, "to_wire": to_wire, "from_json": from_json, "nested": nested}


def given(change: Any) -> Iterator[tuple[Field, Any]]:
    """The fields a change sets (those not at their default, which means "not given"), in order."""
    for f in fields(change):
        value = getattr(change, f.name)
        if value is not f.default:
            yield f, value


def wire_value(f: Field, value: Any) -> Any:
    """A configuration field's value in wire form."""
    convert = f.metadata["to_wire"]
    return value if convert is None else convert(value)


def check_task(label: str, value: Any, limits: ProtocolLimits) -> str:
    if not isinstance(value, str) or value not in TASKS:
        raise ValueError(f"{label} must be one of {list(TASKS)}, got {brief(value)}")
    return value


def check_language(label: str, value: Any, limits: ProtocolLimits) -> str | None:
    if value is not None and (not isinstance(value, str) or not _is_language_code(value)):
        raise ValueError(f"{label} must be a language code such as \"en\" or null, got {brief(value)}")
    return value.lower() if isinstance(value, str) else None


def check_keywords(label: str, value: Any, limits: ProtocolLimits) -> tuple[str, ...]:
    """Whitespace normalised, repeats dropped."""
    if not isinstance(value, list):
        raise ValueError(f"{label} must be a list of strings")
    if len(value) > limits.max_keywords:
        raise ValueError(f"at most {limits.max_keywords} {label} are allowed, got {len(value)}")
    keywords: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{label} must be strings, got {type(item).__name__}")
        word = " ".join(item.split())
        if not word:
            raise ValueError(f"{label} must not be empty")
        if len(word) > limits.max_keyword_chars:
            raise ValueError(f"keyword {word[:20]!r}… is longer than {limits.max_keyword_chars} characters")
        if any(not ch.isprintable() for ch in word) or "," in word:
            raise ValueError(f"keyword {word[:20]!r} contains a comma or a control character")
        if word not in keywords:
            keywords.append(word)
    return tuple(keywords)


def check_partials(label: str, value: Any, limits: ProtocolLimits) -> str | Literal[False]:
    """``True`` is the ``"llm"`` mode."""
    mode = "llm" if value is True else value
    if mode is not False and mode not in ("llm", "ctc"):
        raise ValueError(f"{label} must be true, false, \"llm\" or \"ctc\", got {brief(value)}")
    return mode


def check_partial_interval(label: str, value: Any, limits: ProtocolLimits) -> float:
    if not is_real(value) or not 0.2 <= value <= 10.0:
        raise ValueError(f"{label} must be a number of seconds in [0.2, 10], got {brief(value)}")
    return float(value)


def check_max_utterance_s(label: str, value: Any, limits: ProtocolLimits) -> float:
    if not is_real(value) or not 1.0 <= value <= limits.max_utterance_s:
        raise ValueError(f"{label} must be a number in [1, {limits.max_utterance_s}], got {brief(value)}")
    return float(value)


def check_bool(label: str, value: Any, limits: ProtocolLimits) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be true or false, got {brief(value)}")
    return value


def check_int(label: str, value: Any, limits: ProtocolLimits) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label} must be an integer, got {brief(value)}")
    return value


def _is_language_code(value: str) -> bool:
    return 2 <= len(value) <= 3 and value.isascii() and value.isalpha()


@dataclass(frozen=True)
class VadChange:
    """A partial change of the VAD settings: the fields given (not ``None``) replace the current
    :class:`~vad.VadConfig`'s, the others keep it; the result is checked as a whole (its
    cross-field rules) by the session, against the settings it overlays. The integers' ranges are
    the VAD's (checked with the whole), only their JSON type is checked at the edge."""

    silence_ms: int | None = field(default=None, metadata=rule(json_check=check_int))
    aggressiveness: int | None = field(default=None, metadata=rule(json_check=check_int))
    max_utterance_s: float | None = field(default=None, metadata=rule(check_max_utterance_s))

    def to_wire(self) -> dict:
        """The ``vad`` object of the wire message: the fields given, in protocol order."""
        return {f.name: value for f, value in given(self)}


@dataclass(frozen=True)
class ConfigChange:
    """The configuration fields a ``start`` or ``configure`` sets; the rest keep their value.

    A field left at its default (``None``; :data:`UNSET` for the languages, where ``None`` means
    auto-detection) was not given. The values are typed, as sent; the session applies a change to
    its current :class:`StreamConfig` and its limits (:func:`stream_server.core.protocol.apply_config`),
    which refuses values out of range, or a ``vad`` change invalid with the settings it keeps, with
    ``bad_config``. Built from JSON only by :func:`stream_server.core.protocol.parse_command`
    (which refuses unknown names and wrong types there); adapters and the HTTP/CLI paths construct it.

    Each field is named as the :class:`StreamConfig` field it changes and as the wire's, in the
    protocol's order, and carries its rules (:func:`rule`): a new configurable field is one field
    here (and its :class:`StreamConfig` field).

    Attributes:
        partials: as sent: ``True`` (the ``"llm"`` mode), ``False``, or a mode name.
        keywords: as sent; the session normalises whitespace and drops repeats.
    """

    task: str | None = field(default=None, metadata=rule(check_task))
    language: str | None | Unset = field(default=UNSET, metadata=rule(check_language))
    target_language: str | None | Unset = field(default=UNSET, metadata=rule(check_language))
    keywords: tuple[str, ...] | None = field(default=None, metadata=rule(check_keywords, to_wire=list, from_json=tuple))
    partials: bool | str | None = field(default=None, metadata=rule(check_partials))
    partial_interval: float | None = field(default=None, metadata=rule(check_partial_interval))
    vad: VadChange | None = field(default=None, metadata=rule(to_wire=VadChange.to_wire, nested=VadChange))
    diarize: bool | None = field(default=None, metadata=rule(check_bool))

    def to_wire(self) -> dict:
        """The configuration fields of the wire message: those given, in protocol order."""
        return {f.name: wire_value(f, value) for f, value in given(self)}


# ---- commands (client → session) ------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Open the stream.

    Attributes:
        audio: the declared audio format (its ranges are checked by the session, which answers
            ``bad_config``).
        options: the configuration fields the client set. The session checks their values
            against the configuration they overlay and its limits (a ``vad`` change together
            with the current VAD settings) and answers ``bad_config``.
        multichannel: ``True`` for one session per channel (see ``MultichannelSession``); ``None``
            when the client did not say.
    """

    audio: AudioFormat = field(default_factory=AudioFormat)
    options: ConfigChange = field(default_factory=ConfigChange)
    multichannel: bool | None = None

    def to_wire(self) -> dict:
        """The control message a client sends for this command (what :func:`parse_command` reads)."""
        wire = {"type": "start", "audio": self.audio.to_wire(), **self.options.to_wire()}
        if self.multichannel is not None:
            wire["multichannel"] = self.multichannel
        return wire


@dataclass(frozen=True)
class Configure:
    """Change configuration fields mid-stream (``options`` as in :class:`Start`)."""

    options: ConfigChange = field(default_factory=ConfigChange)

    def to_wire(self) -> dict:
        return {"type": "configure", **self.options.to_wire()}


@dataclass(frozen=True)
class Finalize:
    """End the open utterance now (its final follows)."""

    def to_wire(self) -> dict:
        return {"type": "finalize"}


@dataclass(frozen=True)
class Stop:
    """Finish the stream: finals of everything received, then ``end`` and a close."""

    def to_wire(self) -> dict:
        return {"type": "stop"}


@dataclass(frozen=True)
class Audio:
    """Audio bytes in the encoding ``start`` declared."""

    data: bytes


Command = Start | Configure | Finalize | Stop | Audio

# ---- events (session → client) --------------------------------------------------------------------


def _channel(wire: dict, channel: int | None) -> dict:
    if channel is not None:
        wire["channel"] = channel
    return wire


@dataclass(frozen=True)
class Ready:
    """The stream started with this effective configuration. ``multichannel`` restates a channel's
    ``ready`` for the whole stream (``config.multichannel`` = true)."""

    session_id: str
    engine: Mapping[str, Any]
    audio: AudioFormat
    config: StreamConfig
    multichannel: bool = False

    def to_wire(self) -> dict:
        return {"type": "ready", "session_id": self.session_id, "protocol": PROTOCOL_VERSION,
                "engine": dict(self.engine), "config": _config_wire(self.audio, self.config, self.multichannel)}


@dataclass(frozen=True)
class Configured:
    """A ``configure`` was applied; the new effective configuration."""

    audio: AudioFormat
    config: StreamConfig
    multichannel: bool = False

    def to_wire(self) -> dict:
        return {"type": "configured", "config": _config_wire(self.audio, self.config, self.multichannel)}


def _config_wire(audio: AudioFormat, config: StreamConfig, multichannel: bool) -> dict:
    wire = {"audio": audio.to_wire(), **config.to_wire()}
    if multichannel:
        wire["multichannel"] = True
    return wire


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD opened utterance ``utterance_id`` at ``start``."""

    utterance_id: int
    start: float
    channel: int | None = None

    def to_wire(self) -> dict:
        return _channel({"type": "speech_started", "utterance_id": self.utterance_id, "start": self.start},
                        self.channel)


@dataclass(frozen=True)
class SpeechEnded:
    """The end of utterance ``utterance_id`` was decided: the one moment speech ends.

    ``reason`` is the VAD's (``silence``, ``max_length``, ``forced`` by finalize/stop). Adapters
    announce the end of speech from this event only; an inference request says nothing about it
    (an early final is requested at a short pause that may not end the speech).
    """

    utterance_id: int
    end: float
    reason: str
    channel: int | None = None

    def to_wire(self) -> dict:
        return _channel({"type": "speech_ended", "utterance_id": self.utterance_id, "end": self.end,
                         "reason": self.reason}, self.channel)


@dataclass(frozen=True)
class Partial:
    """A hypothesis of the open utterance over ``[start, end]``; ``stable_text`` is its prefix that
    later partials and the final keep (see :class:`~stream_server.core.stabilizer.PartialStabilizer`)."""

    utterance_id: int
    text: str
    stable_text: str
    start: float
    end: float
    channel: int | None = None

    def to_wire(self) -> dict:
        return _channel({"type": "partial", "utterance_id": self.utterance_id, "text": self.text,
                         "stable_text": self.stable_text, "start": self.start, "end": self.end}, self.channel)


@dataclass(frozen=True)
class FinalWord:
    """One timed word of a final, on the stream clock (seconds).

    Attributes:
        word: as in the final's text, punctuation attached; a final's words joined with spaces give its text.
        confidence: the engine's probability for the word, or ``None`` when it did not score it.
        speaker: the word's speaker label, in a ``diarize`` final only.
    """

    word: str
    start: float
    end: float
    confidence: float | None = None
    speaker: int | None = None

    def to_wire(self) -> dict:
        wire: dict[str, Any] = {"word": self.word, "start": self.start, "end": self.end, "confidence": self.confidence}
        if self.speaker is not None:
            wire["speaker"] = self.speaker
        return wire


@dataclass(frozen=True)
class Final:
    """The transcript of an ended utterance (finals go out in utterance order).

    Attributes:
        target_language: set for ``task == "translate"`` only.
        truncated: the engine's decode hit its token budget.
        words: the timed words, or ``None`` when the engine could not time them (the wire then
            says ``"timing": "utterance"``).
        confidence: the mean of the scored words (only with ``words``).
        speaker: the speaker label of a ``diarize`` final; ``speaker_turns`` when it changes inside.
    """

    utterance_id: int
    text: str
    start: float
    end: float
    language: str | None
    task: str
    target_language: str | None = None
    truncated: bool = False
    words: tuple[FinalWord, ...] | None = None
    confidence: float | None = None
    speaker: int | None = None
    speaker_turns: tuple[SpeakerTurn, ...] = ()
    channel: int | None = None

    def timing_wire(self) -> dict[str, Any]:
        """The wire fields that say how the final is timed: ``words`` (and ``confidence``) where
        the engine timed its words, else ``"timing": "utterance"`` (adapters reuse it)."""
        if self.words is None:
            return {"timing": "utterance"}
        timing: dict[str, Any] = {"words": [w.to_wire() for w in self.words]}
        if self.confidence is not None:
            timing["confidence"] = self.confidence
        return timing

    def to_wire(self) -> dict:
        wire: dict[str, Any] = {"type": "final", "utterance_id": self.utterance_id, "text": self.text,
                                "start": self.start, "end": self.end, "language": self.language, "task": self.task}
        if self.task == "translate":
            wire["target_language"] = self.target_language
        if self.truncated:
            wire["truncated"] = True
        wire.update(self.timing_wire())
        if self.speaker is not None:
            wire["speaker"] = self.speaker
            if self.speaker_turns:
                wire["speaker_turns"] = [t.to_wire() for t in self.speaker_turns]
        return _channel(wire, self.channel)


@dataclass(frozen=True)
class Error:
    """A problem, named by ``code`` (``docs/protocol.md`` lists them); ``fatal`` ones close the stream.

    ``utterance_id``/``start``/``end`` are set when an utterance could not be transcribed.
    """

    code: str
    message: str
    fatal: bool = False
    utterance_id: int | None = None
    start: float | None = None
    end: float | None = None
    channel: int | None = None

    def to_wire(self) -> dict:
        wire: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message, "fatal": self.fatal}
        if self.utterance_id is not None:
            wire.update(utterance_id=self.utterance_id, start=self.start, end=self.end)
        return _channel(wire, self.channel)


@dataclass(frozen=True)
class End:
    """The last event of a stream: how many utterances were finalized over how much audio."""

    utterances: int
    audio_seconds: float

    def to_wire(self) -> dict:
        return {"type": "end", "utterances": self.utterances, "audio_seconds": self.audio_seconds}


Event = Ready | Configured | SpeechStarted | SpeechEnded | Partial | Final | Error | End

__all__ = [
    "UNSET", "Audio", "Command", "ConfigChange", "Configure", "Configured", "End", "Error", "Event", "Final", "FinalWord", "Finalize", "Partial", "Ready",
    "SpeechEnded", "SpeechStarted", "Start", "Stop", "Unset", "VadChange",
]
