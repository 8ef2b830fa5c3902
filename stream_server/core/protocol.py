"""Wire protocol v1 at the edge: client text into typed commands, and message validation.

Everything here is pure: JSON text in, typed commands (:mod:`stream_server.core.events`) or
validated dataclasses (or :class:`ProtocolError`) out. Events become JSON through their own
``to_wire``. The session decides what to do with commands; the server only moves bytes. The
contract is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

from vad import brief

# re-exported: the version, the tasks and the limits are part of the protocol
from stream_server.core.events import PROTOCOL_VERSION as PROTOCOL_VERSION
from stream_server.core.events import TASKS as TASKS
from stream_server.core.events import ProtocolLimits as ProtocolLimits
from stream_server.core.events import (
    AudioFormat, Command, ConfigChange, Configure, Error, Finalize, Start, Stop, StreamConfig, check_int, given, wire_value,
)

ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw")
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
            raise ProtocolError(BAD_CONFIG, f"multichannel must be true or false, got {brief(multichannel)}")
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
        raise ProtocolError(BAD_CONFIG, f"audio.encoding must be one of {list(ENCODINGS)}, got {brief(encoding)}")
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
        raise ProtocolError(BAD_CONFIG, f"audio.encoding must be one of {list(ENCODINGS)}, got {brief(encoding)}")
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

    Every check that needs no current configuration runs here, field by field in protocol order
    (the fields' rules, :func:`stream_server.core.events.rule`), so that the first fault of a
    message is the one named, as when the session checked the JSON; :func:`apply_config` repeats
    the value checks (a change may come from an adapter) and checks a ``vad`` change together with
    the VAD settings it overlays.

    Args:
        obj: the message's remaining fields.
        where: the message type, for the error naming unknown fields.
        limits: bounds on keywords and utterance length.

    Raises:
        ProtocolError: ``bad_config`` naming the first offending field (unknown names first; non-fatal).
    """
    return _parse_fields(ConfigChange, obj, where, "", limits)


def _parse_fields(cls: type, obj: dict, where: str, prefix: str, limits: ProtocolLimits) -> Any:
    """``cls`` (a change) from the JSON object ``obj``, each field checked by its rules, in order."""
    declared = {f.name: f for f in fields(cls)}
    _reject_unknown(obj, set(declared), where)
    changes: dict[str, Any] = {}
    for f in declared.values():
        if f.name not in obj:
            continue
        value, rules = obj[f.name], f.metadata
        try:
            if rules["nested"] is not None:
                if not isinstance(value, dict):
                    raise ProtocolError(BAD_CONFIG, f"\"{prefix}{f.name}\" must be an object")
                changes[f.name] = _parse_fields(rules["nested"], value, f.name, f"{prefix}{f.name}.", limits)
                continue
            _check(rules["json_check"] or rules["check"], prefix + f.name, value, limits)
            changes[f.name] = value if rules["from_json"] is None else rules["from_json"](value)
        except ProtocolError as exc:
            # A nested change before the malformed field is checked with the settings it overlays,
            # by the session, before this fault (as it checked the fields in order).
            overlays = {name: change for name, change in changes.items() if declared[name].metadata["nested"]}
            if overlays and exc.checked_first is None:
                exc.checked_first = cls(**overlays)
            raise
    return cls(**changes)


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
    return _apply_fields(change, base, "", limits)


def _apply_fields(change: Any, base: Any, prefix: str, limits: ProtocolLimits) -> Any:
    """``base`` with the fields ``change`` gives, each checked by its rules, in order; a nested
    change overlays its own base, which checks the result as a whole (``validate()``)."""
    changes: dict[str, Any] = {}
    for f, value in given(change):
        name = prefix + f.name
        if f.metadata["nested"] is not None:
            changes[f.name] = _apply_fields(value, getattr(base, f.name), f"{name}.", limits)
        elif f.metadata["check"] is not None:
            changes[f.name] = _check(f.metadata["check"], name, wire_value(f, value), limits)
        else:
            changes[f.name] = value
    config = replace(base, **changes)
    if prefix:
        try:
            config.validate()
        except ValueError as exc:
            raise ProtocolError(BAD_CONFIG, f"{prefix[:-1]}: {exc}") from None
    return config


def _check(check: Any, label: str, value: Any, limits: ProtocolLimits) -> Any:
    """A field's rule (:mod:`stream_server.core.events`): the value it keeps, or ``bad_config``."""
    try:
        return check(label, value, limits)
    except ValueError as exc:
        raise ProtocolError(BAD_CONFIG, str(exc)) from None


def _reject_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(BAD_CONFIG, f"unknown field(s) in {where}: {', '.join(map(str, unknown))[:200]}")


def _int_field(obj: dict, key: str, default: int, label: str) -> int:
    return _check(check_int, label, obj.get(key, default), ProtocolLimits())


def round_time(seconds: float) -> float:
    """Times on the wire are seconds with millisecond resolution."""
    return round(seconds, 3)
