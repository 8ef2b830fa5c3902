"""Granite's CUDA-only paths, on a tiny random model: skipped without a GPU (CI has none).

Run on the lent GPU machine with ``python -m pytest -q tests/engines/granite/test_granite_cuda.py``.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from stream_server.inference.types import InferenceRequest
from stream_server.engines.granite.engine import GraniteEngine
from stream_server.engines.granite.options import GraniteOptions
from granite_stream_testing.tiny_granite import build_tiny_granite
from granite_stream_testing.traced_granite import TracedGraniteEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny_cuda():
    model, tokenizer = build_tiny_granite(seed=0)
    return model.to("cuda"), tokenizer


def _tone(seconds, freq, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def test_encoder_graphs_replay_the_eager_encoder(tiny_cuda):
    from stream_server.engines.granite.encoder import EncoderGraphs

    model, _ = tiny_cuda
    encoder = model.model.encoder
    graphs = EncoderGraphs(encoder, max_batch=8, max_seconds=4.0)
    torch.manual_seed(0)
    with torch.inference_mode():
        a = torch.randn(3, 100, graphs.input_dim, device="cuda")  # batch 3 -> bucket 4, 2 s
        b = torch.randn(5, 50, graphs.input_dim, device="cuda")  # batch 5 -> bucket 8, 1 s
        ref_a = encoder(a).last_hidden_state.clone()
        ref_b = encoder(b).last_hidden_state.clone()
        for _ in range(2):  # capture, then replay; interleaved buckets share one output buffer
            out_a = graphs(a).clone()
            out_b = graphs(b).clone()
            torch.testing.assert_close(out_a, ref_a, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out_b, ref_b, rtol=1e-4, atol=1e-4)
        assert graphs.captures == 2 and graphs.replays == 4
        long = torch.randn(1, 250, graphs.input_dim, device="cuda")  # 5 s: beyond max_seconds, eager
        torch.testing.assert_close(graphs(long), encoder(long).last_hidden_state)
        assert graphs.eager_calls == 1


def test_engine_with_encoder_graphs_serves_ctc_partials_and_finals(tiny_cuda):
    model, tokenizer = tiny_cuda
    eng = GraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions(encoder_batching="padded", decode_backend="graphs", max_batch=8))
    assert eng.encoder_backend == "graphs"
    audio = [_tone(0.8, 300.0, 1), _tone(1.7, 900.0, 2), _tone(2.6, 1400.0, 3)]
    reqs = [InferenceRequest("s", i, "partial", a, partial_mode="ctc") for i, a in enumerate(audio)]
    reqs.append(InferenceRequest("s", 9, "final", audio[1]))
    # Translation never speculates: the autoregressive path, through the projector graphs.
    reqs.append(InferenceRequest("s", 10, "final", audio[2], task="translate", language="en", target_language="fr"))
    results = eng.transcribe_batch(reqs)
    assert [r.info["path"] for r in results[:3]] == ["partial_ctc"] * 3 and all(r.text for r in results[:3])
    assert eng.encoder_graphs.replays >= 1 and eng.projector_graphs.replays >= 1
    assert results[-1].info["path"] == "autoregressive"
    again = eng.transcribe_batch(reqs)
    assert [r.text for r in again] == [r.text for r in results]


def test_projector_window_graphs_match_the_eager_projector(tiny_cuda):
    model, tokenizer = tiny_cuda
    eng = GraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions(encoder_batching="padded", max_batch=4))
    graphs = eng.projector_graphs
    hidden = int(model.config.encoder_config.hidden_dim)
    torch.manual_seed(1)
    with torch.inference_mode():
        for n in (3, 8, 13, 3):  # buckets 8, 8, 16, then replay of 8
            windows = torch.randn(n, model.model.projector.window_size, hidden, device="cuda")
            torch.testing.assert_close(graphs(windows).clone(), eng.project_windows(windows), rtol=1e-4, atol=1e-4)
    assert graphs.captures == 2 and graphs.replays == 4


def test_warmup_captures_the_decode_states_of_every_batch_bucket(tiny_cuda):
    model, tokenizer = tiny_cuda
    eng = GraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions(decode_backend="graphs", max_batch=4, speculative=False,
                                               warm_decode_seconds=(1.0, 2.0), decode_max_graphs=16))
    eng.warmup()
    batches = {key[0] for key in eng.decoder._states}
    assert {1, 2, 4} <= batches and eng.decoder.captures >= 3
    assert not any(eng.stats().values())  # warm-up decodes are not counted as traffic
    captures = eng.decoder.captures
    eng.transcribe_batch([InferenceRequest("s", i, "final", _tone(1.0, 500.0, i)) for i in range(3)])
    assert eng.decoder.captures == captures  # a batch of 3 (bucket 4) of 1 s was warmed: no capture under load


def test_graph_replayed_draft_scoring_matches_the_eager_forward(tiny_cuda):
    # The verify pass replays a captured prefill (per batch x prompt bucket); its token
    # probabilities must equal transformers' eager forward, on the first call and on replays.
    model, tokenizer = tiny_cuda
    spec = GraniteOptions(ctc_entropy_threshold=-1.0, verify_threshold=0.0)
    fast = TracedGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                               options=replace(spec, decode_backend="graphs"))
    ref = TracedGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                              options=replace(spec, decode_backend="generate"))
    reqs = [InferenceRequest("s", i, "final", _tone(0.9 + 0.5 * i, 500.0 + 200 * i, i)) for i in range(3)]
    want = ref.transcribe_batch(reqs)
    for _ in range(2):
        got = fast.transcribe_batch(reqs)
        assert [r.info["path"] for r in got] == [r.info["path"] for r in want] == ["verify_accept"] * 3
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.info["verify_token_probs"], w.info["verify_token_probs"], rtol=1e-3, atol=1e-6)


def test_gpu_preset_engine_options_run_on_cuda(tiny_cuda):
    # What `serve` builds under the GPU preset (the "fast" options): padded encoder batching with
    # encoder graphs, decode states from free memory, compile_step "auto" (timed at warm-up),
    # speculation with the reference thresholds.
    model, tokenizer = tiny_cuda
    eng = GraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                        options=GraniteOptions.preset("fast", max_batch=8, warm_decode_seconds=(1.0,)))
    assert eng.encoder_backend == "graphs" and eng.decode_backend == "graphs"
    assert 8 <= eng.decoder.max_graphs <= 64
    eng.warmup()
    assert eng.compile_choice is not None and eng.compile_choice["kept"] in ("compiled", "eager")
    assert any(state.score for state in eng.decoder._states.values())  # the verify pass was captured too
    results = eng.transcribe_batch([InferenceRequest("s", i, "final", _tone(1.0, 500.0, i)) for i in range(3)])
    assert all(isinstance(r.text, str) for r in results)


def test_finals_on_the_gpu_are_timed_from_their_own_posteriors_copied_in_the_background(tiny_cuda):
    """The CTC posteriors reach the host by an asynchronous copy on a side stream, waited for only
    by the aligner: every timed final (aligned during the LLM decode, after its own row's decode, or
    with the batch) gets the words of its own posteriors, computed here synchronously."""
    from stream_server.engines.granite import ctc_align, engine as engine_module

    model, tokenizer = tiny_cuda
    eng = TracedGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny",
                              options=GraniteOptions(encoder_batching="padded", decode_backend="graphs",
                                                     max_batch=8, ctc_entropy_threshold=float("inf")))
    audio = [_tone(1.1, 350.0, 20), _tone(1.6, 900.0, 22), _tone(2.6, 1400.0, 3)]
    reqs = [InferenceRequest("s", 0, "final", audio[0]),  # its CTC draft: aligned while the LLM decodes
            InferenceRequest("s", 1, "final", audio[1], keywords=("hello",)),  # keywords: the LLM's turn
            InferenceRequest("s", 2, "final", audio[2], keywords=("world",))]
    for soon_cells in (engine_module.ALIGN_SOON_CELLS, 0):
        engine_module.ALIGN_SOON_CELLS = soon_cells
        try:
            results = eng.transcribe_batch(reqs)
        finally:
            engine_module.ALIGN_SOON_CELLS = ctc_align.ALIGN_SOON_CELLS
        assert results[0].info["path"] == "ctc_accept" and "ctc_accept" not in [r.info["path"] for r in results[1:]]
        with torch.inference_mode():  # the batch's posteriors as the engine computes them, copied at once
            works = eng.prepare(reqs)
            eng.encode(works)
            hidden = torch.nn.utils.rnn.pad_sequence([w.encoded()[: w.n_frames] for w in works], batch_first=True)
            logp = torch.log_softmax(eng.ctc_logits(hidden), dim=-1).cpu().numpy()
        for w, r in zip(works, results):
            words = ctc_align.align_words(r.text, logp[w.index, : w.n_frames], eng._ctc_labels.get,
                                          engine_module.ENCODER_FRAME_S, eng.ctc_blank_id)
            assert [(w.word, w.start, w.end) for w in r.words or ()] == [(w.word, w.start, w.end) for w in words or ()]
