"""Speaker embeddings from Resemblyzer's pretrained GE2E voice encoder, in the project's own module.

The PyPI package ``Resemblyzer==0.1.4`` ships the weights (``resemblyzer/pretrained.pt``, a GE2E
encoder trained on LibriSpeech, VoxCeleb 1 and 2). The package itself imports librosa and the
``webrtcvad`` sdist (which would overwrite the ``webrtcvad-wheels`` module the VAD uses), so it is
installed without its dependencies and only its weights file is read: the network (a 3-layer LSTM
40 -> 256, a linear 256 -> 256, ReLU, L2 norm) and its input features (a 40-channel power mel
spectrogram, 25 ms window, 10 ms hop, librosa's Slaney filterbank) are rebuilt here with torch and
numpy. ``tests/test_speakers.py`` checks the result equals Resemblyzer's own ``VoiceEncoder`` when
librosa is importable.

An utterance is embedded as Resemblyzer does: 1.6 s partial windows (160 frames) at ``rate`` per
second, each embedded, the utterance embedding being their L2-normed mean. The partial embeddings
and their times are kept too, so a change of speaker inside a long utterance can be located.

On a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), the network runs in bfloat16 by
default: the LSTM's time is bounded by reading its weights at every step, and halving their size
roughly halves it, while the embeddings stay within cosine 0.99 of float32's (docs/diarization.md
has the figures). int8 dynamic quantisation is not used: its per-tensor scale on the first
layer's input (a power spectrum spanning many decades) destroys the quiet channels.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s of frames per partial window
EMBEDDING_SIZE = 256
NORM_TARGET_DBFS = -30.0  # Resemblyzer's preprocess_wav raises quieter audio to this level
_INT16_MAX = 2**15 - 1


class EncoderUnavailable(RuntimeError):
    """The speaker encoder cannot be loaded (torch or the Resemblyzer weights are missing)."""


def weights_path() -> Path:
    """Where the installed ``Resemblyzer`` package keeps ``pretrained.pt``.

    The package is located without being imported (importing it needs librosa).

    Raises:
        EncoderUnavailable: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailable(
            "speaker labels need the Resemblyzer==0.1.4 weights: scripts/setup installs them "
            "(pip install --no-deps Resemblyzer==0.1.4)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise EncoderUnavailable(f"{path} is missing from the installed Resemblyzer package")
    return path


def available() -> str | None:
    """Why the encoder cannot load, or ``None`` when torch and the weights are present (cheap: loads nothing)."""
    if importlib.util.find_spec("torch") is None:
        return "speaker labels need torch (the granite extra)"
    try:
        weights_path()
    except EncoderUnavailable as exc:
        return str(exc)
    return None


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale (librosa's default, htk=False): linear below 1 kHz, log above.
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    log_region = freq >= min_log_hz
    mels[log_region] = min_log_mel + np.log(freq[log_region] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freqs


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """The ``(n_mels, n_fft // 2 + 1)`` filterbank ``librosa.filters.mel`` builds with its defaults
    (fmin 0, fmax sr/2, Slaney scale, Slaney area normalisation)."""
    fftfreqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sr / 2]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


_MEL = mel_filterbank()
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """``(frames, 40)`` power mel spectrogram, as ``librosa.feature.melspectrogram`` computes it with
    Resemblyzer's parameters (centred frames, zero padding, periodic Hann window; not log)."""
    wav = np.asarray(wav, dtype=np.float32)
    padded = np.pad(wav, (N_FFT // 2, N_FFT // 2))
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    power = np.abs(np.fft.rfft(frames * _WINDOW, n=N_FFT, axis=1)) ** 2
    return (power.astype(np.float32) @ _MEL.T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = NORM_TARGET_DBFS) -> np.ndarray:
    """Raise (never lower) the level to ``target_dbfs``, as Resemblyzer's ``preprocess_wav`` does."""
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * _INT16_MAX) ** 2))) if len(wav) else 0.0
    if rms <= 0.0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    return wav if change < 0 else (wav * (10 ** (change / 20))).astype(np.float32)


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[tuple[int, int]]:
    """Frame ranges ``[start, stop)`` of the 160-frame partial windows of an ``n_samples`` utterance.

    The same windows as Resemblyzer's ``VoiceEncoder.compute_partial_slices``: one every
    ``1 / rate`` seconds covering the utterance, the last kept when at least ``min_coverage`` of it
    is audio, always at least one (zero-padded).
    """
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    step = int(np.round((SAMPLE_RATE / rate) / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} gives a window step of {step} frames; it must be in (0, {PARTIAL_FRAMES}]")
    starts = range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step)
    slices = [(i, i + PARTIAL_FRAMES) for i in starts]
    last = slices[-1]
    coverage = (n_samples - last[0] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(slices) > 1:
        slices.pop()
    return slices


PAUSE_S = 0.25  # a quiet stretch at least this long inside an utterance splits it into pieces
PAUSE_FLOOR_DB = -35.0  # quiet: 10 ms frames this far below the utterance's loud frames (95th percentile)
MIN_PIECE_S = 0.5  # a piece shorter than this is no piece: the pause beside it is not used


def pause_pieces(wav: np.ndarray, pause_s: float = PAUSE_S, floor_db: float = PAUSE_FLOOR_DB,
                 min_piece_s: float = MIN_PIECE_S) -> list[tuple[int, int]]:
    """Sample ranges ``[start, stop)`` of the stretches of sound in ``wav`` (16 kHz) separated by
    pauses of at least ``pause_s`` seconds, a pause being 10 ms frames ``floor_db`` dB or more below
    the utterance's loud frames. One range, the whole ``wav``, when it has no such pause (so an
    utterance without a pause is embedded exactly as Resemblyzer does); the first range starts at 0
    and the last ends at ``len(wav)`` (the edges are the VAD's business, not trimmed here)."""
    n = len(wav) // HOP
    if n == 0:
        return [(0, len(wav))]
    energy = np.mean(np.asarray(wav[: n * HOP], np.float64).reshape(n, HOP) ** 2, axis=1)
    loud = float(np.percentile(energy, 95))
    if loud <= 0:
        return [(0, len(wav))]
    quiet = energy < loud * 10 ** (floor_db / 10)
    need = int(round(pause_s * SAMPLE_RATE / HOP))
    pauses, run_start = [], None  # (first quiet frame, one past the last) of each long enough run
    for i, q in enumerate(np.append(quiet, False)):
        if q and run_start is None:
            run_start = i
        elif not q and run_start is not None:
            if i - run_start >= need and run_start > 0 and i < n:  # inside the utterance only
                pauses.append((run_start, i))
            run_start = None
    bounds = [0] + [b for pause in pauses for b in pause] + [n]
    pieces = [(bounds[2 * k], bounds[2 * k + 1]) for k in range(len(pauses) + 1)]
    short = int(round(min_piece_s * SAMPLE_RATE / HOP))
    while len(pieces) > 1:  # fold the shortest piece under the minimum into its nearer neighbour
        k = min(range(len(pieces)), key=lambda j: pieces[j][1] - pieces[j][0])
        if pieces[k][1] - pieces[k][0] >= short:
            break
        if k == 0 or (k < len(pieces) - 1 and pieces[k + 1][0] - pieces[k][1] < pieces[k][0] - pieces[k - 1][1]):
            pieces[k : k + 2] = [(pieces[k][0], pieces[k + 1][1])]
        else:
            pieces[k - 1 : k + 1] = [(pieces[k - 1][0], pieces[k][1])]
    if len(pieces) == 1:
        return [(0, len(wav))]
    out = [(a * HOP, b * HOP) for a, b in pieces]
    return [(0, out[0][1])] + out[1:-1] + [(out[-1][0], len(wav))]


@dataclass(frozen=True)
class SpeakerEmbeddings:
    """The speaker embeddings of one utterance. In memory only: never serialised, never logged
    (``repr`` shows only the shape).

    Attributes:
        partials: ``(n, 256)`` unit vectors, one per 1.6 s window.
        starts, ends: each window's span in seconds from the utterance's start (the last window of
            a piece may pass the piece's end: it was zero-padded).
        pieces: for an utterance with pauses (:func:`pause_pieces`), the piece each window belongs
            to (windows never straddle a pause); ``None`` when the utterance is one piece.
        pauses: ``(start, end)`` seconds from the utterance's start of each pause between pieces.
    """

    partials: np.ndarray = field(repr=False)
    starts: np.ndarray = field(repr=False)
    ends: np.ndarray = field(repr=False)
    pieces: np.ndarray | None = field(default=None, repr=False)
    pauses: tuple[tuple[float, float], ...] = field(default=(), repr=False)

    @property
    def utterance(self) -> np.ndarray:
        """The whole utterance's embedding: the L2-normed mean of the windows (Resemblyzer's rule)."""
        return _unit(self.partials.mean(axis=0))

    def __repr__(self) -> str:
        return f"SpeakerEmbeddings(windows={len(self.partials)})"


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether ``device`` is a CPU whose torch build computes bfloat16 natively (AVX512-BF16 or AMX
    tiles); without it bfloat16 is emulated and slower than float32. ``False`` for other devices."""
    import torch

    if torch.device(device).type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence probed
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


class SpeakerEncoder:
    """Resemblyzer's GE2E network with its pretrained weights; thread-confined like an engine.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        rate: partial windows per second (Resemblyzer's default 1.3: a window every 0.77 s).
        weights: a ``pretrained.pt`` path; default: the installed Resemblyzer package's.
        threads: torch intra-op threads for CPU inference (0: leave torch's setting).
        precision: the network's arithmetic: ``"float32"`` (Resemblyzer's own), ``"bfloat16"``, or
            ``"auto"``: bfloat16 on a CPU that computes it natively (:func:`native_bfloat16`),
            float32 elsewhere (on a GPU the encoder's time is small beside the engine's).
        split_pauses: window each stretch between pauses of the utterance on its own
            (:func:`pause_pieces`; ``False``: windows over the whole utterance, Resemblyzer's rule).

    Attributes:
        precision: the arithmetic in use, ``"float32"`` or ``"bfloat16"`` (``"auto"`` resolved).

    Raises:
        EncoderUnavailable: torch or the weights are missing.
        ValueError: an unknown ``precision``.
    """

    def __init__(self, device: str = "cpu", rate: float = 1.3, weights: Path | str | None = None, threads: int = 0,
                 precision: str = "auto", split_pauses: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        try:
            import torch
            from torch import nn
        except ImportError as exc:
            raise EncoderUnavailable("speaker labels need torch (the granite extra)") from exc
        self._torch = torch
        self.rate = rate
        self.split_pauses = split_pauses
        self.device = torch.device(device)
        if precision == "auto":
            precision = "bfloat16" if native_bfloat16(device) else "float32"
        self.precision = precision
        self._dtype = getattr(torch, precision)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        state = torch.load(weights or weights_path(), map_location="cpu", weights_only=True)["model_state"]

        class _GE2E(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
                self.linear = nn.Linear(256, EMBEDDING_SIZE)

            def forward(self, mels):
                _, (hidden, _) = self.lstm(mels)
                raw = torch.relu(self.linear(hidden[-1]))
                return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True).clamp_min(1e-12)

        model = _GE2E()
        # The checkpoint also holds the GE2E loss's similarity scale and bias; only the network is used.
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")}, strict=True)
        model = model.to(self.device, self._dtype).eval()
        # cuDNN wants the LSTM's weights in one block; after the move it would compact them at every
        # call (torch warns so on CUDA in bfloat16). A no-op on the CPU.
        model.lstm.flatten_parameters()
        self._model: Callable[[Any], Any] | None = model
        self._lock = threading.Lock()

    def embed(self, wavs: Sequence[np.ndarray]) -> list[SpeakerEmbeddings]:
        """Embed utterances (16 kHz mono float32) in one batched forward pass of all their windows."""
        if not wavs:
            return []
        if self._model is None:
            raise RuntimeError("speaker encoder is closed")
        mels: list[np.ndarray] = []
        spans: list[np.ndarray] = []
        counts: list[int] = []
        layout: list[tuple[np.ndarray | None, tuple[tuple[float, float], ...]]] = []
        for wav in wavs:
            wav = normalize_volume(np.asarray(wav, dtype=np.float32))
            # Each piece between pauses gets its own windows, so that no window mixes the voices on
            # either side of a pause (where a turn most often changes inside one utterance).
            pieces = pause_pieces(wav) if self.split_pauses else [(0, len(wav))]
            piece_of: list[int] = []
            utterance_spans = []
            for index, (a, b) in enumerate(pieces):
                piece = wav[a:b]
                slices = partial_slices(len(piece), self.rate)
                need = slices[-1][1] * HOP
                if need > len(piece):
                    piece = np.pad(piece, (0, need - len(piece)))
                mel = mel_spectrogram(piece)
                mels.extend(mel[x:y] for x, y in slices)
                utterance_spans.append((np.array(slices, dtype=np.float64) * HOP + a) / SAMPLE_RATE)
                piece_of += [index] * len(slices)
            spans.append(np.concatenate(utterance_spans))
            counts.append(len(piece_of))
            layout.append((np.array(piece_of), tuple((pieces[k][1] / SAMPLE_RATE, pieces[k + 1][0] / SAMPLE_RATE)
                                                     for k in range(len(pieces) - 1)))
                          if len(pieces) > 1 else (None, ()))
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch = torch.from_numpy(np.stack(mels)).to(self.device, self._dtype)
            vectors = self._model(batch).float().cpu().numpy()
        if self.precision != "float32":  # unit length again, to float32's accuracy
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        out, offset = [], 0
        for count, span, (pieces_of, pauses) in zip(counts, spans, layout):
            out.append(SpeakerEmbeddings(vectors[offset : offset + count], span[:, 0], span[:, 1], pieces_of, pauses))
            offset += count
        return out

    def close(self) -> None:
        self._model = None
