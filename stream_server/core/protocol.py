"""Wire protocol v1 at the edge: client text into typed commands, and message validation.

Everything here is pure: JSON text in, typed commands (:mod:`stream_server.core.events`) or
validated dataclasses (or :class:`ProtocolError`) out. Events become JSON through their own
``to_wire``. The session decides what to do with commands; the server only moves bytes. The
contract is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from vad import VadConfig

from stream_server.core.events import PROTOCOL_VERSION as PROTOCOL_VERSION  # re-exported: the version is part of the protocol
from stream_server.core.events import (
    UNSET, AudioFormat, Command, ConfigChange, Configure, Error, Finalize, Start, Stop, StreamConfig, VadChange,
)

ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw")
TASKS = ("transcribe", "translate")
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
MAX_CHANNELS = 8

# Error codes (the `code` field of `error` events); docs/protocol.md lists their meaning.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNKNOWN_TYPE = "unknown_type"
BAD_CONFIG = "bad_config"
BAD_AUDIO = "bad_audio"
NOT_STARTED = "not_started"
ALREADY_STARTED = "already_started"
TOO_LARGE = "too_large"
OVERLOADED = "overloaded"
INTERNAL = "internal"
UNAUTHORIZED = "unauthorized"
SESSION_LIMIT = "session_limit"
IDLE_TIMEOUT = "idle_timeout"
SHUTTING_DOWN = "shutting_down"


class ProtocolError(Exception):
    """A client message that cannot be accepted.

    Attributes:
        code: one of the error codes above.
        message: a sentence for humans naming what was wrong.
        fatal: whether the server closes the connection after reporting it.
        during: ``"start"`` or ``"configure"`` when a message of that type was refused for a
            check the session would otherwise make after its own state checks (its
            configuration fields; a start's audio ranges), so that the session can answer
            ``already_started``/``not_started`` first, as for a command that parsed; else ``None``.
        checked_first: with ``during``, the fields before the malformed one that need the
            session's configuration to be checked (a ``vad`` change before a malformed
            ``diarize``): the session checks them first, as it checked the fields in order.
    """

    def __init__(self, code: str, message: str, fatal: bool = False, during: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.during = during
        self.checked_first: ConfigChange | None = None

    def to_event(self) -> Error:
        """The ``error`` event reporting this problem."""
        return Error(self.code, self.message, self.fatal)


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


_CONFIG_FIELDS = {"task", "language", "target_language", "keywords", "partials", "partial_interval", "vad", "diarize"}
_VAD_FIELDS = {"silence_ms", "aggressiveness", "max_utterance_s"}
_AUDIO_FIELDS = {"encoding", "sample_rate", "channels"}
CLIENT_TYPES = ("start", "configure", "finalize", "stop")


def parse_message(text: str | bytes, limits: ProtocolLimits = ProtocolLimits()) -> dict:
    """Decode one JSON control message and check its envelope.

    Args:
        text: the text frame as received.
        limits: size bounds.

    Returns:
        The decoded object; ``obj["type"]`` is one of :data:`CLIENT_TYPES`.

    Raises:
        ProtocolError: ``too_large``, ``bad_json``, ``bad_message`` or ``unknown_type`` (all non-fatal).
    """
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > limits.max_text_bytes:
        raise ProtocolError(TOO_LARGE, f"control message of {size} bytes exceeds the limit of {limits.max_text_bytes}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_JSON, f"control message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, "control message must be a JSON object with a \"type\" field")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "control message has no string \"type\" field")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}; expected one of {list(CLIENT_TYPES)}")
    return obj


def parse_command(text: str | bytes, limits: ProtocolLimits = ProtocolLimits()) -> Command:
    """The edge for text: one JSON control message as the typed command it asks for.

    The envelope, the ``audio`` object's types and ``multichannel`` are checked here, and the
    configuration fields become a typed :class:`ConfigChange` (:func:`parse_config_change`: unknown
    names and wrong types are refused here); their values are checked by the session against the
    configuration they change (:func:`apply_config`), and an audio format's ranges by the session
    too (:func:`check_audio_format`).

    Raises:
        ProtocolError: as :func:`parse_message`, or ``bad_config`` for a malformed ``audio`` or
            ``multichannel`` of a ``start`` or malformed configuration fields (all non-fatal). For
            the configuration fields, :attr:`ProtocolError.during` names the message type; a
            ``start`` whose audio format is also out of range reports that first, as the session
            checks the audio before the configuration.
    """
    message = parse_message(text, limits)
    kind = message.pop("type")
    if kind == "start":
        multichannel = message.pop("multichannel", None)
        if multichannel is not None and not isinstance(multichannel, bool):
            raise ProtocolError(BAD_CONFIG, f"multichannel must be true or false, got {multichannel!r}")
        return parse_start(_audio_fields(message.pop("audio", None)), message, multichannel, limits)
    if kind == "configure":
        try:
            return Configure(parse_config_change(message, "configure", limits))
        except ProtocolError as exc:
            exc.during = "configure"
            raise
    if kind == "finalize":
        return Finalize()
    return Stop()


def parse_start(audio: AudioFormat, fields: dict, multichannel: bool | None = None,
                limits: ProtocolLimits = ProtocolLimits()) -> Start:
    """A ``start`` from its audio format and its configuration fields in wire form (JSON from a
    client: the native message, or an adapter's foreign parameters).

    Raises:
        ProtocolError: ``bad_config`` for malformed configuration fields (:func:`parse_config_change`),
            with :attr:`~ProtocolError.during` ``"start"``; when the audio format is also out of
            range, that is reported instead, as the session checks the audio before the configuration.
    """
    try:
        options = parse_config_change(fields, "start", limits)
    except ProtocolError as exc:
        try:
            check_audio_format(audio)
        except ProtocolError as audio_exc:
            audio_exc.during = "start"
            raise audio_exc from None
        exc.during = "start"
        raise
    return Start(audio, options, multichannel)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_audio_format(obj: Any) -> AudioFormat:
    """Validate the ``audio`` object of ``start``.

    Raises:
        ProtocolError: ``bad_config`` naming the offending field.
    """
    return check_audio_format(_audio_fields(obj))


def _audio_fields(obj: Any) -> AudioFormat:
    """The ``audio`` object's fields, type-checked (not range-checked: :func:`check_audio_format`)."""
    if obj is None:
        return AudioFormat()
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_CONFIG, "\"audio\" must be an object")
    _reject_unknown(obj, _AUDIO_FIELDS, "audio")
    encoding = obj.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str):
        raise ProtocolError(BAD_CONFIG, f"audio.encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    rate = _int_field(obj, "sample_rate", 16_000, "audio.sample_rate")
    channels = _int_field(obj, "channels", 1, "audio.channels")
    return AudioFormat(encoding, rate, channels)


def check_audio_format(fmt: AudioFormat) -> AudioFormat:
    """``fmt`` if the server accepts it (the encodings and the ranges of rate and channels).

    Raises:
        ProtocolError: ``bad_config`` naming the offending field.
    """
    encoding, rate, channels = fmt.encoding, fmt.sample_rate, fmt.channels
    if encoding not in ENCODINGS:
        raise ProtocolError(BAD_CONFIG, f"audio.encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            BAD_CONFIG, f"audio.sample_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got {rate}"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError(BAD_CONFIG, f"audio.channels must be between 1 and {MAX_CHANNELS}, got {channels}")
    return fmt


def parse_config_change(obj: dict, where: str, limits: ProtocolLimits = ProtocolLimits()) -> ConfigChange:
    """The JSON edge of a configuration change: the configuration fields of a decoded
    ``start``/``configure`` message (without its ``type``, ``audio`` and ``multichannel``) as a
    typed :class:`ConfigChange` holding the values as sent.

    Every check that needs no current configuration runs here, field by field in protocol order,
    so that the first fault of a message is the one named, as when the session checked the JSON;
    :func:`apply_config` repeats the value checks (a change may come from an adapter) and checks
    a ``vad`` change together with the VAD settings it overlays.

    Args:
        obj: the message's remaining fields.
        where: the message type, for the error naming unknown fields.
        limits: bounds on keywords and utterance length.

    Raises:
        ProtocolError: ``bad_config`` naming the first offending field (unknown names first; non-fatal).
    """
    _reject_unknown(obj, _CONFIG_FIELDS, where)
    changes: dict[str, Any] = {}
    if "task" in obj:
        _task(obj["task"])
        changes["task"] = obj["task"]
    for name in ("language", "target_language"):
        if name in obj:
            _language(name, obj[name])
            changes[name] = obj[name]
    if "keywords" in obj:
        _keywords(obj["keywords"], limits)
        changes["keywords"] = tuple(obj["keywords"])
    if "partials" in obj:
        _partials(obj["partials"])
        changes["partials"] = obj["partials"]
    if "partial_interval" in obj:
        _partial_interval(obj["partial_interval"])
        changes["partial_interval"] = obj["partial_interval"]
    if "vad" in obj:
        changes["vad"] = _parse_vad_change(obj["vad"], limits)
    if "diarize" in obj:
        try:
            changes["diarize"] = _diarize(obj["diarize"])
        except ProtocolError as exc:
            if "vad" in changes:  # checked with the VAD settings it overlays, by the session, before this
                exc.checked_first = ConfigChange(vad=changes["vad"])
            raise
    return ConfigChange(**changes)


def _parse_vad_change(obj: Any, limits: ProtocolLimits) -> VadChange:
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_CONFIG, "\"vad\" must be an object")
    _reject_unknown(obj, _VAD_FIELDS, "vad")
    changes: dict[str, Any] = {}
    if "silence_ms" in obj:
        changes["silence_ms"] = _int_field(obj, "silence_ms", 0, "vad.silence_ms")
    if "aggressiveness" in obj:
        changes["aggressiveness"] = _int_field(obj, "aggressiveness", 0, "vad.aggressiveness")
    if "max_utterance_s" in obj:
        _max_utterance_s(obj["max_utterance_s"], limits)
        changes["max_utterance_s"] = obj["max_utterance_s"]
    return VadChange(**changes)


def apply_config(change: ConfigChange, base: StreamConfig, limits: ProtocolLimits = ProtocolLimits()) -> StreamConfig:
    """Overlay a ``start``/``configure``'s configuration change onto ``base``.

    Args:
        change: the fields given (from :func:`parse_config_change`, or built by an adapter).
        base: the configuration fields not given keep.
        limits: bounds on keywords and utterance length.

    Returns:
        A new, validated :class:`StreamConfig` (languages lower-cased, keywords' whitespace
        normalised and repeats dropped, ``partials: true`` as ``"llm"``).

    Raises:
        ProtocolError: ``bad_config`` naming the first offending field, in protocol order; a
            ``vad`` change is checked as a whole with the fields of ``base.vad`` it keeps (non-fatal).
    """
    changes: dict[str, Any] = {}
    if change.task is not None:
        changes["task"] = _task(change.task)
    if change.language is not UNSET:
        changes["language"] = _language("language", change.language)
    if change.target_language is not UNSET:
        changes["target_language"] = _language("target_language", change.target_language)
    if change.keywords is not None:
        changes["keywords"] = _keywords(list(change.keywords), limits)
    if change.partials is not None:
        changes["partials"] = _partials(change.partials)
    if change.partial_interval is not None:
        changes["partial_interval"] = _partial_interval(change.partial_interval)
    if change.vad is not None:
        changes["vad"] = _apply_vad(change.vad, base.vad, limits)
    if change.diarize is not None:
        changes["diarize"] = _diarize(change.diarize)
    return replace(base, **changes)


def _apply_vad(change: VadChange, base: VadConfig, limits: ProtocolLimits) -> VadConfig:
    changes: dict[str, Any] = {}
    if change.silence_ms is not None:
        changes["silence_ms"] = change.silence_ms
    if change.aggressiveness is not None:
        changes["aggressiveness"] = change.aggressiveness
    if change.max_utterance_s is not None:
        changes["max_utterance_s"] = _max_utterance_s(change.max_utterance_s, limits)
    config = replace(base, **changes)
    try:
        config.validate()
    except ValueError as exc:
        raise ProtocolError(BAD_CONFIG, f"vad: {exc}") from None
    return config


# One check per field, of its type and value together (as the fields' order on the wire names the
# first fault): the edge runs them on JSON values, the session on a change's typed ones. Each
# returns the value the configuration keeps.


def _task(value: Any) -> str:
    if not isinstance(value, str) or value not in TASKS:
        raise ProtocolError(BAD_CONFIG, f"task must be one of {list(TASKS)}, got {value!r}")
    return value


def _language(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not _is_language_code(value)):
        raise ProtocolError(BAD_CONFIG, f"{name} must be a language code such as \"en\" or null, got {value!r}")
    return value.lower() if isinstance(value, str) else None


def _keywords(value: Any, limits: ProtocolLimits) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ProtocolError(BAD_CONFIG, "keywords must be a list of strings")
    if len(value) > limits.max_keywords:
        raise ProtocolError(BAD_CONFIG, f"at most {limits.max_keywords} keywords are allowed, got {len(value)}")
    keywords: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ProtocolError(BAD_CONFIG, f"keywords must be strings, got {type(item).__name__}")
        word = " ".join(item.split())
        if not word:
            raise ProtocolError(BAD_CONFIG, "keywords must not be empty")
        if len(word) > limits.max_keyword_chars:
            raise ProtocolError(BAD_CONFIG, f"keyword {word[:20]!r}… is longer than {limits.max_keyword_chars} characters")
        if any(not ch.isprintable() for ch in word) or "," in word:
            raise ProtocolError(BAD_CONFIG, f"keyword {word[:20]!r} contains a comma or a control character")
        if word not in keywords:
            keywords.append(word)
    return tuple(keywords)


def _partials(value: Any) -> str | Literal[False]:
    mode = "llm" if value is True else value
    if mode is not False and mode not in ("llm", "ctc"):
        raise ProtocolError(BAD_CONFIG, f"partials must be true, false, \"llm\" or \"ctc\", got {value!r}")
    return mode


def _partial_interval(value: Any) -> float:
    if not _is_number(value) or not 0.2 <= value <= 10.0:
        raise ProtocolError(BAD_CONFIG, f"partial_interval must be a number of seconds in [0.2, 10], got {value!r}")
    return float(value)


def _max_utterance_s(value: Any, limits: ProtocolLimits) -> float:
    if not _is_number(value) or not 1.0 <= value <= limits.max_utterance_s:
        raise ProtocolError(BAD_CONFIG, f"vad.max_utterance_s must be a number in [1, {limits.max_utterance_s}], got {value!r}")
    return float(value)


def _diarize(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(BAD_CONFIG, f"diarize must be true or false, got {value!r}")
    return value


def _reject_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(BAD_CONFIG, f"unknown field(s) in {where}: {', '.join(map(str, unknown))[:200]}")


def _int_field(obj: dict, key: str, default: int, label: str) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(BAD_CONFIG, f"{label} must be an integer, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_language_code(value: str) -> bool:
    return 2 <= len(value) <= 3 and value.isascii() and value.isalpha()


def round_time(seconds: float) -> float:
    """Times on the wire are seconds with millisecond resolution."""
    return round(seconds, 3)
