"""The GPU server benchmark's data folder (benchmarks.gpu_server_bench)."""

import numpy as np
import pytest


def test_gpu_benchmarks_build_their_data_folder_and_say_how_when_speech_is_missing(tmp_path, monkeypatch):
    """The GPU machines reach no registry: ``--build-data DIR`` copies the cached LibriVox set into the
    folder ``--data`` reads, and a missing cache or empty folder names that exact command."""
    import wave

    import granite_stream_testing.datasets as datasets
    from benchmarks import gpu_server_bench as bench

    src = tmp_path / "cache"
    src.mkdir()
    clips = []
    for i in range(2):
        path = src / f"clip{i}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(np.zeros(1600, "<i2").tobytes())
        clips.append(datasets.Clip(id=f"librivox/clip{i}", audio_path=path, text=f"words {i}", language="en",
                                   sample_rate=16000, set="librivox"))
    monkeypatch.setattr(datasets, "load_set", lambda name, **kw: clips)
    assert bench.main(["--build-data", str(tmp_path / "gpudata")]) == 0
    loaded = bench.load_clips(str(tmp_path / "gpudata"))
    assert [(c.text, c.sample_rate) for c in loaded] == [("words 0", 16000), ("words 1", 16000)]

    def offline(name, **kw):
        raise OSError("no registry")

    monkeypatch.setattr(datasets, "load_set", offline)
    for data in (None, str(tmp_path / "empty")):
        with pytest.raises(SystemExit, match="--build-data .gpudata"):
            bench.load_clips(data)
