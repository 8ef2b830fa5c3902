"""The per-connection session: a pure, synchronous state machine (sans-I/O).

A :class:`Session` is fed typed commands (:mod:`stream_server.core.events`; ``receive_text`` and
``receive_bytes`` are the thin edges for JSON text and audio frames) and what the inference worker
finished, and answers with :class:`Action` objects: events to send, inference
requests to submit, a close to perform. It never touches a socket, a thread or a clock; the asyncio
server and the ``transcribe`` command are thin shells that carry out the actions. Every behaviour of
the protocol is therefore testable by calling these methods directly.

Time is the stream's audio clock: seconds of audio received since the first sample. Partials are
scheduled every ``partial_interval`` seconds of audio while an utterance is open, which makes the
schedule independent of how fast the client sends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import numpy as np

from vad import SpeechEnded as VadSpeechEnded
from vad import SpeechStarted as VadSpeechStarted
from vad import VadSegmenter

from stream_server.core.audio import AudioDecoder, SampleHistory
from stream_server.inference.types import SAMPLE_RATE, EngineCapabilities, InferenceRequest, InferenceResult, Word
from stream_server.core.events import Audio, Command, Configure, Configured, End, Error, Event, Final, FinalWord, Finalize, Partial, Ready, SpeechEnded, SpeechStarted, Start, Stop
from stream_server.core.protocol import ALREADY_STARTED, BAD_AUDIO, BAD_CONFIG, BAD_MESSAGE, INTERNAL, NOT_STARTED, OVERLOADED, SESSION_LIMIT, TOO_LARGE, AudioFormat, ProtocolError, ProtocolLimits, StreamConfig, apply_config, check_audio_format, parse_command, round_time
from stream_server.speakers.clustering import SpeakerEmbeddings, SpeakerSettings, SpeakerTracker
from stream_server.core.stabilizer import PartialStabilizer, drop_repeated_lead
from stream_server.core.timing import final_words


@dataclass(frozen=True)
class Send:
    """Send ``event`` to the client (a native client gets ``event.to_wire()`` as a JSON text frame)."""

    event: Event


@dataclass(frozen=True)
class Submit:
    """Hand ``request`` to the inference worker; report the outcome with :meth:`Session.inference_done`."""

    request: InferenceRequest


@dataclass(frozen=True)
class Close:
    """Close the connection with a WebSocket close code and reason, after sending what precedes it."""

    code: int
    reason: str


Action = Send | Submit | Close


class State(enum.Enum):
    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    STOPPING = "stopping"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionSettings:
    """Server-side bounds and defaults for sessions.

    Attributes:
        default_config: what a ``start`` without fields gets.
        limits: bounds on control messages.
        max_frame_bytes: largest binary frame accepted; larger frames are rejected with ``too_large``.
        min_partial_audio_s: no partial is requested for less utterance audio than this.
        max_session_s: seconds of audio after which the session is ended (finals, ``end``, close
            1008) with a fatal ``session_limit`` error; 0 for no limit.
        early_final_s: once an open utterance has been silent this long, its final is decoded
            speculatively, on exactly the audio the end of speech will cut (see
            :attr:`vad.VadSegmenter.tentative_end`). If the silence reaches ``vad.silence_ms`` the
            result is published as soon as the end is decided instead of being requested only
            then; if speech resumes it is discarded. Takes up to ``silence_ms - early_final_s``
            off every final's latency, at the cost of one wasted decode per pause in
            ``[early_final_s, silence_ms)``. 0 disables.
        refresh_waiting_partials: while a partial waits in the inference queue, ask again every
            ``partial_interval`` with the newer audio, as a ``refresh_only`` request that takes the
            waiting one's place (or is dropped if it has started). Under load the engine then
            works on audio at most one interval old instead of audio as old as the queue's wait;
            nothing extra runs (a replaced request never started). Off: a partial runs on the
            audio it was asked with.
        stable_agreement_s: how much audio the agreeing partial hypotheses must span before a word
            becomes stable (``PartialStabilizer``'s ``min_span_s``): less publishes ``stable_text``
            sooner and risks locking in a misheard word (docs/benchmarks.md, issue #16).
        speakers: how finals are labelled with speakers when a client asks for ``diarize``.
    """

    default_config: StreamConfig = field(default_factory=StreamConfig)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    max_frame_bytes: int = 1 << 20
    min_partial_audio_s: float = 0.5
    max_session_s: float = 4 * 3600.0
    early_final_s: float = 0.2
    refresh_waiting_partials: bool = True
    stable_agreement_s: float = PartialStabilizer.DEFAULT_MIN_SPAN_S
    speakers: SpeakerSettings = field(default_factory=SpeakerSettings)


@dataclass
class _Utterance:
    utterance_id: int
    start: int  # sample index on the 16 kHz clock
    config: StreamConfig
    stabilizer: PartialStabilizer = field(default_factory=PartialStabilizer)
    end: int | None = None
    pending_partials: list[InferenceRequest] = field(default_factory=list)  # submitted, outcome not known yet
    next_refresh_at: int = 0  # sample position before which a waiting partial is not refreshed again
    answered_partial_end: int = field(init=False)  # audio end of the newest partial that ran (answered or failed)
    shown_partial_end: int = 0  # audio end of the newest partial sent; older ones arriving later are dropped
    final_request: InferenceRequest | None = None  # the final this utterance waits for
    final_text: str | None = None
    final_truncated: bool = False  # the engine's decode hit its token budget
    final_words: list[Word] | None = None  # the final text's words on the stream clock, if timed
    voiced_start: int = 0  # sample index of the VAD's first voiced frame (after the pre-roll)
    final_confidence: float | None = None
    speaker_embeddings: SpeakerEmbeddings | None = field(default=None, repr=False)  # of a diarize final; never logged
    final_error: Error | None = None
    language: str | None = None
    early_request: InferenceRequest | None = None  # a final decoded while the silence is still short
    early_outcome: tuple[InferenceResult | None, str | None, str] | None = None  # (result, error, code)
    continues: _Utterance | None = field(default=None, repr=False)  # the utterance cut at max_utterance_s just before

    def __post_init__(self) -> None:
        self.answered_partial_end = self.start  # none yet: the cadence counts from the utterance's start

    @property
    def last_partial_at(self) -> int:
        """Audio end of the newest partial that is queued, running or has run: the partial cadence
        counts from it. A superseded one (replaced, or a refresh dropped unrun) no longer counts."""
        return max([self.start + len(r.audio) for r in self.pending_partials] + [self.answered_partial_end])

    def early_covers(self, end: int) -> bool:
        """Whether the early final in flight (or answered) was decoded on exactly ``[start, end)``."""
        early = self.early_request
        return early is not None and early.utterance_id == self.utterance_id and self.start + len(early.audio) == end


class Session:
    """One client stream.

    Args:
        session_id: identifier echoed in ``ready`` and used to key inference requests.
        capabilities: what the serving engine can do; requests outside it get ``bad_config``.
        settings: server bounds and defaults.
    """

    def __init__(self, session_id: str, capabilities: EngineCapabilities, settings: SessionSettings = SessionSettings()):
        self.session_id = session_id
        self.capabilities = capabilities
        self.settings = settings
        self.state = State.AWAITING_START
        self.config = settings.default_config
        self.audio_format: AudioFormat | None = None
        self._decoder: AudioDecoder | None = None
        self._segmenter: VadSegmenter | None = None
        self._history = SampleHistory()  # the open utterance and the VAD's look-back, by absolute index
        self._position = 0  # 16 kHz samples received (after decoding/resampling)
        self._open: _Utterance | None = None
        self._finishing: list[_Utterance] = []  # ended utterances awaiting their final, in order
        self._last_ended: _Utterance | None = None  # the newest utterance whose end was decided
        self._next_utterance_id = 0
        self._next_request_id = 0
        self._nonfinite_reported = 0
        self.utterances_finalized = 0
        self._close = Close(1000, "end of stream")
        self._overload_reported_at: float | None = None  # audio time of the last partial-shedding notice
        self._speakers: SpeakerTracker | None = None  # this session's speaker centroids (diarize), in memory only

    # ---- inputs -------------------------------------------------------------------------------

    @property
    def audio_seconds(self) -> float:
        return self._position / SAMPLE_RATE

    @property
    def pending_requests(self) -> int:
        """Finals not yet answered (partials are not counted: they may be dropped)."""
        return len(self._finishing)

    @property
    def session_ids(self) -> list[str]:
        """Every session id this session's inference requests carry (see ``MultichannelSession``)."""
        return [self.session_id]

    def receive_text(self, text: str) -> list[Action]:
        """The JSON edge: one control message, parsed (:func:`parse_command`) and handled.

        Returns:
            As :meth:`handle`; a message that does not parse becomes an ``error`` event.
        """
        try:
            command = parse_command(text, self.settings.limits)
        except ProtocolError as exc:
            return self.reject(exc)
        return self.handle(command)

    def receive_bytes(self, data: bytes) -> list[Action]:
        """The binary edge: one frame of audio in the declared encoding."""
        return self.handle(Audio(data))

    def reject(self, exc: ProtocolError) -> list[Action]:
        """Answer a control message that could not be parsed, as the session's state asks."""
        refused = self._refuse_control()
        if refused is not None:
            return refused
        try:  # the checks that the command would have met first: the state's, then earlier fields'
            base: StreamConfig | None = None
            if exc.during == "start":
                self._require_awaiting_start()
                base = self.settings.default_config
            elif exc.during == "configure":
                self._require_started()
                base = self.config
            if base is not None and exc.checked_first is not None:
                apply_config(exc.checked_first, base, self.settings.limits)
        except ProtocolError as first:
            exc = first
        return self._protocol_error(exc)

    def handle(self, command: Command) -> list[Action]:
        """Handle one command.

        Returns:
            Actions to carry out, in order. Protocol violations become ``error`` events; only fatal
            ones close the connection.
        """
        if isinstance(command, Audio):
            return self._on_audio(command.data)
        refused = self._refuse_control()
        if refused is not None:
            return refused
        try:
            match command:
                case Start():
                    return self._on_start(command)
                case Configure():
                    return self._on_configure(command)
                case Finalize():
                    return self._on_finalize()
                case Stop():
                    return self._on_stop()
        except ProtocolError as exc:
            return self._protocol_error(exc)
        raise TypeError(f"not a session command: {command!r}")

    def _refuse_control(self) -> list[Action] | None:
        if self.state == State.CLOSED:
            return []  # `end` was the last event; the connection is closing
        if self.state == State.STOPPING:
            return [Send(Error(BAD_MESSAGE, "the stream is stopping; no more messages are accepted"))]
        return None

    def _on_audio(self, data: bytes) -> list[Action]:
        if self.state == State.AWAITING_START:
            return [Send(Error(NOT_STARTED, "audio arrived before \"start\"; the frame was discarded"))]
        if self.state == State.CLOSED:
            return []
        if self.state != State.STREAMING:
            return [Send(Error(BAD_MESSAGE, "audio arrived after \"stop\"; the frame was discarded"))]
        if len(data) > self.settings.max_frame_bytes:
            return [
                Send(
                    Error(
                        TOO_LARGE,
                        f"audio frame of {len(data)} bytes exceeds the limit of {self.settings.max_frame_bytes}; "
                        "the frame was discarded",
                    )
                )
            ]
        assert self._decoder is not None
        samples = self._decoder.decode(data)
        actions = self._ingest(samples)
        limit = self.settings.max_session_s
        if limit and self.audio_seconds >= limit:
            notice = Error(
                SESSION_LIMIT, f"the session reached its limit of {limit:g} s of audio; reconnect to continue", True
            )
            return actions + self.end_stream(notice, 1008, "session length limit")
        if self._decoder.nonfinite_samples > self._nonfinite_reported:
            count = self._decoder.nonfinite_samples - self._nonfinite_reported
            self._nonfinite_reported = self._decoder.nonfinite_samples
            actions.insert(0, Send(Error(BAD_AUDIO, f"{count} non-finite float samples were replaced by silence")))
        return actions

    def inference_done(
        self, request: InferenceRequest, result: InferenceResult | None, error: str | None = None, code: str = INTERNAL
    ) -> list[Action]:
        """Report the outcome of a submitted request.

        Args:
            request: the request from a :class:`Submit` action.
            result: the engine's result, or ``None`` when it failed or was dropped.
            error: why it failed (``None`` with ``result=None`` means dropped/superseded).
            code: the error code to report for a failed final.

        Returns:
            Events to send: a ``partial`` for a partial still relevant; ``final`` events in utterance
            order; ``end`` and a close once a stopping stream has nothing left.
        """
        if self.state == State.CLOSED:
            return []
        if request.kind == "partial":
            return self._partial_done(request, result, error, code)
        open_utterance = self._open
        if open_utterance is not None and request is open_utterance.early_request:
            open_utterance.early_outcome = (result, error, code)  # kept until the silence decides
            return []
        utterance = next((u for u in self._finishing if u.utterance_id == request.utterance_id), None)
        if utterance is None:
            return []
        if request is not utterance.final_request:
            return []  # an answer to a request this utterance no longer waits for
        utterance.final_request = None
        self._settle_final(utterance, result, error, code)
        return self._flush_finals()

    def _settle_final(self, utterance: _Utterance, result: InferenceResult | None, error: str | None, code: str) -> None:
        if result is not None:
            utterance.final_text = utterance.stabilizer.finish(self._own_words(utterance, result.text))
            utterance.final_truncated = result.truncated
            utterance.final_words = final_words(
                utterance.final_text, result.words, utterance.start / SAMPLE_RATE,
                (utterance.end or utterance.start) / SAMPLE_RATE, utterance.voiced_start / SAMPLE_RATE,
            )
            # The published words' mean, not the engine's over its own decode: after the final is
            # reconciled with the stable words, some published words are unscored.
            scored = [w.confidence for w in utterance.final_words or () if w.confidence is not None]
            utterance.final_confidence = round(sum(scored) / len(scored), 3) if scored else None
            utterance.speaker_embeddings = result.speaker
            utterance.language = result.language or utterance.config.language
        # Settled: the piece it continued is not needed any more (no chain of cut pieces is kept).
        utterance.continues = None
        if result is None:
            utterance.final_error = Error(
                code, f"utterance {utterance.utterance_id} could not be transcribed: {error or 'dropped'}",
                False, utterance_id=utterance.utterance_id, start=round_time(utterance.start / SAMPLE_RATE),
                end=round_time((utterance.end or 0) / SAMPLE_RATE),
            )

    def connection_lost(self) -> None:
        """The client went away: drop everything; later worker results are ignored."""
        self.state = State.CLOSED
        self._history.clear()
        self._open = None
        self._finishing.clear()
        self._speakers = None

    # ---- control messages ---------------------------------------------------------------------

    def _on_start(self, command: Start) -> list[Action]:
        self._require_awaiting_start()
        audio = check_audio_format(command.audio)
        if command.multichannel is not None:  # only a MultichannelSession splits channels
            raise ProtocolError(BAD_CONFIG, "unknown field(s) in start: multichannel")
        config = apply_config(command.options, self.settings.default_config, self.settings.limits)
        self._check_capability(config)
        self.audio_format = audio
        self.config = config
        self._decoder = AudioDecoder(audio)
        self._segmenter = VadSegmenter(config.vad)
        self.state = State.STREAMING
        return [Send(Ready(self.session_id, self.capabilities.to_wire(), audio, config))]

    def _on_configure(self, command: Configure) -> list[Action]:
        self._require_started()
        config = apply_config(command.options, self.config, self.settings.limits)
        self._check_capability(config)
        self.config = config
        assert self._segmenter is not None
        self._segmenter.reconfigure(config.vad)
        assert self.audio_format is not None
        return [Send(Configured(self.audio_format, config))]

    def _on_finalize(self) -> list[Action]:
        self._require_started()
        assert self._segmenter is not None
        return self._handle_vad_events(self._segmenter.force_end())

    def _on_stop(self) -> list[Action]:
        self._require_started()
        return self.end_stream()

    def end_stream(self, notice: Error | None = None, close_code: int = 1000, close_reason: str = "end of stream") -> list[Action]:
        """Finish the stream as ``stop`` does: finalize open audio, send finals, then ``end`` and close.

        Used for the client's ``stop`` and by the server for a drain (close 1001), an idle timeout or
        a session-length limit; nothing already received is dropped.

        Args:
            notice: an event (e.g. an ``error`` saying why) sent before the finals.
            close_code, close_reason: the WebSocket close to perform after ``end``.
        """
        actions: list[Action] = [Send(notice)] if notice else []
        if self.state == State.AWAITING_START:
            self.state = State.CLOSED
            return actions + [Close(close_code, close_reason)]
        if self.state != State.STREAMING:
            return actions
        assert self._decoder is not None and self._segmenter is not None
        actions += self._ingest(self._decoder.flush())
        actions += self._handle_vad_events(self._segmenter.force_end())
        self.state = State.STOPPING
        self._close = Close(close_code, close_reason)
        return actions + self._maybe_end()

    def _require_awaiting_start(self) -> None:
        if self.state != State.AWAITING_START:
            raise ProtocolError(ALREADY_STARTED, "\"start\" was already received; use \"configure\" to change settings")

    def _require_started(self) -> None:
        if self.state == State.AWAITING_START:
            raise ProtocolError(NOT_STARTED, "send \"start\" first")

    def _check_capability(self, config: StreamConfig) -> None:
        partial_mode = config.partials or None
        problem = self.capabilities.check(
            config.task, config.language, config.target_language, config.keywords, partial_mode
        )
        if problem:
            raise ProtocolError(BAD_CONFIG, problem)
        if config.diarize and not self.capabilities.diarization:
            raise ProtocolError(BAD_CONFIG, f"engine {self.capabilities.name} ({self.capabilities.model}) cannot label "
                                            "speakers on this server (docs/diarization.md)")
        if config.vad.max_utterance_s > self.settings.limits.max_utterance_s:
            raise ProtocolError(BAD_CONFIG, f"vad.max_utterance_s exceeds {self.settings.limits.max_utterance_s}")

    def _protocol_error(self, exc: ProtocolError) -> list[Action]:
        actions: list[Action] = [Send(exc.to_event())]
        if exc.fatal:
            self.state = State.CLOSED
            actions.append(Close(1008, exc.code))
        return actions

    # ---- audio path ---------------------------------------------------------------------------

    def _ingest(self, samples: np.ndarray) -> list[Action]:
        if len(samples) == 0:
            return []
        assert self._segmenter is not None
        self._history.append(samples)
        self._position += len(samples)
        actions = self._handle_vad_events(self._segmenter.feed(samples))
        actions += self._maybe_early_final()
        actions += self._maybe_partial()
        self._trim_buffer()
        return actions

    def _handle_vad_events(self, events: list) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            if isinstance(event, VadSpeechStarted):
                utterance = _Utterance(self._next_utterance_id, event.start, self.config,
                                       PartialStabilizer(min_span_s=self.settings.stable_agreement_s))
                utterance.voiced_start = event.start if event.voiced is None else event.voiced
                if self._last_ended is not None and self._last_ended.end == event.start:
                    # The VAD cut the speech at max_utterance_s: this is the same speech going on.
                    utterance.continues = self._last_ended
                self._next_utterance_id += 1
                self._open = utterance
                actions.append(Send(SpeechStarted(utterance.utterance_id, round_time(event.start / SAMPLE_RATE))))
            elif isinstance(event, VadSpeechEnded) and self._open is not None:
                utterance = self._open
                self._open = None
                utterance.end = max(event.end, utterance.start)
                # Only a cut at max_utterance_s continues into the next utterance. After a silence
                # or a finalize the next one may also start exactly here (the VAD floors its start
                # at the previous end when the pause is shorter than pre-roll + post-roll), but it
                # is new speech, not this speech going on.
                self._last_ended = utterance if event.reason == "max_length" else None
                self._finishing.append(utterance)
                # The VAD (or finalize/stop) decided: the one moment speech ends. Adapters announce
                # it from this event (an early final is submitted at a short pause too, so the
                # shape of an inference request says nothing about the end of speech).
                actions.append(
                    Send(SpeechEnded(utterance.utterance_id, round_time(utterance.end / SAMPLE_RATE), event.reason))
                )
                early, outcome = utterance.early_request, utterance.early_outcome
                covered = utterance.early_covers(utterance.end)
                utterance.early_request = utterance.early_outcome = None
                if covered and (outcome is None or outcome[0] is not None):
                    # The speculative final covers exactly this audio: use it (now, or when it lands).
                    if outcome is None:
                        utterance.final_request = early
                    else:
                        self._settle_final(utterance, *outcome)
                        actions += self._flush_finals()
                    continue
                # The final is decoded freely: forcing the stable prefix into the decoder made the
                # rest of the utterance worse (measured on the asterisk-en dev set). The stable words
                # still lead the final: PartialStabilizer.finish reconciles the free decode with them.
                utterance.final_request = self._request(utterance, "final", utterance.end, prefix="")
                actions.append(Submit(utterance.final_request))
        return actions

    def _maybe_early_final(self) -> list[Action]:
        utterance, segmenter = self._open, self._segmenter
        if utterance is None or segmenter is None or self.settings.early_final_s <= 0:
            return []
        end = segmenter.tentative_end
        if end is None:
            # Speech resumed: an early final in flight answers a question nobody asks any more.
            utterance.early_request = utterance.early_outcome = None
            return []
        if segmenter.trailing_silence < self.settings.early_final_s * SAMPLE_RATE:
            return []
        if utterance.early_covers(end):
            return []
        if end > self._position or end <= utterance.start:
            return []
        utterance.early_outcome = None
        utterance.early_request = self._request(utterance, "final", end, prefix="")
        return [Submit(utterance.early_request)]

    def _maybe_partial(self) -> list[Action]:
        utterance = self._open
        if utterance is None or not utterance.config.partials:
            return []
        config = utterance.config
        if utterance.early_request is not None:
            return []  # the speaker paused and the final is on its way; a partial would only add silence
        pending = utterance.pending_partials
        if len(pending) >= 2:
            return []  # a refresh whose fate is not known yet
        interval = int(config.partial_interval * SAMPLE_RATE)
        if self._position - utterance.last_partial_at < interval:
            return []
        if pending and (not self.settings.refresh_waiting_partials or self._position < utterance.next_refresh_at):
            return []
        if self._position - utterance.start < self.settings.min_partial_audio_s * SAMPLE_RATE:
            return []
        request = self._request(utterance, "partial", self._position)
        if pending:
            # One is submitted and not answered. If it still waits in the queue, this one takes its
            # place (one partial either way, on fresher audio): under load it would otherwise reach the
            # engine as stale as its wait. If it has started, the scheduler drops this one unrun.
            request.refresh_only = True
            utterance.next_refresh_at = self._position + interval
        pending.append(request)
        return [Submit(request)]

    def _request(self, utterance: _Utterance, kind: str, end: int, prefix: str | None = None) -> InferenceRequest:
        config = utterance.config
        audio = self._history.slice(utterance.start, end)
        return InferenceRequest(
            session_id=self.session_id,
            utterance_id=utterance.utterance_id,
            kind=kind,  # type: ignore[arg-type]
            audio=audio,
            task=config.task,
            language=config.language,
            target_language=config.target_language,
            keywords=config.keywords,
            prefix=utterance.stabilizer.stable_text if prefix is None else prefix,
            partial_mode=config.partials or "llm",
            request_id=self._next_id(),
            # Partials carry it too: the first one starts loading the speaker encoder (loaded on
            # demand), so the session's first final does not wait for the load.
            diarize=config.diarize,
            context=self._context(utterance),
        )

    @staticmethod
    def _context(utterance: _Utterance) -> str:
        """The text of the piece a cut utterance continues (its final, or its stable words while that
        is still decoding): words just after a cut at max_utterance_s otherwise lose their left
        context (asterisk-en, one stream: "Dial 4." came out "Dau 4." after a cut)."""
        before = utterance.continues
        if before is None:
            return ""
        return before.final_text if before.final_text is not None else before.stabilizer.stable_text

    def _own_words(self, utterance: _Utterance, text: str) -> str:
        """A hypothesis of ``utterance`` without the words that echo the end of the piece it
        continues after a cut (:func:`~stream_server.core.stabilizer.drop_repeated_lead`)."""
        return drop_repeated_lead(self._context(utterance), text) if utterance.continues is not None else text

    def _next_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    def _trim_buffer(self) -> None:
        # Keep the open utterance's audio, plus enough history for the VAD's pre-roll of the next one.
        assert self._segmenter is not None
        keep_from = self._position - self._segmenter.lookback_samples - SAMPLE_RATE
        if self._open is not None:
            keep_from = min(keep_from, self._open.start)
        if keep_from - self._history.origin > SAMPLE_RATE:  # trim in chunks to avoid copying on every frame
            self._history.forget_before(keep_from)

    # ---- results ------------------------------------------------------------------------------

    def _partial_done(
        self, request: InferenceRequest, result: InferenceResult | None, error: str | None, code: str
    ) -> list[Action]:
        actions: list[Action] = []
        if result is None and code == OVERLOADED and (
            self._overload_reported_at is None or self.audio_seconds - self._overload_reported_at >= 10.0
        ):
            # Shedding partials is the first step of backpressure; say so (at most every 10 s of audio).
            self._overload_reported_at = self.audio_seconds
            actions.append(Send(Error(OVERLOADED, f"server busy: partial results are being skipped ({error})")))
        utterance = self._open
        if utterance is None or utterance.utterance_id != request.utterance_id:
            return actions  # the utterance ended meanwhile; its final supersedes this partial
        utterance.pending_partials = [r for r in utterance.pending_partials if r is not request]
        end = utterance.start + len(request.audio)
        if result is not None or error is not None:  # not when superseded: that one never ran
            utterance.answered_partial_end = max(utterance.answered_partial_end, end)
        if result is not None and end > utterance.shown_partial_end:
            utterance.shown_partial_end = end
            text, stable = utterance.stabilizer.update(self._own_words(utterance, result.text), request.duration)
            actions.append(
                Send(Partial(utterance.utterance_id, text, stable, round_time(utterance.start / SAMPLE_RATE),
                             round_time((utterance.start + len(request.audio)) / SAMPLE_RATE)))
            )
        return actions + self._maybe_partial()

    def _flush_finals(self) -> list[Action]:
        # Finals go out in utterance order even if a later one finished first.
        actions: list[Action] = []
        while self._finishing and (self._finishing[0].final_text is not None or self._finishing[0].final_error):
            utterance = self._finishing.pop(0)
            if utterance.final_error is not None:
                actions.append(Send(utterance.final_error))
            else:
                config = utterance.config
                assert utterance.final_text is not None
                # No words: the engine could not time this final's words (the wire says "timing": "utterance").
                words = None if utterance.final_words is None else \
                    tuple(FinalWord(w.word, w.start, w.end, w.confidence) for w in utterance.final_words)
                event = Final(
                    utterance.utterance_id, utterance.final_text, round_time(utterance.start / SAMPLE_RATE),
                    round_time((utterance.end or utterance.start) / SAMPLE_RATE), utterance.language, config.task,
                    target_language=(config.target_language or "en") if config.task == "translate" else None,
                    truncated=utterance.final_truncated, words=words,
                    confidence=utterance.final_confidence if words is not None else None,
                )
                if config.diarize and utterance.speaker_embeddings is not None:
                    event = self._label_speaker(event, utterance, utterance.speaker_embeddings)
                actions.append(Send(event))
            self.utterances_finalized += 1
        return actions + self._maybe_end()

    def _label_speaker(self, event: Final, utterance: _Utterance, embeddings: SpeakerEmbeddings) -> Final:
        # Called in publishing (utterance) order, so labels number speakers by first appearance.
        if self._speakers is None:
            self._speakers = SpeakerTracker(self.settings.speakers)
        attribution = self._speakers.attribute(embeddings, event.start, event.end)
        utterance.speaker_embeddings = None  # the centroids keep what is needed; the rest is dropped now
        return replace(
            event, speaker=attribution.speaker, speaker_turns=tuple(attribution.turns) if attribution.changes else (),
            words=None if event.words is None else
            tuple(replace(w, speaker=attribution.speaker_at(w.start, w.end)) for w in event.words),
        )

    def _maybe_end(self) -> list[Action]:
        if self.state != State.STOPPING or self._finishing:
            return []
        self.state = State.CLOSED
        return [
            Send(End(self.utterances_finalized, round_time(self.audio_seconds))),
            self._close,
        ]


__all__ = ["Action", "Close", "Send", "Session", "SessionSettings", "State", "Submit", "OVERLOADED"]
