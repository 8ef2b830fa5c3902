"""Granite word confidence: the CTC posteriors along the alignment combined with the LLM's
probabilities of the final's tokens, from the passes the final already made (tiny random model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stream_server.engines.granite.engine as granite_module
from stream_server.inference.types import Word
from stream_server.engines.granite.ctc_align import with_token_probabilities
from tests.engines.granite.test_granite_engine import make_engine, req, tiny, tone  # noqa: F401 - tiny is a fixture


def test_a_word_scores_the_geometric_mean_of_its_ctc_confidence_and_its_tokens():
    text = "call Anna now"
    words = (Word("call", 0.0, 0.2, 0.9), Word("Anna", 0.3, 0.5, 0.8), Word("now", 0.6, 0.8, 0.5))
    # tokens: "call" | " An" | "na now" (one token spans two words) ; 'now' also has its own CTC score
    spans = [(0, 4, 0.4), (4, 7, 0.2), (7, 13, 0.6)]
    out = with_token_probabilities(text, words, spans)
    assert [w.confidence for w in out] == [round(math.sqrt(0.9 * 0.4), 3), round(math.sqrt(0.8 * 0.4), 3),
                                           round(math.sqrt(0.5 * 0.6), 3)]
    assert [(w.word, w.start, w.end) for w in out] == [(w.word, w.start, w.end) for w in words]
    # A word no token covers (a forced prefix the LLM did not produce) keeps its CTC confidence.
    assert with_token_probabilities(text, words, [(5, 13, 0.5)])[0].confidence == 0.9


@pytest.fixture
def letters(tiny):  # noqa: F811
    """The random model made to speak lower-case letters and spaces (every other token's logit
    pushed down in ``lm_head``, which every LLM pass calls), so that its text has words the CTC
    alignment can place and that its tokens spell one by one."""
    model, tokenizer = tiny
    allowed = torch.tensor([tokenizer.decode([i]) in set("abcdefghijklmnopqrstuvwxyz ") for i in range(len(tokenizer))])
    bias = torch.where(allowed, 0.0, -1e4)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    yield
    handle.remove()


@pytest.fixture
def spy(monkeypatch):
    """What the engine combined: the CTC-only words, the token spans, and the result."""
    calls = []

    def recording(text, words, spans):
        out = with_token_probabilities(text, words, spans)
        calls.append((text, words, spans, out))
        return out

    monkeypatch.setattr(granite_module, "with_token_probabilities", recording)
    return calls


def check_rule(call) -> None:
    text, ctc_words, spans, out = call
    assert spans and all(0.0 < p <= 1.0 for _, _, p in spans)
    changed = 0
    for ctc, word in zip(ctc_words, out):
        start = text.index(ctc.word)
        probs = [p for a, b, p in spans if a < start + len(ctc.word) and b > start and b > a]
        if probs:
            assert word.confidence == round(math.sqrt(ctc.confidence * float(np.mean(probs))), 3)
            changed += word.confidence != ctc.confidence
    assert changed  # the LLM's probabilities moved some word's confidence


@pytest.mark.parametrize("backend", ["generate", "loop"])
def test_decoded_finals_combine_the_decode_token_probabilities(tiny, letters, spy, backend):  # noqa: F811
    eng = make_engine(tiny, speculative=False, decode_backend=backend, repetition_guard=False)
    result = eng.transcribe_batch([req(tone(3.0, 300.0, 7))])[0]
    assert result.info["path"] == "autoregressive" and result.words
    assert len(spy) == 1 and spy[0][3] == result.words
    assert len(spy[0][2]) == result.info["new_tokens"]  # one span per decoded token
    check_rule(spy[0])


def test_the_two_decode_backends_give_the_same_token_probabilities(tiny, letters, spy):  # noqa: F811
    audio = tone(3.0, 300.0, 7)
    for backend in ("generate", "loop"):
        make_engine(tiny, speculative=False, decode_backend=backend, repetition_guard=False).transcribe_batch(
            [req(audio)])
    (_, _, generate_spans, _), (_, _, loop_spans, _) = spy
    assert [s[:2] for s in generate_spans] == [s[:2] for s in loop_spans]
    np.testing.assert_allclose([s[2] for s in generate_spans], [s[2] for s in loop_spans], rtol=1e-3, atol=1e-5)


def test_a_verified_draft_combines_the_verification_probabilities(tiny, letters, spy):  # noqa: F811
    eng = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0)
    result = eng.transcribe_batch([req(tone(3.0, 300.0, 7))])[0]
    assert result.info["path"] == "verify_accept" and result.words
    assert [p for _, _, p in spy[0][2]] == pytest.approx(result.info["verify_token_probs"])
    check_rule(spy[0])


def test_an_unverified_ctc_draft_keeps_the_ctc_confidence(tiny, letters, spy):  # noqa: F811
    eng = make_engine(tiny, ctc_entropy_threshold=math.inf)
    result = eng.transcribe_batch([req(tone(3.0, 300.0, 7))])[0]
    assert result.info["path"] == "ctc_accept" and result.words and not spy
