"""Per-channel transcription: one :class:`~stream_server.core.session.Session` per audio channel (sans-I/O).

A call-center recording or a live call often carries the agent on one channel and the customer on
the other. Averaging them to mono (what a plain session does) mixes two talkers into one
transcript; with ``"multichannel": true`` in ``start`` every channel gets its own session instead:
its own VAD, its own utterances, its own partials and finals, each event tagged ``"channel": i``.

:class:`MultichannelSession` has the interface the shells use of a :class:`Session`
(``handle``, ``receive_text``, ``receive_bytes``, ``inference_done``, ``connection_lost``, ``state``, …), so
the :class:`~stream_server.server.driver.SessionDriver` drives it unchanged. Until a ``start`` asks for
multichannel it simply forwards everything to one ordinary session, so protocol v1 clients see no
difference at all. After a multichannel ``start`` it

* sends one ``ready`` (the first channel's, with ``config.audio.channels`` = N and
  ``config.multichannel`` = true),
* de-interleaves each binary frame into N mono streams (a partial sample frame at the end of a
  binary frame is carried over) and feeds channel ``i`` its own bytes,
* tags ``speech_started``/``speech_ended``/``partial``/``final`` and utterance errors with ``"channel": i``, sends
  answers that concern the whole stream (``configured``, protocol errors) once,
* broadcasts ``configure``/``finalize``/``stop`` (and the server's ``end_stream``) to every channel,
  and sends one ``end`` (utterances summed over channels) once every channel has finished, then
  the close a single session would have made (1000 after ``stop``, 1001 on a drain, …).

Channel sessions have ids ``<session_id>.<i>`` so the worker's per-utterance bookkeeping (partial
replacement is keyed by session and utterance id) never mixes two channels; :attr:`session_ids`
lists them for cancellation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from stream_server.core.events import Audio, Command, Configured, End, Error, Final, Partial, Ready, SpeechEnded, SpeechStarted, Start
from stream_server.inference.types import EngineCapabilities, InferenceRequest, InferenceResult
from stream_server.core.protocol import BAD_AUDIO, INTERNAL, OVERLOADED, ProtocolError, check_audio_format, parse_command, round_time
from stream_server.core.session import Action, Close, Send, Session, SessionSettings, State

_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}
_CHANNEL_EVENTS = (SpeechStarted, SpeechEnded, Partial, Final)
_CHANNEL_ERRORS = {BAD_AUDIO, OVERLOADED}  # errors about one channel's audio or inference


class MultichannelSession:
    """A session that is either one ordinary :class:`Session` or, after ``"multichannel": true``,
    one session per channel.

    Args:
        session_id: the stream's id (echoed in ``ready``); channel sessions get ``<id>.<i>``.
        capabilities: what the serving engine can do.
        settings: server bounds and defaults (shared by every channel).
    """

    def __init__(self, session_id: str, capabilities: EngineCapabilities, settings: SessionSettings = SessionSettings()):
        self.session_id = session_id
        self.capabilities = capabilities
        self.settings = settings
        self._main = Session(session_id, capabilities, settings)
        self._channels: list[Session] | None = None
        self._index: dict[str, int] = {}
        self._carry = b""
        self._frame_bytes = 0
        self._ended: dict[int, End] = {}
        self._end_close: Close | None = None
        self._closed = False

    # ---- what the shells read -----------------------------------------------------------------

    @property
    def multichannel(self) -> bool:
        return self._channels is not None

    @property
    def channels(self) -> int:
        return len(self._channels) if self._channels is not None else 1

    @property
    def session_ids(self) -> list[str]:
        """Every session id that inference requests of this stream may carry."""
        return [self.session_id] + [s.session_id for s in self._channels or ()]

    def channel_of(self, session_id: str) -> int:
        """The channel index of an inference request's ``session_id`` (0 for a mono stream)."""
        return self._index.get(session_id, 0)

    @property
    def state(self) -> State:
        if self._channels is None:
            return self._main.state
        if self._closed or all(s.state == State.CLOSED for s in self._channels):
            return State.CLOSED
        if any(s.state in (State.STOPPING, State.CLOSED) for s in self._channels):
            return State.STOPPING
        return State.STREAMING

    @property
    def audio_seconds(self) -> float:
        return (self._channels[0] if self._channels else self._main).audio_seconds

    @property
    def pending_requests(self) -> int:
        return sum(s.pending_requests for s in self._channels) if self._channels else self._main.pending_requests

    @property
    def utterances_finalized(self) -> int:
        if self._channels is None:
            return self._main.utterances_finalized
        return sum(s.utterances_finalized for s in self._channels)

    @property
    def config(self):
        return (self._channels[0] if self._channels else self._main).config

    @property
    def audio_format(self):
        if self._channels is None:
            return self._main.audio_format
        fmt = self._channels[0].audio_format
        return None if fmt is None else type(fmt)(fmt.encoding, fmt.sample_rate, len(self._channels))

    # ---- inputs -------------------------------------------------------------------------------

    def receive_text(self, text: str) -> list[Action]:
        """The JSON edge (see :meth:`Session.receive_text`)."""
        try:
            command = parse_command(text, self.settings.limits)
        except ProtocolError as exc:
            if self._channels is None:
                return self._main.reject(exc)
            actions: list[Action] = []
            for i, channel in enumerate(self._channels):
                actions += self._merge(i, channel.reject(exc))
            return actions
        return self.handle(command)

    def receive_bytes(self, data: bytes) -> list[Action]:
        """The binary edge: one interleaved frame of every channel's audio."""
        return self.handle(Audio(data))

    def handle(self, command: Command) -> list[Action]:
        """Handle one command: a multichannel ``start`` splits the stream; afterwards control
        commands go to every channel and audio is de-interleaved."""
        if self._channels is None:
            if isinstance(command, Start) and command.multichannel is not None and self._main.state == State.AWAITING_START:
                return self._multichannel_start(command)
            return self._main.handle(command)
        if isinstance(command, Audio):
            return self._audio(command.data)
        actions: list[Action] = []
        for i, channel in enumerate(self._channels):
            actions += self._merge(i, channel.handle(command))
        return actions

    def _audio(self, data: bytes) -> list[Action]:
        assert self._channels is not None
        first = self._channels[0]
        if first.state != State.STREAMING or len(data) > self.settings.max_frame_bytes:
            # The first channel answers with the right error (after stop, too large) for all.
            return self._merge(0, first.receive_bytes(data))
        if self._carry:
            data = self._carry + data
        usable = len(data) - len(data) % self._frame_bytes
        self._carry = data[usable:]
        if usable == 0:
            return []
        n = len(self._channels)
        frames = np.frombuffer(data, np.uint8, count=usable).reshape(-1, n, self._frame_bytes // n)
        actions: list[Action] = []
        for i, channel in enumerate(self._channels):
            actions += self._merge(i, channel.receive_bytes(frames[:, i, :].tobytes()))
        return actions

    def inference_done(
        self, request: InferenceRequest, result: InferenceResult | None, error: str | None = None, code: str = INTERNAL
    ) -> list[Action]:
        if self._channels is None:
            return self._main.inference_done(request, result, error, code)
        i = self._index.get(request.session_id)
        if i is None or self._closed:
            return []
        return self._merge(i, self._channels[i].inference_done(request, result, error, code))

    def end_stream(self, notice: Error | None = None, close_code: int = 1000, close_reason: str = "end of stream") -> list[Action]:
        """Finish every channel as ``stop`` does (see :meth:`Session.end_stream`); ``notice`` is sent once."""
        if self._channels is None:
            return self._main.end_stream(notice, close_code, close_reason)
        actions: list[Action] = [Send(notice)] if notice else []
        for i, channel in enumerate(self._channels):
            actions += self._merge(i, channel.end_stream(None, close_code, close_reason))
        return actions

    def connection_lost(self) -> None:
        self._main.connection_lost()
        for channel in self._channels or ():
            channel.connection_lost()
        self._closed = self._channels is not None

    # ---- internals ----------------------------------------------------------------------------

    def _multichannel_start(self, command: Start) -> list[Action]:
        """Handle a ``start`` that names ``multichannel``."""
        if not command.multichannel:
            return self._main.handle(replace(command, multichannel=None))
        try:
            fmt = check_audio_format(command.audio)
        except ProtocolError as exc:
            return [Send(exc.to_event())]
        mono_start = replace(command, audio=replace(fmt, channels=1), multichannel=None)
        sessions = [Session(f"{self.session_id}.{i}", self.capabilities, self.settings) for i in range(fmt.channels)]
        first = sessions[0].handle(mono_start)
        if sessions[0].state != State.STREAMING:
            return first  # bad_config and the like: still waiting for a valid start
        for session in sessions[1:]:
            session.handle(mono_start)
        self._channels = sessions
        self._index = {s.session_id: i for i, s in enumerate(sessions)}
        self._frame_bytes = _BYTES_PER_SAMPLE[fmt.encoding] * fmt.channels
        ready = next(a.event for a in first if isinstance(a, Send) and isinstance(a.event, Ready))
        return [Send(self._whole_stream(replace(ready, session_id=self.session_id)))]

    def _whole_stream(self, event: Ready | Configured) -> Ready | Configured:
        """Restate a channel's ``ready``/``configured`` for the whole stream."""
        return replace(event, audio=replace(event.audio, channels=len(self._channels or ())), multichannel=True)

    def _merge(self, i: int, actions: list[Action]) -> list[Action]:
        merged: list[Action] = []
        ended = False
        for action in actions:
            if isinstance(action, Send):
                event = action.event
                if isinstance(event, _CHANNEL_EVENTS) or (
                    isinstance(event, Error) and (event.utterance_id is not None or event.code in _CHANNEL_ERRORS)
                ):
                    merged.append(Send(replace(event, channel=i)))
                elif isinstance(event, End):
                    self._ended[i] = event
                    ended = True
                elif i == 0:
                    merged.append(Send(self._whole_stream(event) if isinstance(event, (Ready, Configured)) else event))
            elif isinstance(action, Close):
                if ended:  # the close that follows this channel's `end`
                    self._end_close = self._end_close or action
                    merged += self._maybe_end()
                elif not self._closed:  # a fatal close: the whole stream goes
                    self._closed = True
                    for channel in self._channels or ():
                        channel.connection_lost()
                    merged.append(action)
            else:
                merged.append(action)
        return merged

    def _maybe_end(self) -> list[Action]:
        assert self._channels is not None
        if len(self._ended) < len(self._channels) or self._closed:
            return []
        self._closed = True
        return [
            Send(End(
                sum(e.utterances for e in self._ended.values()),
                round_time(max(e.audio_seconds for e in self._ended.values())),
            )),
            self._end_close or Close(1000, "end of stream"),
        ]


__all__ = ["MultichannelSession"]
