"""``ForcedLengthGraniteEngine(force_tokens_per_second=...)``: forced decode lengths proportional to the audio
(load tests with random weights, see benchmarks/gpu_server_bench.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_server.inference.types import InferenceRequest
from stream_server.engines.granite.options import GraniteOptions
from granite_stream_testing.forced_granite import ForcedLengthGraniteEngine
from granite_stream_testing.tiny_granite import build_tiny_granite


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_granite(seed=0)


def tone(seconds: float, freq: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(16000 * seconds))
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("backend", ["generate", "loop"])
def test_forced_length_is_proportional_to_audio(tiny, backend):
    model, tokenizer = tiny
    eng = ForcedLengthGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions(decode_backend=backend), force_tokens_per_second=3.0, force_min_tokens=4)
    reqs = [InferenceRequest("s", i, "final", tone(s, 300.0 + 100 * i, i)) for i, s in enumerate((0.5, 2.0, 5.0))]
    results = eng.transcribe_batch(reqs)
    # 0.5 s -> max(4, 2) = 4; 2 s -> 6; 5 s -> 15 (one batch, different budgets per row)
    assert [len(r.info["token_ids"]) for r in results] == [4, 6, 15]
    assert all(r.info["path"] == "autoregressive" for r in results)  # forced: no speculation
    assert eng.stats()["autoregressive"] == 3


def test_ctc_partials_unaffected_and_constant_wins(tiny):
    model, tokenizer = tiny
    eng = ForcedLengthGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions(decode_backend="loop"), force_tokens_per_second=3.0, force_new_tokens=5)
    p = InferenceRequest("s", 0, "partial", tone(1.0, 400.0), partial_mode="ctc")
    f = InferenceRequest("s", 1, "final", tone(4.0, 500.0, 1))
    rp, rf = eng.transcribe_batch([p, f])
    assert rp.info["path"] == "partial_ctc"
    assert len(rf.info["token_ids"]) == 5  # force_new_tokens takes precedence


def test_rejects_bad_values(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError):
        ForcedLengthGraniteEngine(model=model, tokenizer=tokenizer, force_tokens_per_second=0.0)
    with pytest.raises(ValueError):
        ForcedLengthGraniteEngine(model=model, tokenizer=tokenizer, force_tokens_per_second=3.0, force_min_tokens=0)
