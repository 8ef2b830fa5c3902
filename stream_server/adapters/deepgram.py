"""Deepgram-style live transcription at ``/deepgram/v1/listen`` (drop-in for Deepgram's SDKs).

Deepgram's own path is ``/v1/listen``, which is this server's native protocol, so the Deepgram API
lives under the prefix ``/deepgram``: Deepgram's SDKs join their "production" base URL and
``/v1/listen``, so a base URL of ``ws://HOST:PORT/deepgram`` reaches it unchanged.

Options come as query parameters (as in Deepgram's API) and are mapped to one native ``start``:
``encoding`` (``linear16`` → ``pcm_s16le``, ``mulaw``, ``alaw`` — expanded to 16-bit PCM here; no
``encoding`` means a containerised stream, of which WAV is understood), ``sample_rate``,
``channels``, ``multichannel`` (→ native ``multichannel``: one session per channel),
``language`` (BCP-47, reduced to its primary subtag; ``multi`` → detection), ``interim_results``
(→ ``partials``), ``endpointing`` (ms of silence → ``vad.silence_ms``, clamped to 100–5000;
``false`` → 5000 and ``speech_final`` is never set), ``utterance_end_ms``, ``vad_events``,
``keyterm``/``keywords`` (→ ``keywords``), ``diarize`` (→ native ``diarize``: each final word
carries ``speaker``, the native word's own, or in an untimed final its turn's). Formatting options the engine's output already has
(``punctuate``, ``smart_format``, …) are accepted without effect; features it cannot provide
(``diarize_model``, ``redact``, ``search``, …) and unknown parameters are refused with an ``Error``
message and close 1008 (Deepgram refuses them with HTTP 400 before the upgrade).

Native events become ``Results`` (``partial`` → ``is_final: false``; ``final`` → ``is_final: true``,
``speech_final: true`` unless it was forced by ``Finalize``/``CloseStream``, then
``from_finalize``), ``SpeechStarted`` (with ``vad_events=true``), ``UtteranceEnd`` (with
``utterance_end_ms``: sent once that much audio has passed after the last final without new
speech) and, at the end of the stream, ``Metadata``. Client messages ``KeepAlive``, ``Finalize``,
``CloseStream`` (or an empty binary frame, Deepgram's legacy close) and ``Configure``
(``keyterms``) are understood.

Finals the engine timed (the native final's ``words``: Whisper's transcriptions) carry those words
with their real ``start``/``end``/``confidence``/``punctuated_word``, and the alternative's
``confidence`` is the final's. Results the engine did not time or score (interim results,
translations, finals whose words could not be placed) spread their span over the words in proportion
to their length with confidence 0 (Deepgram's schema has no "unknown").
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Sequence, overload

from stream_server.inference.types import EngineCapabilities
from stream_server.core.session import SessionSettings
from stream_server.adapters.base import Hangup, OpenStream, Out, Reply, StreamCommand, WavHeader, alaw_to_pcm16, audio_chunks, parse_wav_header, query_params
from stream_server.core.events import AudioFormat, ConfigChange, Configure, Configured, End, Error, Event, Final, FinalWord, Finalize, Partial, SpeechEnded, SpeechStarted, Start, Stop, VadChange

ROUTE = "/deepgram/v1/listen"
KEY = "main"

_ENCODINGS = {"linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}
_DEFAULT_RATES = {"linear16": 16_000, "mulaw": 8000, "alaw": 8000}
_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
_NO_EFFECT = {
    "model", "version", "tag", "extra", "punctuate", "smart_format", "numerals", "profanity_filter",
    "filler_words", "dictation", "measurements", "mip_opt_out", "no_delay", "language_hint", "token",
}
_UNSUPPORTED = {
    "diarize_model", "redact", "search", "replace", "callback", "callback_method", "detect_entities",
    "alternatives", "sentiment", "summarize", "topics", "intents", "detect_language", "paragraphs", "utterances",
}
_KNOWN = {
    "encoding", "sample_rate", "channels", "multichannel", "language", "interim_results", "endpointing",
    "utterance_end_ms", "vad_events", "keyterm", "keywords", "diarize",
} | _NO_EFFECT


class OptionError(ValueError):
    pass


def _bool(query: dict[str, list[str]], name: str, default: bool) -> bool:
    if name not in query:
        return default
    value = query[name][-1].strip().lower()
    if value not in ("true", "false"):
        raise OptionError(f"{name} must be true or false, got {value[:20]!r}")
    return value == "true"


@overload
def _int(query: dict[str, list[str]], name: str, default: int) -> int: ...


@overload
def _int(query: dict[str, list[str]], name: str, default: None) -> int | None: ...


def _int(query: dict[str, list[str]], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    value = query[name][-1].strip()
    if not value.isdigit():
        raise OptionError(f"{name} must be a whole number, got {value[:20]!r}")
    return int(value)


class DeepgramTranslator:
    """One Deepgram-style connection (sans-I/O).

    Args:
        capabilities: the engine's (model name in metadata).
        settings: the server's session settings (frame size, defaults).
        query: the connection's query parameters, every value kept (``keyterm`` repeats).
        created: the connection's start time (``Metadata.created``), ISO 8601.
    """

    def __init__(self, capabilities: EngineCapabilities, settings: SessionSettings = SessionSettings(),
                 query: dict[str, list[str]] | None = None, created: str | None = None):
        self.capabilities = capabilities
        self.settings = settings
        self.request_id = str(uuid.uuid4())
        self.created = created or datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"granite-stream:{capabilities.name}:{capabilities.model}"))
        self.model_info = {"name": capabilities.model, "version": "granite-stream", "arch": capabilities.name}
        self.problem: str | None = None
        self.encoding: str | None = None  # a Deepgram encoding; None: sniff the container
        self.native_encoding = "pcm_s16le"
        self.sample_rate = 16_000
        self.channels = 1
        self.started = False
        self.closing = False
        self.closed = False
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._forced: dict[tuple[int, int], str] = {}  # (channel, utterance) → "finalize" | "close"
        self._forcing: str | None = None
        self._starts: dict[tuple[int, int], float] = {}
        self._last_word_end: dict[int, float] = {}
        self._armed: set[int] = set()
        self._configuring = False
        self.multichannel = self.interim = self.vad_events = self.diarize = False
        self.language: str | None = "en"
        self.endpointing, self.silence_ms = True, settings.default_config.vad.silence_ms
        self.utterance_end_ms: int | None = None
        self.keywords: list[str] = []
        try:
            self._parse(query or {})
        except OptionError as exc:
            self.problem = str(exc)

    # ---- options --------------------------------------------------------------------------------

    def _parse(self, query: dict[str, list[str]]) -> None:
        for name in query:
            if name in _UNSUPPORTED:
                raise OptionError(f"{name} is not supported by this server")
            if name not in _KNOWN:
                raise OptionError(f"unknown query parameter {name[:40]!r}")
        if "encoding" in query:
            encoding = query["encoding"][-1].strip().lower()
            if encoding not in _ENCODINGS:
                raise OptionError(f"encoding {encoding[:20]!r} is not supported; use one of {sorted(_ENCODINGS)} "
                                  "or send a WAV stream without encoding")
            self.encoding = encoding
            self.native_encoding = _ENCODINGS[encoding]
            self.sample_rate = _int(query, "sample_rate", _DEFAULT_RATES[encoding])
        self.channels = _int(query, "channels", 1)
        self.multichannel = _bool(query, "multichannel", False)
        self.interim = _bool(query, "interim_results", False)
        self.vad_events = _bool(query, "vad_events", False)
        self.diarize = _bool(query, "diarize", False)
        if self.diarize and not self.capabilities.diarization:
            raise OptionError("diarize is not available on this server (the speaker encoder is not installed)")
        language = query.get("language", ["en"])[-1].strip()
        self.language = None if language.lower() == "multi" else language.split("-")[0].lower()
        if "endpointing" in query:
            value = query["endpointing"][-1].strip().lower()
            if value == "false":
                self.endpointing, self.silence_ms = False, 5000
            elif value == "true":
                pass
            elif value.isdigit():
                self.silence_ms = min(5000, max(100, int(value)))
            else:
                raise OptionError(f"endpointing must be a number of milliseconds or false, got {value[:20]!r}")
        self.utterance_end_ms = _int(query, "utterance_end_ms", None)
        if self.utterance_end_ms is not None and not self.interim:
            raise OptionError("utterance_end_ms requires interim_results=true")
        keywords = [k for k in query.get("keyterm", [])]
        keywords += [re.sub(r":-?[0-9.]+$", "", k) for k in query.get("keywords", [])]
        self.keywords = list(dict.fromkeys(k.strip() for k in keywords if k.strip()))

    def _start_command(self) -> Start:
        audio = AudioFormat("pcm_s16le" if self.native_encoding == "alaw" else self.native_encoding,
                            self.sample_rate, self.channels)
        options = ConfigChange(language=self.language, keywords=tuple(self.keywords), partials=self.interim,
                               vad=VadChange(silence_ms=self.silence_ms), diarize=True if self.diarize else None)
        return Start(audio, options, True if self.multichannel else None)

    @property
    def output_channels(self) -> int:
        return self.channels if self.multichannel else 1

    # ---- connection -----------------------------------------------------------------------------

    def opened(self) -> list[Out]:
        if self.problem:
            return [self._error("INVALID_QUERY", self.problem), Hangup(1008, "invalid query parameters")]
        if self.encoding is None:
            return []  # the first binary frame carries the container header
        return self._start()

    def _start(self) -> list[Out]:
        self.started = True
        return [OpenStream(KEY), StreamCommand(KEY, self._start_command())]

    def client_bytes(self, data: bytes) -> list[Out]:
        self._forcing = None
        if self.problem or self.closing:
            return []
        if not data:  # Deepgram's legacy end of stream
            return self._close_stream()
        outs: list[Out] = []
        if not self.started:
            header = parse_wav_header(data)
            if isinstance(header, str):
                return [self._error("UNSUPPORTED_AUDIO", f"without an encoding parameter the stream must be WAV: {header}"),
                        Hangup(1008, "unsupported audio")]
            self._use_wav(header)
            data = data[header.data_offset:]
            outs += self._start()
        self._sha.update(data)
        self._bytes += len(data)
        if self.native_encoding == "alaw":
            data = alaw_to_pcm16(data)
        sample = (2 if self.native_encoding == "alaw" else _BYTES[self.native_encoding]) * self.channels
        outs += audio_chunks(KEY, data, self.settings.max_frame_bytes, sample)
        return outs + self._utterance_ends()

    def _use_wav(self, header: WavHeader) -> None:
        self.encoding = "wav"
        self.native_encoding = header.encoding
        self.sample_rate = header.sample_rate
        self.channels = header.channels

    def client_text(self, text: str) -> list[Out]:
        self._forcing = None
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return [self._schema_error("the message is not valid JSON", text)]
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "KeepAlive":
            return []
        if self.problem or self.closing:
            return []
        if kind == "Finalize":
            if not self.started:
                return []
            self._forcing = "finalize"
            return [StreamCommand(KEY, Finalize())]
        if kind == "CloseStream":
            return self._close_stream()
        if kind == "Configure":
            return self._configure(message)
        return [self._schema_error(f"unknown message type {str(kind)[:40]!r}; expected KeepAlive, Finalize, "
                                   "CloseStream or Configure", text)]

    def _close_stream(self) -> list[Out]:
        self.closing = True
        if not self.started:
            return [self._metadata(), Hangup(1000, "end of stream")]
        self._forcing = "close"
        return [StreamCommand(KEY, Stop())]

    def _configure(self, message: dict) -> list[Out]:
        keyterms = message.get("keyterms")
        if keyterms is None:
            return [Reply({"type": "ConfigureSuccess", "request_id": self.request_id})]
        if not isinstance(keyterms, list) or not all(isinstance(k, str) for k in keyterms):
            return [Reply({"type": "ConfigureFailure", "request_id": self.request_id,
                           "code": "CONFIGURE_INTERNAL_ERROR", "description": "keyterms must be a list of strings"})]
        self.keywords = list(dict.fromkeys(k.strip() for k in keyterms if k.strip()))
        if not self.started:
            return [Reply({"type": "ConfigureSuccess", "request_id": self.request_id, "keyterms": self.keywords})]
        self._configuring = True
        return [StreamCommand(KEY, Configure(ConfigChange(keywords=tuple(self.keywords))))]

    # ---- native events --------------------------------------------------------------------------

    def native_event(self, key: str, event: Event) -> list[Out]:
        match event:
            case SpeechEnded():
                # Ended by the client's Finalize/CloseStream (this very message), not by endpointing.
                if self._forcing is not None:
                    self._forced[(event.channel or 0, event.utterance_id)] = self._forcing
            case SpeechStarted():
                channel = event.channel or 0
                self._starts[(channel, event.utterance_id)] = event.start
                self._armed.discard(channel)
                if self.vad_events:
                    return [Reply({"type": "SpeechStarted", "channel": [channel, self.output_channels],
                                   "timestamp": event.start})]
            case Partial():
                return [self._results(event, is_final=False)] if self.interim else []
            case Final():
                channel = event.channel or 0
                forced = self._forced.pop((channel, event.utterance_id), None)
                self._starts.pop((channel, event.utterance_id), None)
                outs: list[Out] = [self._results(event, is_final=True, forced=forced)]
                if event.text.strip():
                    self._last_word_end[channel] = event.end
                    if self.utterance_end_ms is not None:
                        self._armed.add(channel)
                return outs + self._utterance_ends()
            case Configured():
                if self._configuring:
                    self._configuring = False
                    return [Reply({"type": "ConfigureSuccess", "request_id": self.request_id, "keyterms": self.keywords})]
            case Error():
                if self._configuring and event.code == "bad_config":
                    self._configuring = False
                    return [Reply({"type": "ConfigureFailure", "request_id": self.request_id,
                                   "code": "CONFIGURE_INTERNAL_ERROR", "description": event.message})]
                outs = [self._error(event.code.upper(), event.message)]
                if not self.closing and event.code == "bad_config":  # the start itself was refused
                    self.closing = True
                    outs.append(Hangup(1008, "invalid options"))
                return outs
            case End():
                return [self._metadata()]
        return []

    def native_closed(self, key: str, code: int, reason: str) -> list[Out]:
        self.closed = True
        return [Hangup(code, reason)]

    # ---- messages -------------------------------------------------------------------------------

    def _results(self, event: Partial | Final, is_final: bool, forced: str | None = None) -> Reply:
        start, end, text, channel = event.start, event.end, event.text, event.channel or 0
        timed = event.words if isinstance(event, Final) else None
        words = _timed_words(timed) if timed is not None else _words(text, start, end)
        confidence = event.confidence if isinstance(event, Final) else None
        if confidence is None:  # not scored (interim results, translations): see docs/protocol.md
            confidence = 0.0
        if isinstance(event, Final) and event.speaker is not None:
            # Deepgram's diarized words: a timed word carries the speaker the session gave it
            # (FinalWord.speaker); words spread over an untimed final take the final's turn at their
            # middle. speaker_confidence is not measured, so it is left out.
            words = [{**w, "speaker": _speaker(event, w, timed[i].speaker if timed is not None else None)}
                     for i, w in enumerate(words)]
        return Reply({
            "type": "Results",
            "channel_index": [channel, self.output_channels],
            "duration": round(max(0.0, end - start), 3),
            "start": start,
            "is_final": is_final,
            "speech_final": is_final and forced is None and self.endpointing,
            "from_finalize": forced == "finalize",
            "channel": {"alternatives": [{"transcript": text, "confidence": confidence, "words": words}]},
            "metadata": {"request_id": self.request_id, "model_info": self.model_info, "model_uuid": self.model_uuid},
        })

    def _utterance_ends(self) -> list[Out]:
        if self.utterance_end_ms is None or not self._armed:
            return []
        position = self._bytes / max(1, _BYTES.get(self.native_encoding, 2) * self.channels * self.sample_rate)
        outs: list[Out] = []
        for channel in sorted(self._armed):
            last = self._last_word_end.get(channel, 0.0)
            if position - last >= self.utterance_end_ms / 1000:
                self._armed.discard(channel)
                outs.append(Reply({"type": "UtteranceEnd", "channel": [channel, self.output_channels],
                                   "last_word_end": last}))
        return outs

    def _metadata(self) -> Reply:
        per_second = max(1, _BYTES.get(self.native_encoding, 2) * self.channels * self.sample_rate)
        return Reply({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self._sha.hexdigest(),
            "created": self.created,
            "duration": round(self._bytes / per_second, 3),
            "channels": self.channels,
            "models": [self.model_uuid],
            "model_info": {self.model_uuid: self.model_info},
        })

    def _error(self, code: str, description: str) -> Reply:
        return Reply({"type": "Error", "variant": code, "description": description, "code": code})

    def _schema_error(self, description: str, original: str) -> Reply:
        return Reply({"type": "Error", "variant": "SchemaError", "description": description,
                      "message": original[:1000]})


def _plain(token: str) -> str:
    """Deepgram's ``word``: lower case, without punctuation (``punctuated_word`` keeps it)."""
    return re.sub(r"[^\w'-]", "", token.lower()) or token.lower()


def _timed_words(words: Sequence[FinalWord]) -> list[dict]:
    """A native final's timed ``words`` in Deepgram's shape (an unscored word gets confidence 0)."""
    return [{"word": _plain(w.word), "start": w.start, "end": w.end,
             "confidence": 0.0 if w.confidence is None else w.confidence, "punctuated_word": w.word}
            for w in words]


def _speaker(final: Final, word: dict, given: int | None) -> int | None:
    """A word's speaker in a diarized final: ``given`` (the native word's own label) when set,
    else the speaker of the final's turn around the word's middle, else the final's speaker."""
    if given is not None:
        return given
    middle = (word["start"] + word["end"]) / 2
    for turn in final.speaker_turns:
        if turn.start <= middle <= turn.end:
            return turn.speaker
    return final.speaker


def _words(text: str, start: float, end: float) -> list[dict]:
    """Words with times spread over ``[start, end]`` by length, unscored (confidence 0): for results
    the engine did not time (interim results, translations)."""
    tokens = text.split()
    if not tokens:
        return []
    weights = [len(t) + 1 for t in tokens]
    total = float(sum(weights))
    words, at = [], start
    for token, weight in zip(tokens, weights):
        span = (end - start) * weight / total
        words.append({"word": _plain(token), "start": round(at, 3), "end": round(at + span, 3), "confidence": 0.0,
                      "punctuated_word": token})
        at += span
    return words


def translator(server, ws) -> DeepgramTranslator:
    """The ``/deepgram/v1/listen`` route."""
    return DeepgramTranslator(server.engine.capabilities, server.settings.session, query_params(ws.request.path))
