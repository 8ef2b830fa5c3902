"""Compare the project's torch-only Granite features with transformers' GraniteSpeechFeatureExtractor.

Run on a machine that has torchaudio (the HF extractor needs it; this project's machines do not):

    python -m benchmarks.granite_features_check [--device cuda] [--wav a.wav b.wav ...]

It featurises a set of clips (synthetic tones/noise of awkward lengths, plus any 16 kHz mono WAV
files given) one by one and as a padded batch with both implementations, and prints the max
absolute difference of ``input_features`` and whether ``audio_embed_sizes`` and
``input_features_mask`` agree. Exit status 1 when anything differs by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import sys
import wave

import numpy as np
import torch

from stream_server.engines.granite.features import GraniteFeatureExtractor


def _synthetic() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    clips = []
    for n, f in [(257, 440), (400, 1000), (1599, 220), (16000, 300), (16161, 3000), (48000, 125), (80321, 700)]:
        t = np.arange(n) / 16000
        clips.append((0.3 * np.sin(2 * np.pi * f * t * (1 + t)) + 0.02 * rng.standard_normal(n)).astype(np.float32))
    clips.append(np.zeros(8000, np.float32))  # silence: exercises the 1e-10 clamp
    return clips


def _read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (data.astype(np.float32) / 32768.0).copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--wav", nargs="*", default=[])
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)

    try:
        import torchaudio  # noqa: F401
    except ImportError:
        print("torchaudio is not installed: the HF extractor cannot run here", file=sys.stderr)
        return 2
    from transformers import GraniteSpeechFeatureExtractor

    hf = GraniteSpeechFeatureExtractor()
    ours = GraniteFeatureExtractor(
        projector_window_size=hf.projector_window_size, projector_downsample_rate=hf.projector_downsample_rate
    )
    clips = _synthetic() + [_read_wav(p) for p in args.wav]

    # The filterbank alone.
    fb_diff = (hf.mel_filters.mel_scale.fb.cpu() - ours._fb_cpu).abs().max().item()
    print(f"mel filterbank: max abs diff {fb_diff:.3e}")
    worst = fb_diff
    ok = True

    cases = [[c] for c in clips] + [clips]
    for case in cases:
        a = hf([torch.from_numpy(c) for c in case], device=args.device)
        b = ours([torch.from_numpy(c) for c in case], device=args.device)
        fa = a["input_features"].float().cpu()
        fb = b.input_features.float().cpu()
        same_shape = tuple(fa.shape) == tuple(fb.shape)
        diff = (fa - fb).abs().max().item() if same_shape else float("inf")
        sizes_ok = list(a["audio_embed_sizes"]) == list(b.audio_embed_sizes)
        mask_ok = torch.equal(a["input_features_mask"].cpu(), b.input_features_mask.cpu())
        label = f"batch of {len(case)}" if len(case) > 1 else f"{len(case[0])} samples"
        print(
            f"{label:>16}: shape {tuple(fb.shape)} max abs diff {diff:.3e} "
            f"audio_embed_sizes {'ok' if sizes_ok else 'DIFFER'} mask {'ok' if mask_ok else 'DIFFER'}"
        )
        worst = max(worst, diff)
        ok &= same_shape and sizes_ok and mask_ok
    print(f"worst max abs diff: {worst:.3e} (tolerance {args.tol:g})")
    ok &= worst <= args.tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
