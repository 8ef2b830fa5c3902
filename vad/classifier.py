"""Per-frame speech classification: webrtcvad behind an energy gate.

This module knows about webrtcvad's input format and quirks; the segmenter
(:mod:`vad.segmenter`) only sees a decision, a "gated" flag and the RMS of
each frame.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

__all__ = [
    "FrameClassifier",
    "frame_block",
    "onset_smear_frames",
    "sanitize",
]

SAMPLE_RATE = 16000
_INT16_SCALE = 32767.0

# webrtcvad's own hangover ("over_hang" in vad_core.c, kOverHangMax1*): after a
# short detection it keeps reporting speech for this many extra frames, per
# mode and frame size (10, 20, 30 ms). Same values as upstream; 5 ms clicks
# through webrtcvad-wheels 2.0.14 show exactly this many trailing frames.
_OVERHANG_FRAMES: dict[int, tuple[int, int, int]] = {
    0: (8, 4, 3),
    1: (8, 4, 3),
    2: (6, 3, 2),
    3: (6, 3, 2),
}


def onset_smear_frames(aggressiveness: int, frame_ms: int) -> int:
    """Return how many extra voiced frames webrtcvad may report for a short event.

    In a non-silent room a 5 ms click makes webrtcvad report one or two voiced
    frames (its band-split filters spread the energy into the following frame)
    plus its hangover: 4 frames (120 ms) at mode 2 / 30 ms. The segmenter adds
    this many frames to its start threshold so that ``start_ms`` means real
    voiced audio, not webrtcvad's smeared report of it; without it a single
    click starts an utterance at the default config.

    Args:
        aggressiveness: webrtcvad mode, 0..3.
        frame_ms: 10, 20 or 30.

    Returns:
        The number of frames to discount (hangover + 1 frame of filter spread).

    Raises:
        KeyError: for a mode or frame size webrtcvad does not support.
    """
    index = {10: 0, 20: 1, 30: 2}[frame_ms]
    return _OVERHANG_FRAMES[aggressiveness][index] + 1


def sanitize(samples: np.ndarray) -> np.ndarray:
    """Validate caller audio and return it as float32 without NaN/inf.

    Args:
        samples: 1-D array of floating-point samples (any float dtype).

    Returns:
        A float32 array (may be ``samples`` itself when it is already float32
        and finite; callers must not modify it in place).

    Raises:
        TypeError: if ``samples`` is not a floating-point numpy array; integer
            PCM would otherwise be silently misread as full-scale noise.
        ValueError: if ``samples`` is not 1-D.
    """
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"samples must be a numpy ndarray, got {type(samples).__name__}")
    if samples.dtype.kind != "f":
        raise TypeError(
            f"samples must be floating point in [-1, 1] (float32), got dtype {samples.dtype}; "
            "convert int16 PCM with samples.astype(np.float32) / 32768"
        )
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D mono audio, got shape {samples.shape}")
    x = samples.astype(np.float32, copy=False)
    # One reduction over the chunk is far cheaper than per-frame checks, and a
    # single NaN would otherwise poison the frame RMS and the int16 cast.
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def frame_block(block: np.ndarray, frame_len: int) -> tuple[bytes, list[float]]:
    """Convert whole frames of float audio to int16 PCM bytes and per-frame RMS.

    Done once per ``feed`` call for all complete frames so that the per-frame
    Python loop only slices bytes and compares floats.

    Args:
        block: float32 samples, finite, length a multiple of ``frame_len``.
        frame_len: samples per frame.

    Returns:
        ``(pcm, rms)``: little-endian int16 bytes of the clipped block (2 bytes
        per sample), and the RMS of each frame on the clipped float signal
        (full scale = 1.0) as Python floats.
    """
    clipped = np.clip(block, -1.0, 1.0)
    frames = clipped.reshape(-1, frame_len)
    rms = np.sqrt(np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame_len)
    pcm = np.rint(clipped * _INT16_SCALE).astype("<i2").tobytes()
    return pcm, rms.tolist()


class FrameClassifier:
    """Speech/non-speech decision for one frame: webrtcvad AND an energy floor.

    One instance per stream: webrtcvad adapts its noise model to the audio it
    has seen, so it must see every frame of the stream in order.
    """

    def __init__(self, aggressiveness: int, min_energy_dbfs: float) -> None:
        """Create a classifier.

        Args:
            aggressiveness: webrtcvad mode 0..3 (validated by ``VadConfig``).
            min_energy_dbfs: frames whose RMS (re full scale 1.0) is below this
                level are non-speech whatever webrtcvad says.
        """
        self._vad = webrtcvad.Vad(aggressiveness)
        self._min_rms = 10.0 ** (min_energy_dbfs / 20.0)

    def set_mode(self, aggressiveness: int, min_energy_dbfs: float) -> None:
        """Change the webrtcvad mode and energy floor, keeping the noise model."""
        self._vad.set_mode(aggressiveness)
        self._min_rms = 10.0 ** (min_energy_dbfs / 20.0)

    def classify(self, pcm_frame: bytes, rms: float) -> tuple[bool, bool]:
        """Classify one frame.

        Args:
            pcm_frame: int16 little-endian bytes of exactly 10, 20 or 30 ms.
            rms: the frame's RMS, as returned by :func:`frame_block`.

        Returns:
            ``(speech, gated)``: ``speech`` is the decision; ``gated`` is True
            when webrtcvad said speech but the energy floor overruled it. Right
            after a voiced run that is webrtcvad's hangover running into
            silence, which tells the segmenter the run carries no hangover.
        """
        # webrtcvad is called even for quiet frames: its noise estimate and
        # hangover counter advance per call, and skipping silent frames would
        # release stale hangover onto the next non-silent frame.
        if self._vad.is_speech(pcm_frame, SAMPLE_RATE):
            # The gate also cuts webrtcvad's hangover on digital silence, which
            # it otherwise reports as speech for up to ~150 ms after speech.
            if rms >= self._min_rms:
                return True, False
            return False, True
        return False, False
