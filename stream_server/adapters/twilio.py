"""Twilio Media Streams at ``/v1/twilio``: caption a live phone call, one session per call leg.

Twilio's ``<Stream>`` (TwiML ``<Start><Stream>`` or ``<Connect><Stream>``) connects here and sends
JSON text frames: ``connected``, ``start`` (``streamSid``, ``callSid``, ``tracks``,
``mediaFormat`` = μ-law 8 kHz mono, ``customParameters``), ``media`` (a base64 μ-law ``payload``
of one ``track``, ``inbound`` = the caller, ``outbound`` = what the caller hears, e.g. the agent),
``mark``, ``dtmf`` and ``stop``. Each track gets its own native session (``start`` with
``audio: {encoding: mulaw, sample_rate: 8000}``), so the two sides of the call are transcribed
separately and never mixed.

Settings come from the ``start`` message's ``customParameters`` (TwiML ``<Parameter>``; Twilio's
stream URL cannot carry a query string) or, for relays, from the query string: ``language``,
``keywords`` (comma-separated), ``partials`` (``true``/``false``), ``silence_ms``. Other custom
parameters belong to the application and are ignored.

Transcripts go back on the same socket as JSON text frames (shapes in ``docs/protocol.md``):
``{"event": "transcript", "streamSid", "callSid", "track", "utterance_id", "is_final", "text",
"stable_text"?, "start", "end", "language"?}``, ``speech_started``, ``speech_ended`` (the VAD's end of an
utterance, once; its ``transcript`` with ``is_final`` follows), ``error`` and, after ``stop``,
``end``. Times are seconds from the start of the stream on each track's clock; a gap in a track's
media (by its ``timestamp``) is filled with silence, up to 10 s per gap, so both tracks stay on the
call's clock.
"""

from __future__ import annotations

import json
from typing import Any

from stream_server.inference.types import EngineCapabilities
from stream_server.core.session import SessionSettings
from stream_server.adapters.base import Hangup, OpenStream, Out, Reply, StreamCommand, audio_chunks, decode_base64, query_params
from stream_server.core.events import AudioFormat, End, Error, Event, Final, Partial, Ready, SpeechEnded, SpeechStarted, Stop
from stream_server.core.protocol import ProtocolError, parse_start

ROUTE = "/v1/twilio"
TRACKS = ("inbound", "outbound")
_SETTINGS = ("language", "keywords", "partials", "silence_ms")
_MAX_GAP_FILL_MS = 10_000
_JITTER_MS = 100
_SILENCE = b"\xff"  # μ-law zero


class TwilioTranslator:
    """One Twilio Media Streams connection (sans-I/O).

    Args:
        capabilities: the engine's (unused beyond the defaults; kept for symmetry).
        settings: the server's session settings.
        query: query parameters (relays may pass ``language`` … this way).
    """

    def __init__(self, capabilities: EngineCapabilities, settings: SessionSettings = SessionSettings(),
                 query: dict[str, list[str]] | None = None):
        self.capabilities = capabilities
        self.settings = settings
        self.options = {k: v[-1] for k, v in (query or {}).items() if k in _SETTINGS}
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.tracks: dict[str, dict[str, Any]] = {}  # track → {"ready", "failed", "ms", "end", "closed"}
        self.stopping = False
        self.closed = False

    # ---- client messages ------------------------------------------------------------------------

    def opened(self) -> list[Out]:
        return []

    def client_bytes(self, data: bytes) -> list[Out]:
        return [self._error("bad_message", "Twilio Media Streams messages are JSON text frames; binary frame ignored")]

    def client_text(self, text: str) -> list[Out]:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return [self._error("bad_json", f"message is not valid JSON: {exc}")]
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            return [self._error("bad_message", "message must be a JSON object with a string \"event\"")]
        event = message["event"]
        if event == "connected" or event in ("mark", "dtmf"):
            return []
        if event == "start":
            return self._start(message)
        if event == "media":
            return self._media(message)
        if event == "stop":
            return self._stop()
        return [self._error("unknown_type", f"unknown event {event[:40]!r}; expected connected, start, media, "
                                            "mark, dtmf or stop")]

    def _start(self, message: dict) -> list[Out]:
        if self.stream_sid is not None:
            return [self._error("already_started", "a second \"start\" was ignored")]
        start = message.get("start")
        if not isinstance(start, dict):
            return [self._error("bad_message", "\"start\" must carry a \"start\" object")]
        fmt = start.get("mediaFormat") or {}
        encoding, rate, channels = fmt.get("encoding", "audio/x-mulaw"), fmt.get("sampleRate", 8000), fmt.get("channels", 1)
        if encoding != "audio/x-mulaw" or channels != 1 or not isinstance(rate, int):
            return [self._error("bad_config", f"unsupported mediaFormat {fmt!r}; Twilio streams μ-law (audio/x-mulaw) mono")]
        self.rate = rate
        self.stream_sid = str(start.get("streamSid") or message.get("streamSid") or "")
        self.call_sid = start.get("callSid")
        custom = start.get("customParameters")
        if isinstance(custom, dict):
            self.options.update({k: v for k, v in custom.items() if k in _SETTINGS})
        tracks = start.get("tracks") or ["inbound"]
        outs: list[Out] = []
        for track in tracks:
            if track not in TRACKS:
                outs.append(self._error("bad_config", f"unknown track {str(track)[:20]!r}; expected inbound or outbound"))
                continue
            outs += self._open(track)
        return outs

    def _open(self, track: str) -> list[Out]:
        if track in self.tracks:
            return []
        self.tracks[track] = {"ready": False, "failed": False, "ms": 0.0, "end": None, "closed": False}
        fields: dict[str, Any] = {}
        opts = self.options
        if "language" in opts:
            fields["language"] = opts["language"]
        if "keywords" in opts:
            keywords = opts["keywords"]
            fields["keywords"] = [k.strip() for k in keywords.split(",") if k.strip()] if isinstance(keywords, str) else keywords
        if "partials" in opts:
            value = opts["partials"]
            fields["partials"] = value if isinstance(value, bool) else str(value).lower() != "false"
        if "silence_ms" in opts:
            value = opts["silence_ms"]
            fields["vad"] = {"silence_ms": int(value) if str(value).isdigit() else value}
        try:  # customParameters are client JSON: typed at the protocol's edge, refused as a start would be
            start = parse_start(AudioFormat("mulaw", self.rate, 1), fields, None, self.settings.limits)
        except ProtocolError as exc:
            return [OpenStream(track), *self.native_event(track, exc.to_event())]
        return [OpenStream(track), StreamCommand(track, start)]

    def _media(self, message: dict) -> list[Out]:
        if self.stream_sid is None:
            return [self._error("not_started", "media arrived before \"start\"; discarded")]
        if self.stopping:
            return []
        media = message.get("media")
        if not isinstance(media, dict):
            return [self._error("bad_message", "\"media\" must carry a \"media\" object")]
        track = media.get("track", "inbound")
        if track not in TRACKS:
            return [self._error("bad_message", f"unknown track {str(track)[:20]!r}; media discarded")]
        payload = decode_base64(media.get("payload"))
        if payload is None:
            return [self._error("bad_audio", "media payload is not valid base64; discarded", track)]
        outs = self._open(track)  # a track that start did not list
        state = self.tracks[track]
        if state["failed"]:
            return outs
        data = payload
        timestamp = media.get("timestamp")
        try:
            at_ms = float(timestamp) if timestamp is not None else None
        except (TypeError, ValueError):
            at_ms = None
        if at_ms is not None and at_ms - state["ms"] > _JITTER_MS:
            gap = min(at_ms - state["ms"], _MAX_GAP_FILL_MS)
            data = _SILENCE * int(gap * self.rate / 1000) + data
        state["ms"] += len(data) * 1000 / self.rate
        return outs + audio_chunks(track, data, self.settings.max_frame_bytes)

    def _stop(self) -> list[Out]:
        if self.stopping:
            return []
        self.stopping = True
        outs: list[Out] = []
        for track, state in self.tracks.items():
            if state["ready"] and not state["closed"]:
                outs.append(StreamCommand(track, Stop()))
        return outs + self._maybe_end()

    # ---- native events --------------------------------------------------------------------------

    def native_event(self, track: str, event: Event) -> list[Out]:
        state = self.tracks.get(track)
        if state is None:
            return []
        match event:
            case Ready():
                state["ready"] = True
            case SpeechStarted():
                return [self._event("speech_started", track=track, utterance_id=event.utterance_id, start=event.start)]
            case SpeechEnded():
                return [self._event("speech_ended", track=track, utterance_id=event.utterance_id, end=event.end)]
            case Partial():
                return [self._event("transcript", track=track, utterance_id=event.utterance_id, is_final=False,
                                    text=event.text, stable_text=event.stable_text, start=event.start, end=event.end)]
            case Final():
                timing = event.timing_wire()
                if event.truncated:
                    timing["truncated"] = True
                return [self._event("transcript", track=track, utterance_id=event.utterance_id, is_final=True,
                                    text=event.text, start=event.start, end=event.end, language=event.language,
                                    **timing)]
            case Error():
                if not state["ready"]:
                    state["failed"] = True  # its start was refused: drop the track's media from now on
                extra = {} if event.utterance_id is None else \
                    {"utterance_id": event.utterance_id, "start": event.start, "end": event.end}
                return [self._error(event.code, event.message, track, **extra)]
            case End():
                state["end"] = {"utterances": event.utterances, "audio_seconds": event.audio_seconds}
        return []

    def native_closed(self, track: str, code: int, reason: str) -> list[Out]:
        state = self.tracks.get(track)
        if state is not None:
            state["closed"] = True
            state["close"] = (code, reason)
        return self._maybe_end()

    def _maybe_end(self) -> list[Out]:
        if self.closed:
            return []
        live = {t: s for t, s in self.tracks.items() if s["ready"] and not s["failed"]}
        if any(not s["closed"] for s in live.values()):
            return []
        if not live and not self.stopping:
            return []  # nothing was ever streamed and nobody asked to stop
        self.closed = True
        code, reason = next((s["close"] for s in live.values() if "close" in s), (1000, "end of stream"))
        ends = {t: s["end"] for t, s in live.items() if s["end"] is not None}
        return [self._event("end", tracks=ends), Hangup(code, reason)]

    # ---- messages -------------------------------------------------------------------------------

    def _event(self, event: str, **fields: Any) -> Reply:
        head: dict[str, Any] = {"event": event, "streamSid": self.stream_sid}
        if self.call_sid is not None:
            head["callSid"] = self.call_sid
        return Reply({**head, **fields})

    def _error(self, code: str, message: str, track: str | None = None, **extra: Any) -> Reply:
        fields: dict[str, Any] = {"code": code, "message": message}
        if track is not None:
            fields["track"] = track
        return self._event("error", **fields, **extra)


def translator(server, ws) -> TwilioTranslator:
    """The ``/v1/twilio`` route."""
    return TwilioTranslator(server.engine.capabilities, server.settings.session, query_params(ws.request.path))
