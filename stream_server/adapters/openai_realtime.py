"""OpenAI Realtime API, transcription sessions, at ``/v1/realtime`` (drop-in for the ``openai`` SDK).

The published shapes are those of the ``openai`` Python SDK's ``types.realtime`` (GA) module:
``session.update`` with ``session.type = "transcription"`` answered by ``session.updated``;
``input_audio_buffer.append``/``commit``/``clear``; server events ``session.created``,
``input_audio_buffer.speech_started``/``speech_stopped``/``committed``/``cleared``,
``conversation.item.input_audio_transcription.delta``/``completed``/``failed`` and ``error``.
The beta ``transcription_session.update`` (``input_audio_format: "pcm16"``…) is accepted too and
answered by ``transcription_session.updated``.

Translation (one native session, opened at the first audio):

* the input format becomes the native ``start``'s ``audio`` (``audio/pcm`` → ``pcm_s16le`` at the
  declared rate, 24 kHz by default; ``audio/pcmu`` → ``mulaw`` 8 kHz; ``audio/pcma`` is expanded
  to 16-bit PCM here, since protocol v1 has no A-law); ``transcription.language`` → ``language``;
  ``transcription.keywords`` and the comma-separated terms of ``transcription.prompt`` (the
  ``whisper-1`` convention) → ``keywords``; ``turn_detection.silence_duration_ms`` →
  ``vad.silence_ms`` and ``threshold`` → ``vad.aggressiveness`` (0–.25 → 0 … .75–1 → 3);
* with ``server_vad`` every native utterance is one conversation item: ``speech_started`` →
  ``input_audio_buffer.speech_started``; the VAD's end of speech → ``speech_stopped`` and
  ``committed``; the growth of a partial's ``stable_text`` → a ``delta`` (deltas are append-only,
  so only words that will not change are sent); the ``final`` → a last ``delta`` with the rest and
  ``completed`` (its ``transcript`` is exactly the concatenation of the deltas);
* with ``turn_detection: null`` the client's ``commit`` delimits items: the native VAD still runs
  (with a 5 s silence), ``commit`` sends a native ``finalize``, and the item's transcript is the
  finals of the utterances since the previous commit, joined;
* ``clear`` drops the current item (native ``finalize``; its transcript is not sent).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from stream_server.inference.types import EngineCapabilities
from stream_server.core.protocol import StreamConfig
from stream_server.core.session import Send, Session, SessionSettings, State
from stream_server.adapters.base import Hangup, OpenStream, Out, Reply, StreamCommand, alaw_to_pcm16, audio_chunks, decode_base64, new_id, query_params
from stream_server.core.events import AudioFormat, ConfigChange, Configure, Configured, Error, Event, Final, FinalWord, Finalize, Partial, SpeechEnded, SpeechStarted, Start, VadChange

ROUTE = "/v1/realtime"
KEY = "main"

_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
_BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
LOGPROBS = "item.input_audio_transcription.logprobs"
_MIN_COMMIT_S = 0.1  # the API refuses to commit less than 100 ms of audio
_MANUAL_SILENCE_MS = 5000  # turn_detection null: the native VAD only splits very long pauses
_CONVERSATION_EVENTS = (
    "conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
    "conversation.item.truncate", "response.create", "response.cancel", "output_audio_buffer.clear",
)
_CLIENT_ERRORS = {
    "bad_config", "bad_audio", "too_large", "bad_message", "bad_json", "unknown_type", "not_started",
    "already_started", "session_limit", "idle_timeout",
}


class ApiError(Exception):
    """An ``error`` event for a client event that cannot be applied."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


@dataclass(frozen=True)
class TranscriptionConfig:
    """The effective transcription-session settings, in API terms."""

    format_type: str = "audio/pcm"
    rate: int = 24_000
    model: str = "whisper-1"
    language: str | None = "en"
    prompt: str = ""
    keywords: tuple[str, ...] = ()
    turn_detection: dict | None = field(default_factory=lambda: {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
    })
    delay: str | None = None
    logprobs: bool = False  # include: ["item.input_audio_transcription.logprobs"]

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def native_audio(self) -> dict:
        if self.format_type == "audio/pcmu":
            return {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}
        if self.format_type == "audio/pcma":  # expanded to 16-bit PCM by the adapter
            return {"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1}
        return {"encoding": "pcm_s16le", "sample_rate": self.rate, "channels": 1}

    @property
    def bytes_per_second(self) -> int:
        return 8000 if self.format_type in ("audio/pcmu", "audio/pcma") else 2 * self.rate

    def native_settings(self, max_utterance_s: float) -> ConfigChange:
        """The protocol v1 ``configure`` fields (``start`` adds ``audio``)."""
        keywords = list(self.keywords) + [t.strip() for t in self.prompt.replace("\n", ",").split(",") if t.strip()]
        if self.manual:
            vad = VadChange(silence_ms=_MANUAL_SILENCE_MS, max_utterance_s=max_utterance_s)
        else:
            td = self.turn_detection or {}
            vad = VadChange(silence_ms=td.get("silence_duration_ms", 500),
                            aggressiveness=min(3, int(float(td.get("threshold", 0.5)) * 4)))
        return ConfigChange(language=self.language, keywords=tuple(dict.fromkeys(keywords)), partials=True, vad=vad)

    def session_object(self, session_id: str) -> dict:
        """The GA ``session`` object (``RealtimeTranscriptionSessionCreateRequest`` plus id/object)."""
        fmt: dict[str, Any] = {"type": self.format_type}
        if self.format_type == "audio/pcm":
            fmt["rate"] = self.rate
        transcription: dict[str, Any] = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if self.keywords:
            transcription["keywords"] = list(self.keywords)
        if self.delay is not None:
            transcription["delay"] = self.delay
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "audio": {"input": {
                "format": fmt, "transcription": transcription, "noise_reduction": None,
                "turn_detection": copy.deepcopy(self.turn_detection),
            }},
            "include": [LOGPROBS] if self.logprobs else [],
        }

    def beta_session_object(self, session_id: str) -> dict:
        """The beta ``transcription_session`` object."""
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": {v: k for k, v in _BETA_FORMATS.items()}[self.format_type],
            "input_audio_transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
            "turn_detection": copy.deepcopy(self.turn_detection),
            "input_audio_noise_reduction": None,
            "include": [LOGPROBS] if self.logprobs else [],
            "modalities": ["text"],
        }


@dataclass
class _Item:
    item_id: str
    start: float
    utterances: list[int] = field(default_factory=list)
    finals: dict[int, str] = field(default_factory=dict)
    words: dict[int, Sequence[FinalWord]] = field(default_factory=dict)  # the finals' timed words, where given
    failed: Error | None = None
    emitted: str = ""  # the deltas sent so far, concatenated
    end: float | None = None
    stopped: bool = False  # speech_stopped/committed sent (server VAD)
    committed: bool = False
    discarded: bool = False


class RealtimeTranscriptionTranslator:
    """One ``/v1/realtime`` connection (sans-I/O).

    Args:
        capabilities: the engine's, for validating ``session.update`` before audio flows.
        settings: the server's session settings (frame and keyword limits, defaults).
        query: the connection's query parameters (``intent``, ``model``), as lists.
    """

    def __init__(self, capabilities: EngineCapabilities, settings: SessionSettings = SessionSettings(),
                 query: dict[str, list[str]] | None = None):
        self.capabilities = capabilities
        self.settings = settings
        self.query = query or {}
        defaults: StreamConfig = settings.default_config
        self.config = TranscriptionConfig(model=capabilities.model, language=defaults.language)
        self.session_id = new_id("sess_")
        self.started = False  # the native session is open
        self.position = 0.0  # seconds of audio appended
        self.commit_point = 0.0  # where the uncommitted part of the buffer begins
        self.closed = False
        self._items: dict[int, _Item] = {}  # native utterance id → item
        self._utterance_start: dict[int, float] = {}
        self._current: _Item | None = None
        self._previous_item_id: str | None = None
        self._pending: tuple[TranscriptionConfig, str, str | None] | None = None  # config, reply type, event_id

    # ---- connection -----------------------------------------------------------------------------

    def opened(self) -> list[Out]:
        return [self._event("session.created", session=self.config.session_object(self.session_id))]

    def client_bytes(self, data: bytes) -> list[Out]:
        return [self._error(ApiError(
            "binary frames are not part of the Realtime API; send audio as base64 in input_audio_buffer.append",
            code="invalid_request", param=None))]

    def client_text(self, text: str) -> list[Out]:
        event_id = None
        try:
            try:
                message = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise ApiError(f"the event is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ApiError("the event must be a JSON object with a string 'type'",
                               code="missing_required_parameter", param="type")
            event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
            kind = message["type"]
            if kind == "session.update":
                return self._session_update(message, beta=False, event_id=event_id)
            if kind == "transcription_session.update":
                return self._session_update(message, beta=True, event_id=event_id)
            if kind == "input_audio_buffer.append":
                return self._append(message)
            if kind == "input_audio_buffer.commit":
                return self._commit()
            if kind == "input_audio_buffer.clear":
                return self._clear()
            if kind in _CONVERSATION_EVENTS:
                raise ApiError(f"'{kind}' is not supported in a transcription session", param="type")
            raise ApiError(f"Invalid value: '{kind[:60]}'. This server supports session.update, "
                           "transcription_session.update and input_audio_buffer.append/commit/clear.", param="type")
        except ApiError as exc:
            return [self._error(exc, event_id)]

    # ---- session configuration ------------------------------------------------------------------

    def _session_update(self, message: dict, beta: bool, event_id: str | None) -> list[Out]:
        session = message.get("session")
        if not isinstance(session, dict):
            raise ApiError("'session' must be an object", code="missing_required_parameter", param="session")
        candidate = _parse_beta_session(session, self.config) if beta else _parse_session(session, self.config)
        reply = "transcription_session.updated" if beta else "session.updated"
        problem = self._check_native(candidate)
        if problem:
            raise ApiError(problem, param="session")
        if not self.started:
            self.config = candidate
            return [self._updated(reply)]
        if candidate.native_audio != self.config.native_audio or candidate.format_type != self.config.format_type:
            raise ApiError("the input audio format cannot change after audio was appended; open a new connection",
                           param="session.audio.input.format")
        if candidate.manual != self.config.manual:
            raise ApiError("turn_detection cannot switch between server_vad and null after audio was appended; "
                           "open a new connection", param="session.audio.input.turn_detection")
        self._pending = (candidate, reply, event_id)
        return [StreamCommand(KEY, Configure(candidate.native_settings(self.settings.limits.max_utterance_s)))]

    def _check_native(self, config: TranscriptionConfig) -> str | None:
        """Validate against the engine and the server limits exactly as the native session will."""
        probe = Session("probe", self.capabilities, self.settings)
        actions = probe.handle(self._start_command(config))
        if probe.state == State.STREAMING:
            return None
        errors = [a.event.message for a in actions if isinstance(a, Send) and isinstance(a.event, Error)]
        return errors[0] if errors else "the session settings were not accepted"

    def _start_command(self, config: TranscriptionConfig) -> Start:
        return Start(AudioFormat(**config.native_audio), config.native_settings(self.settings.limits.max_utterance_s))

    def _updated(self, reply: str) -> Reply:
        if reply == "transcription_session.updated":
            return self._event(reply, session=self.config.beta_session_object(self.session_id))
        return self._event(reply, session=self.config.session_object(self.session_id))

    # ---- audio buffer ---------------------------------------------------------------------------

    def _append(self, message: dict) -> list[Out]:
        data = decode_base64(message.get("audio"))
        if data is None:
            raise ApiError("Invalid 'audio': expected base64-encoded audio bytes", param="audio")
        outs: list[Out] = []
        if not self.started:
            self.started = True
            outs += [OpenStream(KEY), StreamCommand(KEY, self._start_command(self.config))]
        if not data:
            return outs
        self.position += len(data) / self.config.bytes_per_second
        if self.config.format_type == "audio/pcma":
            data = alaw_to_pcm16(data)
        sample_bytes = 2 if self.config.native_audio["encoding"] == "pcm_s16le" else 1
        return outs + audio_chunks(KEY, data, self.settings.max_frame_bytes, sample_bytes)

    def _commit(self) -> list[Out]:
        uncommitted = self.position - self.commit_point
        if not self.config.manual:
            if self._current is not None:  # speech in progress: end it now (speech_stopped/committed follow)
                return [StreamCommand(KEY, Finalize())]
            if uncommitted < _MIN_COMMIT_S:
                raise self._commit_empty(uncommitted)
            item = _Item(new_id("item_", 22), self.commit_point)  # no speech in the buffer: an empty item
            item.end = self.position
            return self._commit_item(item)
        current = self._current
        if current is None:
            if uncommitted < _MIN_COMMIT_S:
                raise self._commit_empty(uncommitted)
            current = _Item(new_id("item_", 22), self.commit_point)
        item = current
        self._current = None
        item.end = self.position
        committed = self._commit_item(item, complete=False)
        finalize: list[Out] = [StreamCommand(KEY, Finalize())] if self.started else []
        # committed goes out before anything the finalize may produce; then the item completes
        # now if all its utterances are already final, else when the last final arrives.
        return committed + finalize + self._maybe_complete(item)

    @staticmethod
    def _commit_empty(seconds: float) -> ApiError:
        return ApiError(
            "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
            f"but buffer only has {seconds * 1000:.2f}ms of audio.", code="input_audio_buffer_commit_empty")

    def _commit_item(self, item: _Item, complete: bool = True) -> list[Out]:
        item.committed = True
        self.commit_point = max(self.commit_point, item.end if item.end is not None else self.position)
        outs: list[Out] = [self._event("input_audio_buffer.committed", previous_item_id=self._previous_item_id,
                                       item_id=item.item_id)]
        self._previous_item_id = item.item_id
        return outs + (self._maybe_complete(item) if complete else [])

    def _clear(self) -> list[Out]:
        outs: list[Out] = []
        if self._current is not None:
            self._current.discarded = True
            self._current = None
            outs.append(StreamCommand(KEY, Finalize()))
        self.commit_point = self.position
        return outs + [self._event("input_audio_buffer.cleared")]

    # ---- native events --------------------------------------------------------------------------

    def native_event(self, key: str, event: Event) -> list[Out]:
        match event:
            case SpeechStarted():
                return self._speech_started(event)
            case SpeechEnded():
                return self._speech_ended(event)
            case Partial():
                item = self._items.get(event.utterance_id)
                return [] if item is None else self._deltas(item, event.utterance_id, event.stable_text)
            case Final():
                return self._final(event)
            case Configured():
                if self._pending is None:
                    return []
                self.config, reply, _ = self._pending
                self._pending = None
                return [self._updated(reply)]
            case Error():
                return self._native_error(event)
        return []  # ready, end: nothing to say in this protocol

    def native_closed(self, key: str, code: int, reason: str) -> list[Out]:
        self.closed = True
        return [Hangup(code, reason)]

    def _speech_ended(self, event: SpeechEnded) -> list[Out]:
        item = self._items.get(event.utterance_id)
        if item is None or self.config.manual or item.discarded or item.stopped:
            return []
        return self._speech_stopped(item, event.end)

    def _speech_started(self, event: SpeechStarted) -> list[Out]:
        uid, start = event.utterance_id, event.start
        self._utterance_start[uid] = start
        if self.config.manual:
            if self._current is None:
                self._current = _Item(new_id("item_", 22), start)
            self._current.utterances.append(uid)
            self._items[uid] = self._current
            return []
        item = _Item(new_id("item_", 22), start, utterances=[uid])
        self._items[uid] = item
        self._current = item
        return [self._event("input_audio_buffer.speech_started", audio_start_ms=round(start * 1000),
                            item_id=item.item_id)]

    def _speech_stopped(self, item: _Item, end: float) -> list[Out]:
        item.stopped = True
        item.end = end
        if self._current is item:
            self._current = None
        outs: list[Out] = [self._event("input_audio_buffer.speech_stopped", audio_end_ms=round(end * 1000),
                                       item_id=item.item_id)]
        return outs + self._commit_item(item)

    def _final(self, event: Final) -> list[Out]:
        uid = event.utterance_id
        item = self._items.get(uid)
        if item is None:
            return []
        # Every final follows its utterance's speech_ended (the session sends one for each ended
        # utterance, drains included), so the item is already stopped and committed here.
        item.finals[uid] = event.text
        if event.words is not None:
            item.words[uid] = event.words
        outs: list[Out] = [] if item.discarded else self._deltas(item, uid, event.text, final=True)
        return outs + self._maybe_complete(item)

    def _native_error(self, event: Error) -> list[Out]:
        uid = event.utterance_id
        if uid is not None and uid in self._items:
            item = self._items[uid]
            item.failed = event
            item.finals[uid] = ""
            return self._maybe_complete(item)
        pending = self._pending
        if pending is not None and event.code == "bad_config":
            self._pending = None
            return [self._error(ApiError(event.message, param="session"), pending[2])]
        kind = "invalid_request_error" if event.code in _CLIENT_ERRORS else "server_error"
        return [self._error(ApiError(event.message, code=event.code, kind=kind))]

    # ---- transcript assembly --------------------------------------------------------------------

    def _prefix(self, item: _Item, uid: int) -> str | None:
        """The item's transcript before utterance ``uid``; ``None`` while an earlier one is not final."""
        parts = []
        for earlier in item.utterances:
            if earlier == uid:
                break
            if earlier not in item.finals:
                return None
            if item.finals[earlier]:
                parts.append(item.finals[earlier])
        text = " ".join(parts)
        return text + " " if text else ""

    def _deltas(self, item: _Item, uid: int, text: str, final: bool = False) -> list[Out]:
        if item.discarded or not text:
            return []
        prefix = self._prefix(item, uid)
        if prefix is None:
            return []
        candidate = prefix + text
        if not candidate.startswith(item.emitted) or len(candidate) == len(item.emitted):
            return []
        delta = candidate[len(item.emitted):]
        item.emitted = candidate
        return [self._event("conversation.item.input_audio_transcription.delta", item_id=item.item_id,
                            content_index=0, delta=delta)]

    def _maybe_complete(self, item: _Item) -> list[Out]:
        if not item.committed or item.discarded or any(u not in item.finals for u in item.utterances):
            if item.discarded and all(u in item.finals for u in item.utterances):
                self._forget(item)
            return []
        self._forget(item)
        if item.failed is not None:
            return [self._event("conversation.item.input_audio_transcription.failed", item_id=item.item_id,
                                content_index=0, error={"type": "server_error", "code": item.failed.code,
                                                        "message": item.failed.message, "param": None})]
        transcript = " ".join(t for t in (item.finals[u] for u in item.utterances) if t)
        outs: list[Out] = []
        if transcript != item.emitted and transcript.startswith(item.emitted):
            outs.append(self._event("conversation.item.input_audio_transcription.delta", item_id=item.item_id,
                                    content_index=0, delta=transcript[len(item.emitted):]))
        seconds = max(0.0, (item.end if item.end is not None else self.position) - item.start)
        extra: dict[str, Any] = {}
        if self.config.logprobs:
            extra["logprobs"] = _logprobs(item)
        outs.append(self._event("conversation.item.input_audio_transcription.completed", item_id=item.item_id,
                                content_index=0, transcript=transcript,
                                usage={"type": "duration", "seconds": round(seconds, 3)}, **extra))
        return outs

    def _forget(self, item: _Item) -> None:
        for uid in item.utterances:
            self._items.pop(uid, None)
            self._utterance_start.pop(uid, None)

    # ---- server events --------------------------------------------------------------------------

    @staticmethod
    def _event(kind: str, **fields: Any) -> Reply:
        return Reply({"type": kind, "event_id": new_id("event_"), **fields})

    def _error(self, exc: ApiError, event_id: str | None = None) -> Reply:
        return self._event("error", error={"type": exc.kind, "code": exc.code, "message": exc.message,
                                           "param": exc.param, "event_id": event_id})


def _logprobs(item: _Item) -> list[dict] | None:
    """The item's ``logprobs``: one entry per scored word of its finals, in order, the token being the
    word with its leading space as in the transcript. ``None`` when no final of the item was scored
    (translations, engines that do not time words); unscored words (kept from stable text) are left
    out."""
    entries: list[dict] = []
    scored = False
    for uid in item.utterances:
        for word in item.words.get(uid) or ():
            if word.confidence is None:
                continue
            scored = True
            token = (" " if entries else "") + word.word
            entries.append({"token": token, "bytes": list(token.encode("utf-8")),
                            "logprob": round(math.log(max(word.confidence, 1e-6)), 4)})
    return entries if scored else None


# ---- session.update parsing -----------------------------------------------------------------------


def _reject_unknown(obj: dict, allowed: set[str], where: str) -> None:
    for name in obj:
        if name not in allowed:
            raise ApiError(f"Unknown parameter: '{where}.{name}'.", code="unknown_parameter", param=f"{where}.{name}")


def _parse_session(session: dict, base: TranscriptionConfig) -> TranscriptionConfig:
    """Overlay a GA ``session.update``'s ``session`` onto ``base``."""
    _reject_unknown(session, {"type", "audio", "include", "id", "object", "expires_at"}, "session")
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise ApiError(f"this server offers transcription sessions only (session.type 'transcription'), got {kind!r}",
                       param="session.type")
    config = base
    audio = session.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise ApiError("'session.audio' must be an object", param="session.audio")
        _reject_unknown(audio, {"input"}, "session.audio")
        source = audio.get("input")
        if source is not None:
            if not isinstance(source, dict):
                raise ApiError("'session.audio.input' must be an object", param="session.audio.input")
            where = "session.audio.input"
            _reject_unknown(source, {"format", "transcription", "noise_reduction", "turn_detection"}, where)
            if "format" in source:
                config = _parse_format(source["format"], config, f"{where}.format")
            if "transcription" in source:
                config = _parse_transcription(source["transcription"], config, f"{where}.transcription")
            if "noise_reduction" in source and source["noise_reduction"] is not None:
                if not isinstance(source["noise_reduction"], dict):
                    raise ApiError("'noise_reduction' must be an object or null", param=f"{where}.noise_reduction")
            if "turn_detection" in source:
                config = _parse_turn_detection(source["turn_detection"], config, f"{where}.turn_detection")
    return _parse_include(session, config)


def _parse_include(session: dict, config: TranscriptionConfig) -> TranscriptionConfig:
    include = session.get("include")
    if include is None:
        return config
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise ApiError("'session.include' must be a list of strings", param="session.include")
    unknown = [x for x in include if x != LOGPROBS]
    if unknown:
        raise ApiError(f"Invalid value: {unknown[0]!r}. Supported values are: '{LOGPROBS}'.", param="session.include")
    return replace(config, logprobs=LOGPROBS in include)


def _parse_beta_session(session: dict, base: TranscriptionConfig) -> TranscriptionConfig:
    """Overlay a beta ``transcription_session.update``'s ``session`` onto ``base``."""
    _reject_unknown(session, {"input_audio_format", "input_audio_transcription", "turn_detection",
                              "input_audio_noise_reduction", "include", "modalities", "client_secret"}, "session")
    config = base
    if "input_audio_format" in session:
        value = session["input_audio_format"]
        if value not in _BETA_FORMATS:
            raise ApiError(f"input_audio_format must be one of {list(_BETA_FORMATS)}, got {value!r}",
                           param="session.input_audio_format")
        config = replace(config, format_type=_BETA_FORMATS[value], rate=24_000)
    if "input_audio_transcription" in session:
        config = _parse_transcription(session["input_audio_transcription"], config, "session.input_audio_transcription")
    if "turn_detection" in session:
        config = _parse_turn_detection(session["turn_detection"], config, "session.turn_detection")
    return _parse_include(session, config)


def _parse_format(value: Any, config: TranscriptionConfig, where: str) -> TranscriptionConfig:
    if isinstance(value, str) and value in _BETA_FORMATS:  # tolerate the beta names here too
        value = {"type": _BETA_FORMATS[value]}
    if not isinstance(value, dict):
        raise ApiError("'format' must be an object such as {\"type\": \"audio/pcm\", \"rate\": 24000}", param=where)
    _reject_unknown(value, {"type", "rate"}, where)
    kind = value.get("type", "audio/pcm")
    if kind not in _FORMATS:
        raise ApiError(f"Invalid value: {kind!r}. Supported values are: {', '.join(_FORMATS)}.", param=f"{where}.type")
    rate = value.get("rate", 24_000 if kind == "audio/pcm" else 8000)
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ApiError(f"'rate' must be an integer, got {rate!r}", param=f"{where}.rate")
    if kind != "audio/pcm" and rate != 8000:
        raise ApiError(f"{kind} is 8000 Hz audio, got rate {rate}", param=f"{where}.rate")
    return replace(config, format_type=kind, rate=rate if kind == "audio/pcm" else 8000)


def _parse_transcription(value: Any, config: TranscriptionConfig, where: str) -> TranscriptionConfig:
    if value is None:
        raise ApiError("transcription cannot be turned off in a transcription session", param=where)
    if not isinstance(value, dict):
        raise ApiError("'transcription' must be an object", param=where)
    _reject_unknown(value, {"model", "language", "prompt", "keywords", "languages", "delay"}, where)
    changes: dict[str, Any] = {}
    if "model" in value:
        if not isinstance(value["model"], str):
            raise ApiError("'model' must be a string", param=f"{where}.model")
        changes["model"] = value["model"]
    if "language" in value:
        language = value["language"]
        if language is not None and not isinstance(language, str):
            raise ApiError("'language' must be an ISO-639-1 code or null", param=f"{where}.language")
        changes["language"] = language.split("-")[0].lower() if language else None
    if value.get("languages"):
        languages = value["languages"]
        if not isinstance(languages, list) or len(languages) != 1 or not isinstance(languages[0], str):
            raise ApiError("'languages' is supported with exactly one language", param=f"{where}.languages")
        changes.setdefault("language", languages[0].split("-")[0].lower())
    if "prompt" in value:
        if value["prompt"] is not None and not isinstance(value["prompt"], str):
            raise ApiError("'prompt' must be a string", param=f"{where}.prompt")
        changes["prompt"] = value["prompt"] or ""
    if "keywords" in value:
        keywords = value["keywords"]
        if keywords is None:
            keywords = []
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise ApiError("'keywords' must be a list of strings", param=f"{where}.keywords")
        changes["keywords"] = tuple(keywords)
    if "delay" in value:
        changes["delay"] = value["delay"]
    return replace(config, **changes)


def _parse_turn_detection(value: Any, config: TranscriptionConfig, where: str) -> TranscriptionConfig:
    if value is None:
        return replace(config, turn_detection=None)
    if not isinstance(value, dict):
        raise ApiError("'turn_detection' must be an object or null", param=where)
    _reject_unknown(value, {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                            "interrupt_response", "idle_timeout_ms", "eagerness"}, where)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ApiError(f"turn_detection type {kind!r} is not supported; use 'server_vad' or null",
                       param=f"{where}.type")
    merged = dict(config.turn_detection or {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                            "silence_duration_ms": 500})
    threshold = value.get("threshold", merged["threshold"])
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ApiError(f"'threshold' must be a number in [0, 1], got {threshold!r}", param=f"{where}.threshold")
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        number = value.get(name, merged[name])
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ApiError(f"'{name}' must be a non-negative integer, got {number!r}", param=f"{where}.{name}")
    silence = value.get("silence_duration_ms", merged["silence_duration_ms"])
    if isinstance(silence, bool) or not isinstance(silence, int) or not 100 <= silence <= 5000:
        raise ApiError(f"'silence_duration_ms' must be between 100 and 5000 on this server, got {silence}",
                       param=f"{where}.silence_duration_ms")
    merged.update({"type": "server_vad", "threshold": float(threshold),
                   "prefix_padding_ms": value.get("prefix_padding_ms", merged["prefix_padding_ms"]),
                   "silence_duration_ms": silence})
    return replace(config, turn_detection=merged)


def translator(server, ws) -> RealtimeTranscriptionTranslator:
    """The ``/v1/realtime`` route."""
    return RealtimeTranscriptionTranslator(
        server.engine.capabilities, server.settings.session, query_params(ws.request.path)
    )
