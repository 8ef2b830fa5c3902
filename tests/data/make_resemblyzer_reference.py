"""Writes tests/data/resemblyzer_goforward.npz with Resemblyzer 0.1.4's own code (not the project's).

Needs what the project does not install: librosa (0.11.0 was used) beside Resemblyzer, e.g.
``pip install --target /tmp/lr librosa==0.11.0`` then ``PYTHONPATH=/tmp/lr:. .venv/bin/python
tests/data/make_resemblyzer_reference.py``. Resemblyzer's audio module imports
``scipy.ndimage.morphology``, gone from recent SciPy; the shim below gives it the same function.
"""

import sys
import types

import numpy as np
import scipy.ndimage

sys.modules.setdefault("scipy.ndimage.morphology", types.SimpleNamespace(binary_dilation=scipy.ndimage.binary_dilation))

from resemblyzer import VoiceEncoder  # noqa: E402
from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram  # noqa: E402

from granite_stream_testing.datasets import load_set, read_audio  # noqa: E402

clip = load_set("goforward", progress=False)[0]
wav, rate = read_audio(clip)
assert rate == 16000
# preprocess_wav's level step only: the server's VAD already cut the utterance, so the project does
# not trim silences (Resemblyzer's other preprocessing step).
wav = normalize_volume(wav, -30, increase_only=True).astype(np.float32)
embed, partials, slices = VoiceEncoder("cpu", verbose=False).embed_utterance(wav, return_partials=True)
np.savez_compressed("tests/data/resemblyzer_goforward.npz", partials=partials.astype(np.float32),
                    utterance=embed.astype(np.float32), mel=wav_to_mel_spectrogram(wav)[:50].astype(np.float32),
                    starts=np.array([s.start for s in slices]))
