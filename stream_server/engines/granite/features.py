"""Granite Speech log-mel features, computed with torch alone (no torchaudio).

transformers' :class:`~transformers.GraniteSpeechFeatureExtractor` needs torchaudio for its
``torchaudio.transforms.MelSpectrogram``. This module reproduces that extractor op for op with
plain torch, so it runs wherever torch runs (CPU or GPU) and gives the same tensors.

The formula (transformers 5.23, ``feature_extraction_granite_speech.py``), for 16 kHz audio:

1. **Power spectrogram** (torchaudio ``Spectrogram`` defaults as used by ``MelSpectrogram``):
   ``torch.stft(x, n_fft=512, hop_length=160, win_length=400, window=hann_window(400, periodic=True),
   center=True, pad_mode="reflect", normalized=False, onesided=True)``, then ``|X|**2``
   (``power=2.0``). The 400-sample window is zero-padded centrally to 512 by ``stft``.
   With ``center=True`` a clip of ``T`` samples gives ``T // 160 + 1`` frames.
2. **Mel filterbank** (torchaudio ``melscale_fbanks`` with ``MelSpectrogram`` defaults):
   80 triangular filters, HTK mel scale ``mel = 2595 * log10(1 + f / 700)``, ``f_min = 0``,
   ``f_max = sample_rate // 2``, no area normalisation (``norm=None``); ``257`` linear bins
   ``linspace(0, 8000, 257)``; filter points ``linspace(mel(0), mel(8000), 82)`` mapped back to Hz;
   ``fb[f, m] = max(0, min((f - p[m]) / (p[m+1] - p[m]), (p[m+2] - f) / (p[m+2] - p[m+1])))``.
   ``mel = power_spec^T @ fb``  → ``(batch, frames, 80)``.
3. **Log and dynamic-range clamp**, per utterance over the whole (padded) spectrogram:
   ``L = log10(max(mel, 1e-10))``; ``L = max(L, max(L) - 8)``; ``L = L / 4 + 1``.
4. **Frame stacking**: drop the last frame if the frame count is odd, then concatenate each
   pair of consecutive 80-dim frames → ``(batch, frames // 2, 160)`` (10 ms hop → 20 ms per
   encoder frame).
5. **Audio tokens per utterance** (``_get_num_audio_features``): for ``T`` raw samples
   ``mel_len = T // 160 + 1``; ``enc_len = mel_len // 2``;
   ``n_blocks = ceil(enc_len / window_size)``; ``tokens = n_blocks * (window_size // downsample_rate)``
   (``window_size=15``, ``downsample_rate=5`` → 3 tokens per 15 encoder frames = 300 ms, i.e. 10 tokens/s).
6. **Batches**: the raw audio is right-padded with zeros to the longest clip and the spectrogram is
   computed on the padded batch (so the padded rows see zeros, and the clamp of step 3 uses the
   padded spectrogram); ``input_features_mask[i, j] = j < tokens[i]`` over ``max(tokens)`` columns
   selects the real projector outputs of each row.

Only ``torch`` ops are used; the filterbank is built on the CPU in float32 exactly as torchaudio
builds it and then moved to the compute device. ``benchmarks/granite_features_check.py`` compares
against the HF extractor where torchaudio exists: with transformers 5.23 and torchaudio 2.11 the
filterbank and the features were identical (max abs diff 0.0) on CPU and on CUDA, single clips and
padded batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "GraniteFeatureExtractor",
    "GraniteFeatures",
    "melscale_fbanks",
    "num_audio_tokens",
    "num_encoder_frames",
]


def _hz_to_mel_htk(freq: float) -> float:
    return 2595.0 * math.log10(1.0 + (freq / 700.0))


def _mel_to_hz_htk(mels: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def melscale_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """The HTK triangular mel filterbank of ``torchaudio.functional.melscale_fbanks`` (``norm=None``).

    Returns:
        float32 tensor of shape ``(n_freqs, n_mels)`` on the CPU.
    """
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_min = _hz_to_mel_htk(f_min)
    m_max = _hz_to_mel_htk(f_max)
    m_pts = torch.linspace(m_min, m_max, n_mels + 2)
    f_pts = _mel_to_hz_htk(m_pts)
    # _create_triangular_filterbank
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    zero = torch.zeros(1)
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]  # (n_freqs, n_mels)
    up_slopes = slopes[:, 2:] / f_diff[1:]  # (n_freqs, n_mels)
    return torch.max(zero, torch.min(down_slopes, up_slopes))


def num_encoder_frames(num_samples: int, hop_length: int = 160) -> int:
    """Encoder frames (stacked 160-dim feature rows) for ``num_samples`` raw samples."""
    return (num_samples // hop_length + 1) // 2


def max_samples_for_frames(frames: int, hop_length: int = 160) -> int:
    """The most raw samples that still give ``frames`` encoder frames (the inverse of :func:`num_encoder_frames`).

    ``(n // hop + 1) // 2`` stays ``frames`` up to ``n = (2 * frames + 1) * hop - 1``, so zero-padding
    any batch of clips with at most ``frames`` frames to this length yields exactly ``frames``.
    """
    return (2 * frames + 1) * hop_length - 1


def num_audio_tokens(
    num_samples: int, hop_length: int = 160, projector_window_size: int = 15, projector_downsample_rate: int = 5
) -> int:
    """Audio tokens (``<|audio|>`` placeholders / projector outputs) for ``num_samples`` raw samples.

    Same as ``GraniteSpeechFeatureExtractor._get_num_audio_features``.
    """
    encoder_length = num_encoder_frames(num_samples, hop_length)
    nblocks = math.ceil(encoder_length / projector_window_size)
    return nblocks * (projector_window_size // projector_downsample_rate)


@dataclass
class GraniteFeatures:
    """Features of a batch, as ``GraniteSpeechFeatureExtractor.__call__`` returns them.

    Attributes:
        input_features: ``(batch, max_frames, 160)`` float32 stacked log-mels.
        audio_embed_sizes: audio tokens per utterance (projector outputs to keep).
        input_features_mask: ``(batch, max(audio_embed_sizes))`` bool, ``True`` for real projector outputs.
        feature_lengths: valid encoder frames per utterance (rows of ``input_features`` not caused by padding).
    """

    input_features: torch.Tensor
    audio_embed_sizes: list[int]
    input_features_mask: torch.Tensor
    feature_lengths: list[int]


class GraniteFeatureExtractor:
    """Torch-only twin of ``transformers.GraniteSpeechFeatureExtractor`` (see the module docstring).

    Args:
        sampling_rate, n_fft, win_length, hop_length, n_mels: the mel spectrogram settings
            (the HF defaults, which the Granite Speech checkpoints use).
        projector_window_size, projector_downsample_rate: the projector's window and downsampling
            (``config.window_size`` and ``config.downsample_rate``), which fix the audio-token count.
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        projector_window_size: int = 15,
        projector_downsample_rate: int = 5,
    ) -> None:
        self.sampling_rate = sampling_rate
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.projector_window_size = projector_window_size
        self.projector_downsample_rate = projector_downsample_rate
        # Built on the CPU in float32, as torchaudio's MelScale / Spectrogram build their buffers.
        self._fb_cpu = melscale_fbanks(n_fft // 2 + 1, 0.0, float(sampling_rate // 2), n_mels, sampling_rate)
        self._window_cpu = torch.hann_window(win_length)
        self._per_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config) -> "GraniteFeatureExtractor":
        """Build the extractor matching a ``GraniteSpeechConfig`` (projector window and downsampling)."""
        return cls(
            projector_window_size=int(getattr(config, "window_size", 15)),
            projector_downsample_rate=int(getattr(config, "downsample_rate", 5)),
        )

    # ------------------------------------------------------------------ sizes
    @property
    def min_samples(self) -> int:
        """Shortest clip ``torch.stft``'s reflect padding accepts (``n_fft // 2 + 1`` samples)."""
        return self.n_fft // 2 + 1

    def num_encoder_frames(self, num_samples: int) -> int:
        return num_encoder_frames(num_samples, self.hop_length)

    def num_audio_tokens(self, num_samples: int) -> int:
        return num_audio_tokens(
            num_samples, self.hop_length, self.projector_window_size, self.projector_downsample_rate
        )

    # ------------------------------------------------------------------ compute
    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._per_device:
            self._per_device[key] = (self._window_cpu.to(device), self._fb_cpu.to(device))
        return self._per_device[key]

    def mel_spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Power mel spectrogram, ``(batch, frames, n_mels)``, of ``(batch, samples)`` float audio.

        The same numbers as ``torchaudio.transforms.MelSpectrogram(...)(audio).transpose(-1, -2)``.
        """
        window, fb = self._buffers(audio.device)
        spec = torch.stft(
            audio.float(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spec.abs().pow(2.0)  # (batch, n_freqs, frames)
        return torch.matmul(power.transpose(-1, -2), fb)  # (batch, frames, n_mels)

    def log_mel_stacked(self, audio: torch.Tensor) -> torch.Tensor:
        """Steps 1–4 of the module docstring on an already collated ``(batch, samples)`` tensor."""
        if audio.ndim == 1:
            audio = audio.unsqueeze(0)
        bsz = audio.shape[0]
        with torch.no_grad():
            mel = self.mel_spectrogram(audio)
            logmel = mel.clip_(min=1e-10).log10_()
            mx = logmel.amax(dim=(-2, -1), keepdim=True)
            logmel = torch.maximum(logmel, mx - 8.0).div_(4).add_(1)
            if logmel.shape[1] % 2 == 1:
                logmel = logmel[:, :-1]
            return logmel.reshape(bsz, -1, 2 * logmel.shape[-1])

    def __call__(
        self,
        audios: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
        device: str | torch.device | None = "cpu",
    ) -> GraniteFeatures:
        """Features of one clip or a list of clips (padded batch, like the HF extractor).

        Args:
            audios: a 1-D clip, a list of 1-D clips (any lengths), or an already collated
                ``(batch, samples)`` tensor/array (all rows taken as full length).
            device: where to compute; ``None`` keeps the input's device.
        """
        tensors: list[torch.Tensor]
        if isinstance(audios, (np.ndarray, torch.Tensor)):
            t = torch.as_tensor(audios)
            tensors = [t] if t.ndim == 1 else list(t)
        else:
            tensors = [torch.as_tensor(a) for a in audios]
        if not tensors:
            raise ValueError("no audio given")
        for t in tensors:
            if not torch.is_floating_point(t):
                raise ValueError("audio must be floating point")
        lengths = [int(t.shape[-1]) for t in tensors]
        batch = torch.nn.utils.rnn.pad_sequence([t.reshape(-1) for t in tensors], batch_first=True, padding_value=0.0)
        if device is not None:
            batch = batch.to(device)
        feats = self.log_mel_stacked(batch)
        sizes = [self.num_audio_tokens(n) for n in lengths]
        mask = torch.arange(max(sizes), device=feats.device).view(1, -1) < torch.tensor(
            sizes, device=feats.device
        ).view(-1, 1)
        return GraniteFeatures(
            input_features=feats,
            audio_embed_sizes=sizes,
            input_features_mask=mask,
            feature_lengths=[self.num_encoder_frames(n) for n in lengths],
        )
