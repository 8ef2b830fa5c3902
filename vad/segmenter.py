"""Sans-I/O utterance segmenter: audio samples in, speech start/end events out.

The segmenter holds no audio and does no I/O, in the style of h11: the caller
feeds float32 samples as they arrive and gets back events that name sample
indices on one 16 kHz clock, counted from the first sample ever fed (0-based,
never reset). The caller keeps the audio itself (see
:attr:`VadSegmenter.lookback_samples` for how much history a start may reach
back into) and cuts utterances ``[start, end)`` out of it.

Guarantees, for any sequence of calls:

* events come in stream order and alternate ``SpeechStarted`` /
  ``SpeechEnded``, beginning with ``SpeechStarted``;
* utterances never overlap: each start is >= the previous end;
* ``start < end <= position`` at the time the end is returned;
* without ``force_end``/``reconfigure`` calls, the events depend only on the
  audio, not on how it was split into ``feed`` calls.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from .classifier import FrameClassifier, frame_block, onset_smear_frames, sanitize

__all__ = [
    "SpeechEnded",
    "SpeechStarted",
    "VadConfig",
    "VadEvent",
    "VadSegmenter",
]

EndReason = Literal["silence", "max_length", "forced"]


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a frame size is a caller bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def brief(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages that quote what a client
    sent: a 400-digit number or a 10 kB string is named, not echoed back whole."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(shown)} characters)"


def is_real(value: object) -> bool:
    """Whether ``value`` is a finite real number as JSON gives them (an int or float, not a bool).

    The VAD's settings and the protocol's numeric fields check their values with it."""
    # Python ints are exact and always finite; math.isfinite would overflow on a 400-digit one.
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))


@dataclass(frozen=True)
class VadConfig:
    """Segmentation parameters. Immutable; build a new one to change settings.

    Attributes:
        aggressiveness: webrtcvad mode 0 (least) .. 3 (most aggressive in
            rejecting non-speech).
        frame_ms: analysis frame, 10, 20 or 30 ms (webrtcvad's frame sizes).
        start_ms: voiced audio needed, within a short sliding window, before
            speech is declared. Measured in real voicing: webrtcvad's own
            hangover and filter spread are discounted (see
            :func:`vad.classifier.onset_smear_frames`), so a click shorter than
            this does not start speech. Resolution is one frame.
        silence_ms: consecutive non-speech that ends an utterance.
        pre_roll_ms: audio before the first voiced frame that belongs to the
            utterance, so that soft onsets are not clipped.
        post_roll_ms: audio kept after the last voiced frame (clamped so an
            end never lies beyond the audio seen when it is decided).
        max_utterance_s: an utterance reaching this length is split at the
            quietest recent frame.
        min_energy_dbfs: frames with RMS below this (dB re full scale 1.0) are
            non-speech whatever webrtcvad says: a guard against digital silence,
            hum and webrtcvad's hangover on silence.
    """

    aggressiveness: int = 2
    frame_ms: int = 30
    start_ms: int = 90
    silence_ms: int = 500
    pre_roll_ms: int = 300
    post_roll_ms: int = 150
    max_utterance_s: float = 20.0
    min_energy_dbfs: float = -60.0

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: listing every out-of-range or wrongly typed field.
        """
        problems: list[str] = []

        def int_range(name: str, lo: int, hi: int, unit: str = "") -> None:
            value = getattr(self, name)
            if not _is_int(value) or not lo <= value <= hi:
                problems.append(f"{name} must be an integer in {lo}..{hi}{unit}, got {brief(value)}")

        int_range("aggressiveness", 0, 3, " (webrtcvad mode)")
        if not _is_int(self.frame_ms) or self.frame_ms not in (10, 20, 30):
            problems.append(
                f"frame_ms must be 10, 20 or 30 (the frame sizes webrtcvad accepts), got {brief(self.frame_ms)}"
            )
        int_range("start_ms", 0, 2000, " ms")
        int_range("silence_ms", 100, 5000, " ms")
        int_range("pre_roll_ms", 0, 2000, " ms")
        int_range("post_roll_ms", 0, 2000, " ms")
        if not is_real(self.max_utterance_s) or not 1.0 <= self.max_utterance_s <= 120.0:
            problems.append(f"max_utterance_s must be a number in 1..120 s, got {brief(self.max_utterance_s)}")
        if not is_real(self.min_energy_dbfs) or not -120.0 <= self.min_energy_dbfs <= 0.0:
            problems.append(f"min_energy_dbfs must be a number in -120..0 dBFS, got {brief(self.min_energy_dbfs)}")
        if problems:
            raise ValueError("invalid VadConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class SpeechStarted:
    """An utterance begins at sample index ``start`` (inclusive).

    ``voiced`` is where its first voiced frame begins (``start`` plus the pre-roll, unless the
    pre-roll was cut short; equal to ``start`` for the continuation after a max-length cut):
    nothing before it was classified as speech. ``None`` means unknown, taken as ``start``.
    """

    start: int
    voiced: int | None = None


@dataclass(frozen=True)
class SpeechEnded:
    """The open utterance ends at sample index ``end`` (exclusive).

    ``reason`` is ``"silence"`` (``silence_ms`` of non-speech), ``"max_length"``
    (split at ``max_utterance_s``; a ``SpeechStarted`` at the same index usually
    follows in the same event list) or ``"forced"`` (:meth:`VadSegmenter.force_end`).
    """

    end: int
    reason: EndReason


VadEvent = Union[SpeechStarted, SpeechEnded]


@dataclass(frozen=True)
class _Params:
    """A VadConfig turned into the sample and frame counts the hot loop uses."""

    frame_len: int  # samples per frame
    start_frames: int  # voiced frames in the window that declare speech
    start_frames_gated: int  # the same, once the energy gate has cut webrtcvad's hangover
    window_frames: int  # sliding window for the start decision
    silence_frames: int  # consecutive non-speech frames that end speech
    pre_roll: int  # samples
    post_roll: int  # samples
    max_len: int  # samples

    @classmethod
    def from_config(cls, config: VadConfig, sample_rate: int) -> _Params:
        fm = config.frame_ms
        voiced_frames = max(1, math.ceil(config.start_ms / fm))
        start_frames = voiced_frames + onset_smear_frames(config.aggressiveness, fm)
        return cls(
            frame_len=sample_rate * fm // 1000,
            start_frames=start_frames,
            # When the gate rejects a frame webrtcvad called speech, the voiced
            # run before it ran into near-silence: the gate ate its hangover and
            # filter spread, so only frame-boundary slack (one frame) remains.
            # Without this, short words in noise-suppressed (near-zero) audio
            # would need start_ms + ~120 ms of voicing.
            start_frames_gated=voiced_frames + 1,
            # Slack of half the voiced requirement lets a short dip inside an
            # onset (a stop consonant) not reset the count, while the window
            # stays short enough that scattered clicks never add up.
            window_frames=start_frames + math.ceil(voiced_frames / 2),
            silence_frames=math.ceil(config.silence_ms / fm),
            pre_roll=sample_rate * config.pre_roll_ms // 1000,
            post_roll=sample_rate * config.post_roll_ms // 1000,
            max_len=round(config.max_utterance_s * sample_rate),
        )

    @property
    def lookback(self) -> int:
        return self.window_frames * self.frame_len + self.pre_roll


class VadSegmenter:
    """Turns a 16 kHz mono sample stream into utterance start/end events.

    One instance per audio stream; not thread-safe. Typical per-frame cost is
    one webrtcvad call plus a few Python operations; conversion to int16 and
    frame energies are computed once per ``feed`` call with numpy.
    """

    SAMPLE_RATE = 16000

    def __init__(self, config: VadConfig = VadConfig()) -> None:
        """Create a segmenter positioned at sample 0.

        Args:
            config: segmentation parameters.

        Raises:
            ValueError: if ``config`` is invalid (see :meth:`VadConfig.validate`).
        """
        config.validate()
        self._config = config
        self._params = _Params.from_config(config, self.SAMPLE_RATE)
        self._pending: VadConfig | None = None
        self._classifier = FrameClassifier(config.aggressiveness, config.min_energy_dbfs)
        self._tail = np.zeros(0, dtype=np.float32)  # partial frame carried to the next feed
        self._frame_pos = 0  # start of the next frame to classify
        self._floor = 0  # no utterance may start before this (previous end / forced end)
        self._utt_start: int | None = None
        # Idle state: recent frames as (start, voiced, rms) for the start decision.
        self._window: deque[tuple[int, bool, float]] = deque(maxlen=self._params.window_frames)
        self._window_voiced = 0
        # Speech state.
        self._last_voiced_end = 0
        self._silent_run = 0
        self._hist_start: list[int] = []  # frame starts of the open utterance, for max-length cuts
        self._hist_rms: list[float] = []

    # ------------------------------------------------------------------ public

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open (a SpeechStarted awaits its SpeechEnded)."""
        return self._utt_start is not None

    @property
    def position(self) -> int:
        """Number of samples fed so far, including a buffered partial frame."""
        return self._frame_pos + len(self._tail)

    @property
    def utterance_start(self) -> int | None:
        """Start index of the open utterance, or None when not in speech."""
        return self._utt_start

    @property
    def trailing_silence(self) -> int:
        """Samples of non-speech since the open utterance's last voiced frame (0 when idle or voiced)."""
        return self._silent_run * self._params.frame_len if self._utt_start is not None else 0

    @property
    def tentative_end(self) -> int | None:
        """Where the open utterance ends if the silence now under way lasts ``silence_ms``.

        Returns:
            The ``SpeechEnded.end`` that the silence would produce (the same value, not an
            estimate: both are the last voiced frame's end plus the post-roll, clamped as
            ``feed`` clamps it), or ``None`` when idle or the last frame was voiced. An end made
            otherwise (a max-length split, :meth:`force_end`, a pending reconfigure) can differ;
            callers must compare before reusing work done for this end.
        """
        if self._utt_start is None or self._silent_run == 0:
            return None
        p = self._params
        # The frame that completes silence_ms ends silence_frames frames after the last voiced one.
        return self._silence_end(self._last_voiced_end + p.silence_frames * p.frame_len)

    def _silence_end(self, frame_end: int) -> int:
        """Where an utterance ends when the silence completes in the frame ending at ``frame_end``."""
        return min(self._last_voiced_end + self._params.post_roll, frame_end)

    @property
    def config(self) -> VadConfig:
        """The configuration in effect now (a pending reconfigure is not yet included)."""
        return self._config

    @property
    def lookback_samples(self) -> int:
        """How far back a start can reach: size the caller's audio history by this.

        A ``SpeechStarted.start`` returned by ``feed`` is never smaller than the
        :attr:`position` before that ``feed`` call minus this value, under the
        current or the pending configuration.
        """
        pending = self._pending
        lookback = self._params.lookback
        if pending is not None:
            lookback = max(lookback, _Params.from_config(pending, self.SAMPLE_RATE).lookback)
        return lookback

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Consume audio and return the events it completes.

        Args:
            samples: float mono 16 kHz audio in [-1, 1], any length including 0.
                Values outside [-1, 1] are clipped; NaN and inf count as 0. The
                array is not modified or retained.

        Returns:
            Events decided by complete frames of this audio, in order. A trailing
            partial frame is buffered and classified when a later ``feed``
            completes it.

        Raises:
            TypeError: if ``samples`` is not a floating-point numpy array.
            ValueError: if ``samples`` is not 1-D.
        """
        x = sanitize(samples)
        events: list[VadEvent] = []
        if x.size == 0:
            return events
        data = np.concatenate((self._tail, x)) if self._tail.size else x
        total = len(data)
        offset = 0
        while True:
            n = self._params.frame_len
            count = (total - offset) // n
            if count == 0:
                break
            pcm, rms = frame_block(data[offset : offset + count * n], n)
            nbytes = 2 * n
            for i in range(count):
                self._step(pcm[i * nbytes : (i + 1) * nbytes], rms[i], events)
                offset += n
                if self._params.frame_len != n:
                    # A pending reconfigure took effect with another frame
                    # size; re-slice the rest of the audio with it.
                    break
        # Copy: a view would pin (and alias) the caller's whole array.
        self._tail = data[offset:].copy()
        return events

    def force_end(self) -> list[VadEvent]:
        """End the open utterance here (client endpoint or end of stream).

        The end is :attr:`position`: all samples fed so far, including a
        buffered partial frame. Afterwards the segmenter is idle, a new
        utterance again needs ``start_ms`` of voiced audio, and no later
        utterance starts before this point (also when called while idle: the
        caller declared a boundary). A pending reconfigure takes effect.

        Returns:
            ``[SpeechEnded(position, "forced")]`` if an utterance was open, else ``[]``.
        """
        pos = self.position
        events: list[VadEvent] = []
        if self._utt_start is not None:
            events.append(SpeechEnded(pos, "forced"))
        self._go_idle(pos)
        return events

    def reconfigure(self, config: VadConfig) -> None:
        """Replace the configuration from the next utterance on.

        Applied at once when idle; otherwise when the open utterance ends by
        silence or :meth:`force_end`. A max-length split continues the same
        speech under the old settings. A later call replaces a pending one.
        The webrtcvad noise model is kept either way.

        Raises:
            ValueError: if ``config`` is invalid; nothing changes then.
        """
        config.validate()
        if self._utt_start is None:
            self._apply(config)
        else:
            self._pending = config

    # ----------------------------------------------------------------- internal

    def _apply(self, config: VadConfig) -> None:
        params = _Params.from_config(config, self.SAMPLE_RATE)
        # Window entries are frame-sized; entries of another size would
        # miscount the voiced time, so they are dropped (costs at most one
        # window of start latency, once).
        same_frames = params.frame_len == self._params.frame_len
        kept = list(self._window)[-params.window_frames :] if same_frames else []
        self._window = deque(kept, maxlen=params.window_frames)
        self._window_voiced = sum(1 for _, voiced, _ in kept if voiced)
        self._classifier.set_mode(config.aggressiveness, config.min_energy_dbfs)
        self._config = config
        self._params = params
        self._pending = None

    def _go_idle(self, boundary: int) -> None:
        self._utt_start = None
        self._floor = boundary
        self._hist_start.clear()
        self._hist_rms.clear()
        self._window.clear()
        self._window_voiced = 0
        if self._pending is not None:
            self._apply(self._pending)

    def _step(self, frame: bytes, rms: float, events: list[VadEvent]) -> None:
        start = self._frame_pos
        end = start + self._params.frame_len
        self._frame_pos = end
        voiced, gated = self._classifier.classify(frame, rms)
        if self._utt_start is None:
            self._idle_step(start, end, voiced, gated, rms, events)
        else:
            self._speech_step(start, end, voiced, rms, events)

    def _idle_step(
        self, start: int, end: int, voiced: bool, gated: bool, rms: float, events: list[VadEvent]
    ) -> None:
        window = self._window
        if len(window) == window.maxlen and window[0][1]:
            self._window_voiced -= 1
        window.append((start, voiced, rms))
        p = self._params
        if voiced:
            self._window_voiced += 1
            needed = p.start_frames
        elif gated and len(window) >= 2 and window[-2][1]:
            # Only right after the run: a run that ended in webrtcvad's own
            # "no" (then went quiet) did carry its hangover.
            needed = p.start_frames_gated
        else:
            return
        if self._window_voiced < needed:
            return
        first_voiced = next(s for s, v, _ in window if v)
        utt_start = max(first_voiced - p.pre_roll, self._floor)
        events.append(SpeechStarted(utt_start, first_voiced))
        self._utt_start = utt_start
        # On a gated frame the last voiced frame lies behind us; continue the
        # silence count from there so the end comes as it would have.
        silent_run = 0
        for s, v, _ in reversed(window):
            if v:
                self._last_voiced_end = s + p.frame_len
                break
            silent_run += 1
        self._silent_run = silent_run
        self._hist_start = [s for s, _, _ in window]
        self._hist_rms = [r for _, _, r in window]
        window.clear()
        self._window_voiced = 0
        # A long pre-roll with a short max length can make the utterance
        # over-long at birth.
        if end - utt_start >= p.max_len:
            self._split(end, events)

    def _speech_step(self, start: int, end: int, voiced: bool, rms: float, events: list[VadEvent]) -> None:
        self._hist_start.append(start)
        self._hist_rms.append(rms)
        p = self._params
        if voiced:
            self._last_voiced_end = end
            self._silent_run = 0
        else:
            self._silent_run += 1
            if self._silent_run >= p.silence_frames:
                utt_end = self._silence_end(end)
                events.append(SpeechEnded(utt_end, "silence"))
                self._go_idle(utt_end)
                return
        assert self._utt_start is not None
        if end - self._utt_start >= p.max_len:
            self._split(end, events)

    def _split(self, end: int, events: list[VadEvent]) -> None:
        """Cut the open utterance at its quietest recent frame (max length reached)."""
        utt_start = self._utt_start
        assert utt_start is not None
        length = end - utt_start
        # Search the last 30 % (at least 1 s) for a pause, but never the first
        # half, so that each piece keeps at least half the maximum length.
        span = min(max(int(0.3 * length), self.SAMPLE_RATE), length // 2)
        search_from = end - span
        starts, levels = self._hist_start, self._hist_rms
        best_i = len(starts) - 1  # the current frame always qualifies (span >= frame)
        best = levels[best_i]
        # Newest first, strict '<': ties go to the latest quiet frame, which
        # keeps the most audio in the finished piece.
        for i in range(len(starts) - 2, -1, -1):
            s = starts[i]
            if s < search_from or s <= utt_start:
                break
            if levels[i] < best:
                best, best_i = levels[i], i
        cut = starts[best_i] + self._params.frame_len // 2
        events.append(SpeechEnded(cut, "max_length"))
        if self._last_voiced_end > cut:
            events.append(SpeechStarted(cut, cut))
            self._utt_start = cut
            self._floor = cut
            del starts[: best_i + 1]
            del levels[: best_i + 1]
        else:
            # Nothing voiced after the cut: the speaker has stopped and the
            # tail is trailing silence, so close instead of opening an
            # utterance of silence.
            self._go_idle(cut)
