"""GraniteEngine and the torch-only Granite features, on a tiny random Granite Speech model.

Nothing is downloaded: the model and tokenizer come from
:func:`granite_stream_testing.tiny_granite.build_tiny_granite`.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch

from stream_server.inference.types import InferenceRequest
from stream_server.engines.granite.engine import Draft, GraniteEngine, GraniteModelNotFoundError, _force_prefix
from stream_server.engines.granite.features import GraniteFeatureExtractor, melscale_fbanks, num_audio_tokens
from stream_server.engines.granite.options import GraniteOptions
from granite_stream_testing.forced_granite import ForcedLengthGraniteEngine
from granite_stream_testing.traced_granite import TracedGraniteEngine
from granite_stream_testing.tiny_granite import build_tiny_granite

hf_fe = pytest.importorskip("transformers.models.granite_speech.feature_extraction_granite_speech")

LENGTHS = [257, 400, 1599, 1600, 4799, 16000, 16161, 24000, 47999, 80321]


def tone(seconds: float, freq: float, seed: int = 0) -> np.ndarray:
    """A chirp plus a little noise: different clips give clearly different features."""
    rng = np.random.default_rng(seed)
    n = int(round(16000 * seconds))
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_granite(seed=0)


OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(GraniteOptions))


def split_options(kw: dict) -> GraniteOptions:
    """Pop the keywords that name :class:`GraniteOptions` fields (and ``decode_options``, the
    decoder's own keywords) out of ``kw`` into one options object."""
    fields = {k: kw.pop(k) for k in list(kw) if k in OPTION_FIELDS}
    decoder = dict(kw.pop("decode_options", {}))
    if "max_graphs" in decoder:
        fields["decode_max_graphs"] = decoder.pop("max_graphs")
    if "compile_step" in decoder:
        fields["compile_step"] = decoder.pop("compile_step")
    return GraniteOptions(**fields, decode_extra=decoder)


def make_engine(tiny, **kw) -> GraniteEngine:
    model, tokenizer = tiny
    options = split_options(kw)
    # Forced decode lengths and recorded tokens (info["token_ids"], info["verify_token_probs"]) are
    # test subclasses', not the product engine's; both subclasses record the tokens.
    cls = ForcedLengthGraniteEngine if "force_new_tokens" in kw else TracedGraniteEngine
    return cls(model=model, tokenizer=tokenizer, model_label="tiny", options=options, **kw)


def req(audio, kind="final", i=0, **kw) -> InferenceRequest:
    return InferenceRequest("s", i, kind, audio, **kw)


# ---------------------------------------------------------------------------------------------
# (1) features


def _hf_extractor_without_torchaudio(ours: GraniteFeatureExtractor, monkeypatch):
    """transformers' own extractor object, with our mel spectrogram standing in for torchaudio's.

    transformers' ``GraniteSpeechFeatureExtractor`` cannot be constructed without torchaudio
    (``requires_backends`` in ``__init__``), so this builds it without ``__init__`` and runs HF's
    real ``__call__`` / ``_extract_mel_spectrograms`` / ``_get_num_audio_features`` code: the
    log/clamp/normalisation, frame stacking, audio-token counts and mask are HF's, only the
    torchaudio ``MelSpectrogram`` module is replaced (it is checked separately against numpy).
    """

    class Mel(torch.nn.Module):
        def forward(self, audio):  # torchaudio layout: (batch, n_mels, frames)
            return ours.mel_spectrogram(audio).transpose(-1, -2)

    monkeypatch.setattr(hf_fe, "requires_backends", lambda *a, **k: None)
    ext = hf_fe.GraniteSpeechFeatureExtractor.__new__(hf_fe.GraniteSpeechFeatureExtractor)
    ext.melspec_kwargs = {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80}
    ext.mel_filters = Mel()
    ext.projector_window_size = 15
    ext.projector_downsample_rate = 5
    ext.sampling_rate = 16000
    return ext


def test_torchaudio_is_absent_and_hf_extractor_needs_it():
    from transformers.utils import is_torchaudio_available

    if is_torchaudio_available():
        pytest.skip("torchaudio is installed here; benchmarks/granite_features_check.py compares values")
    with pytest.raises(ImportError):
        hf_fe.GraniteSpeechFeatureExtractor()


def test_audio_token_counts_match_hf_formula():
    ours = GraniteFeatureExtractor()
    ns = type("NS", (), {})()
    ns.melspec_kwargs = {"hop_length": 160}
    ns.projector_window_size = 15
    ns.projector_downsample_rate = 5
    lengths = LENGTHS + list(range(0, 5000, 37))
    expected = hf_fe.GraniteSpeechFeatureExtractor._get_num_audio_features(ns, lengths)
    assert [ours.num_audio_tokens(n) for n in lengths] == list(expected)
    assert [num_audio_tokens(n) for n in lengths] == list(expected)
    # 10 tokens per second of audio (3 per 15 encoder frames of 20 ms)
    assert ours.num_audio_tokens(16000 * 30 - 160) == 300


@pytest.mark.parametrize("n", LENGTHS)
def test_single_clip_matches_hf_code(n, monkeypatch):
    ours = GraniteFeatureExtractor()
    hf = _hf_extractor_without_torchaudio(ours, monkeypatch)
    audio = tone(n / 16000, 330.0, seed=n)
    expected = hf(audio)
    got = ours(audio)
    assert got.input_features.shape == expected["input_features"].shape
    assert got.input_features.shape == (1, (n // 160 + 1) // 2, 160)
    assert torch.equal(got.input_features, expected["input_features"])
    assert got.audio_embed_sizes == list(expected["audio_embed_sizes"])
    assert torch.equal(got.input_features_mask, expected["input_features_mask"])
    assert got.feature_lengths == [(n // 160 + 1) // 2]
    assert math.ceil(got.feature_lengths[0] / 15) * 3 == got.audio_embed_sizes[0]


def test_padded_batch_matches_hf_code(monkeypatch):
    ours = GraniteFeatureExtractor()
    hf = _hf_extractor_without_torchaudio(ours, monkeypatch)
    clips = [tone(n / 16000, 200.0 + n % 1000, seed=n) for n in (16000, 4799, 24000, 1599)]
    expected = hf([torch.from_numpy(c) for c in clips])
    got = ours(clips)
    assert torch.equal(got.input_features, expected["input_features"])
    assert got.audio_embed_sizes == list(expected["audio_embed_sizes"])
    assert torch.equal(got.input_features_mask, expected["input_features_mask"])
    assert got.input_features_mask.shape == (4, max(got.audio_embed_sizes))
    assert got.input_features_mask.sum(1).tolist() == got.audio_embed_sizes


def _numpy_reference_mel(audio: np.ndarray) -> np.ndarray:
    """float64 reference of torchaudio's MelSpectrogram (Hann 400 in 512, hop 160, reflect, HTK, power 2)."""
    n_fft, win, hop, n_mels, sr = 512, 400, 160, 80, 16000
    x = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
    w = np.pad(w, ((n_fft - win) // 2, n_fft - win - (n_fft - win) // 2))
    frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(x[idx] * w, axis=-1)) ** 2  # (frames, 257)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    pts = 700.0 * (10 ** (np.linspace(mel(0.0), mel(sr / 2), n_mels + 2) / 2595.0) - 1.0)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[:, m] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
    return power @ fb


def test_mel_spectrogram_matches_numpy_reference():
    ours = GraniteFeatureExtractor()
    fb = melscale_fbanks(257, 0.0, 8000.0, 80, 16000)
    assert fb.shape == (257, 80) and fb.dtype == torch.float32
    assert (fb.sum(0) > 0).all()  # no empty filter
    audio = tone(1.3, 500.0, seed=3)
    got = ours.mel_spectrogram(torch.from_numpy(audio)[None])[0].double().numpy()
    ref = _numpy_reference_mel(audio)
    assert got.shape == ref.shape == (len(audio) // 160 + 1, 80)
    scale = ref.max()
    assert np.abs(got - ref).max() / scale < 1e-5
    # and through the log: the normalised features agree to float32 precision
    lg = np.log10(np.maximum(ref, 1e-10))
    lg = np.maximum(lg, lg.max() - 8.0) / 4 + 1
    lg = lg[: (len(lg) // 2) * 2].reshape(-1, 160)
    feats = ours(audio).input_features[0].double().numpy()
    assert np.abs(feats - lg).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# (2) generation


def test_generate_returns_strings(tiny):
    eng = make_engine(tiny)
    reqs = [
        req(tone(0.6, 300.0), "final", 0),
        req(tone(1.4, 900.0, 1), "partial", 1),
        req(tone(1.0, 600.0, 2), "final", 2, task="translate", language="fr", target_language="en"),
        req(tone(0.8, 450.0, 3), "final", 3, keywords=("Granite", "IBM")),
        req(np.zeros(100, np.float32), "final", 4),  # shorter than one STFT window: padded
        req(tone(0.9, 700.0, 4), "final", 5, language="ja"),
    ]
    results = eng.transcribe_batch(reqs)
    assert len(results) == len(reqs)
    for r in results:
        assert isinstance(r.text, str)
        assert r.info["path"] in ("ctc_accept", "verify_accept", "autoregressive", "partial_llm")
    assert results[2].language == "en"
    assert results[5].language == "ja" and results[5].info["path"] == "autoregressive"  # no CTC for ja
    # the budget: ceil(seconds * 8) + 20 new tokens at most
    assert results[1].info["new_tokens"] <= math.ceil(1.4 * 8) + 20
    eng.warmup()


def test_prompts_render_the_reference_wording(tiny):
    """Each rendered prompt, character for character, as the references build it.

    Literal strings copied from: vLLM granite_speech.py ``get_generation_prompt`` (transcribe:
    ``"{audio}can you transcribe the speech into a written format?"``, translate:
    ``"{audio}translate the speech to {full_lang_name_to}"`` with ``"German"`` for ``de``) and the
    granite-4.0-1b-speech model card's keyword example (``"... written format? Keywords: ..."``),
    each through the chat template IBM's notebook prints (``USER: <|audio|>...\\n ASSISTANT:``).
    """
    from stream_server.engines.granite.engine import PROMPT_SOURCES

    eng = make_engine(tiny)
    audio = tone(0.5, 1)
    rendered = {
        "transcribe": eng.prompt_text(eng.instruction(req(audio))),
        "translate": eng.prompt_text(eng.instruction(req(audio, task="translate", language="en", target_language="de"))),
        "translate_fr_en": eng.prompt_text(eng.instruction(req(audio, task="translate", language="fr", target_language="en"))),
        "keywords": eng.prompt_text(eng.instruction(req(audio, keywords=("IBM", " Granite  Speech ", "IBM")))),
    }
    assert rendered == {
        "transcribe": "USER: <|audio|>can you transcribe the speech into a written format?\n ASSISTANT:",
        "translate": "USER: <|audio|>translate the speech to German\n ASSISTANT:",
        "translate_fr_en": "USER: <|audio|>translate the speech to English\n ASSISTANT:",
        "keywords": "USER: <|audio|>can you transcribe the speech into a written format? Keywords: IBM, Granite Speech"
                    "\n ASSISTANT:",
    }
    assert set(PROMPT_SOURCES) == {"transcribe", "translate", "keywords"}
    assert all("granite_speech.py" in PROMPT_SOURCES[k].source for k in ("transcribe", "translate"))
    assert "model card" in PROMPT_SOURCES["keywords"].source
    # Without a chat template the fallback renders the same text.
    model, tokenizer = tiny
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert eng.prompt_text(eng.instruction(req(audio))) == rendered["transcribe"]
    finally:
        tokenizer.chat_template = template


def test_forced_token_count(tiny):
    eng = make_engine(tiny, force_new_tokens=7)
    results = eng.transcribe_batch([req(tone(0.5, 300.0)), req(tone(2.0, 800.0, 1), "partial", 1)])
    assert [len(r.info["token_ids"]) for r in results] == [7, 7]
    assert all(r.info["path"] in ("autoregressive", "partial_llm") for r in results)


# ---------------------------------------------------------------------------------------------
# (3) batching


def test_batch_equals_one_by_one(tiny):
    eng = make_engine(tiny, speculative=False)
    clips = [tone(s, f, i) for i, (s, f) in enumerate([(0.7, 200.0), (1.9, 800.0), (1.2, 3000.0), (0.7, 210.0)])]
    reqs = [req(c, "final", i) for i, c in enumerate(clips)]
    batched = eng.transcribe_batch(reqs)
    single = [eng.transcribe_batch([r])[0] for r in reqs]
    assert [r.info["token_ids"] for r in batched] == [r.info["token_ids"] for r in single]
    assert [r.text for r in batched] == [r.text for r in single]
    # the audio matters: different clips give different decodes
    assert len({tuple(r.info["token_ids"]) for r in batched}) > 1


def test_padded_mode_matches_transformers_generate(tiny):
    """encoder_batching="padded" reproduces processor + model.generate of transformers token for token."""
    model, tokenizer = tiny
    n_new = 8
    eng = make_engine(tiny, encoder_batching="padded", force_new_tokens=n_new)
    clips = [tone(0.7, 200.0, 0), tone(1.9, 800.0, 1), tone(1.2, 3000.0, 2)]
    mine = [r.info["token_ids"] for r in eng.transcribe_batch([req(c, "final", i) for i, c in enumerate(clips)])]

    feats = GraniteFeatureExtractor.from_config(model.config)(clips)
    prompt = eng.prompt_text(eng.instruction(req(clips[0])))
    texts = [prompt.replace("<|audio|>", "<|audio|>" * n) for n in feats.audio_embed_sizes]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            input_features=feats.input_features,
            input_features_mask=feats.input_features_mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    assert out[:, enc.input_ids.shape[1] :].tolist() == mine


# ---------------------------------------------------------------------------------------------
# (4) prefix


@pytest.mark.parametrize("kind,mode", [("final", "llm"), ("partial", "llm"), ("partial", "ctc")])
def test_prefix_is_honoured(tiny, kind, mode):
    eng = make_engine(tiny)
    prefix = "hello wor"
    results = eng.transcribe_batch(
        [req(tone(1.5, 500.0, 7), kind, 0, prefix=prefix, partial_mode=mode), req(tone(1.0, 900.0, 8), kind, 1)]
    )
    assert results[0].text.startswith(prefix)
    assert results[0].text != results[1].text


def test_prefix_tokens_are_forced(tiny):
    """With a prefix the decode continues it: the prefix's tokens follow the assistant tag.

    Reference: transformers' own generate on ``prompt + prefix`` token ids.
    """
    model, tokenizer = tiny
    n_new = 6
    eng = make_engine(tiny, force_new_tokens=n_new)
    audio = tone(1.2, 640.0, 9)
    prefix = "so the "
    r = eng.transcribe_batch([req(audio, prefix=prefix)])[0]
    assert r.text.startswith(prefix)

    feats = GraniteFeatureExtractor.from_config(model.config)(audio)
    prompt = eng.prompt_text(eng.instruction(req(audio)))
    ids = tokenizer.encode(prompt.replace("<|audio|>", "<|audio|>" * feats.audio_embed_sizes[0]), add_special_tokens=False)
    ids += tokenizer.encode(prefix, add_special_tokens=False)
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            input_features=feats.input_features,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    assert out[0, len(ids) :].tolist() == r.info["token_ids"]


def test_force_prefix_heuristic():
    assert _force_prefix("", "abc") == "abc"
    assert _force_prefix("hello wor", "hello world how") == "hello world how"
    assert _force_prefix("hello wor", "helo world how") == "hello world how"
    assert _force_prefix("hello ", "helo world") == "hello world"
    assert _force_prefix("a b c", "x") == "a b c"


# ---------------------------------------------------------------------------------------------
# (5) capabilities


def test_capabilities(tiny):
    caps = make_engine(tiny).capabilities
    assert caps.name == "granite" and caps.model == "tiny"
    assert caps.languages == ("en", "fr", "de", "es", "pt", "ja")
    assert caps.partial_modes == ("llm", "ctc")
    assert caps.keywords and caps.prefix
    assert caps.check("transcribe", "en", None) is None
    assert caps.check("transcribe", "ja", None, keywords=("x",), partial_mode="ctc") is None
    assert caps.check("translate", "fr", "en") is None
    assert caps.check("translate", "ja", None) is None  # target defaults to English
    assert caps.check("translate", "en", "zh") is None
    assert caps.check("translate", "en", "it") is None
    assert caps.check("translate", "fr", "de") is not None
    assert caps.check("translate", "it", "en") is not None
    assert caps.check("translate", "en", "ko") is not None
    assert caps.check("transcribe", "it", None) is not None
    assert caps.check("transcribe", None, None) is not None
    assert caps.check("transcribe", "en", None, partial_mode="beam") is not None
    assert caps.to_wire()["translation_pairs"][0] == ["fr", "en"]


def test_load_from_directory(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    eng = TracedGraniteEngine(str(tmp_path / "ckpt"), options=GraniteOptions(speculative=False))
    assert eng.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert eng.capabilities.model == str(tmp_path / "ckpt")
    if eng.device.type == "cpu":
        assert eng.dtype == torch.float32
        audio = tone(0.8, 700.0, 12)
        ref = make_engine(tiny, speculative=False).transcribe_batch([req(audio)])[0]
        assert eng.transcribe_batch([req(audio)])[0].info["token_ids"] == ref.info["token_ids"]


def test_missing_model_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(GraniteModelNotFoundError, match="local"):
        GraniteEngine("ibm-granite/granite-4.0-1b-speech-does-not-exist")
    with pytest.raises(GraniteModelNotFoundError, match="does not exist"):
        GraniteEngine(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# (6) CTC and self-speculative decoding


def test_ctc_partial_and_ctc_greedy(tiny):
    eng = make_engine(tiny)
    audio = tone(1.6, 400.0, 11)
    r = eng.transcribe_batch([req(audio, "partial", partial_mode="ctc")])[0]
    assert r.info["path"] == "partial_ctc" and "new_tokens" not in r.info
    assert r.text == eng.ctc_greedy(audio)
    feats = eng.features(audio).input_features[0]
    assert eng.ctc_greedy(feats) == r.text
    assert r.text and all(1 <= ord(c) < 348 for c in r.text)  # chr(class) vocabulary, blank 0
    assert eng.stats()["partial_ctc"] == 1
    # a custom vocabulary
    vocab = ["<b>"] + [chr(ord("a") + i % 26) for i in range(347)]
    eng2 = make_engine(tiny, ctc_vocab=vocab)
    assert set(eng2.ctc_greedy(audio)) <= set("abcdefghijklmnopqrstuvwxyz ")


def test_speculative_paths_are_counted(tiny):
    audio = [tone(1.1, 350.0, 20), tone(0.9, 1200.0, 21)]
    reqs = [req(a, "final", i) for i, a in enumerate(audio)]

    eng = make_engine(tiny, ctc_entropy_threshold=math.inf)
    res = eng.transcribe_batch(reqs)
    assert [r.info["path"] for r in res] == ["ctc_accept", "ctc_accept"]
    assert [r.text for r in res] == [eng.ctc_greedy(a) for a in audio]

    eng.ctc_entropy_threshold = -1.0
    eng.verify_threshold = 0.0
    res = eng.transcribe_batch(reqs)
    assert [r.info["path"] for r in res] == ["verify_accept", "verify_accept"]
    assert [r.text for r in res] == [eng.ctc_greedy(a) for a in audio]
    assert all(len(r.info["verify_token_probs"]) > 0 for r in res)

    eng.verify_threshold = 1.01
    res = eng.transcribe_batch(reqs + [req(audio[0], "partial", 5, partial_mode="ctc"), req(audio[1], "partial", 6)])
    assert [r.info["path"] for r in res] == ["autoregressive", "autoregressive", "partial_ctc", "partial_llm"]
    assert res[0].info["new_tokens"] > 0

    # translation finals never speculate
    res = eng.transcribe_batch([req(audio[0], task="translate", language="en", target_language="fr")])
    assert res[0].info["path"] == "autoregressive"

    stats = eng.stats()
    assert {k: stats[k] for k in ("ctc_accept", "verify_accept", "resumed", "autoregressive", "partial_llm",
                                  "partial_ctc")} == {
        "ctc_accept": 2,
        "verify_accept": 2,
        "resumed": 0,  # threshold 1.01: not even the first draft token passes, nothing to resume from
        "autoregressive": 3,
        "partial_llm": 1,
        "partial_ctc": 1,
    }


def test_verification_scores_the_right_positions(tiny, monkeypatch):
    """Teacher forcing the greedy decode: every draft token is the argmax at its position."""
    eng = make_engine(tiny, speculative=False)
    audio = tone(1.3, 520.0, 30)
    greedy = eng.transcribe_batch([req(audio)])[0].info["token_ids"]
    assert greedy

    spec = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0)
    monkeypatch.setattr(spec, "draft", lambda w: Draft("x", tuple(greedy)))
    r = spec.transcribe_batch([req(audio)])[0]
    assert r.info["path"] == "verify_accept"
    assert r.info["verify_is_argmax"] == [True] * len(greedy)


def test_speculation_with_prefix_keeps_prefix(tiny):
    eng = make_engine(tiny, ctc_entropy_threshold=math.inf, verify_threshold=0.0)
    audio = tone(1.2, 610.0, 40)
    ctc = eng.ctc_greedy(audio)
    # a prefix the draft already starts with: accepted as is
    r = eng.transcribe_batch([req(audio, prefix=ctc[:3])])[0]
    assert r.info["path"] == "ctc_accept" and r.text == ctc
    # a prefix the draft does not start with: verified (here accepted) with the prefix kept
    r = eng.transcribe_batch([req(audio, prefix="zz top ")])[0]
    assert r.info["path"] in ("verify_accept", "autoregressive")
    assert r.text.startswith("zz top ")


# ---------------------------------------------------------------------------------------------
# (6) fast greedy loop (StaticGreedyDecoder): the same tokens as transformers' generate.
# The CUDA-graph capture runs only on CUDA (benchmarks/granite_gpu_bench.py); the loop logic
# (prefill, step, EOS handling, bucketing by extra left padding, fused layers) is shared and runs here.


@pytest.mark.parametrize("force", [None, 9])
@pytest.mark.parametrize(
    "options",
    [{}, {"fused": True}, {"fused": True, "prompt_quantum": 32}, {"fused": False, "prompt_quantum": 64}],
)
def test_loop_backend_matches_generate(tiny, force, options):
    clips = [tone(s, f, i) for i, (s, f) in enumerate([(0.7, 200.0), (1.9, 800.0), (1.2, 3000.0), (2.6, 450.0)])]
    reqs = [req(c, "final", i) for i, c in enumerate(clips)]
    ref_eng = make_engine(tiny, speculative=False, force_new_tokens=force, decode_backend="generate")
    eng = make_engine(tiny, speculative=False, force_new_tokens=force, decode_backend="loop", decode_options=options)
    ref = [r.info["token_ids"] for r in ref_eng.transcribe_batch(reqs)]
    got = eng.transcribe_batch(reqs)
    assert [r.info["token_ids"] for r in got] == ref
    single = [eng.transcribe_batch([r])[0].info["token_ids"] for r in reqs]
    assert single == ref  # variable-length batch (left padding) == one by one
    if force:
        assert all(len(t) == force for t in ref)
    else:  # the budget stops some rows, EOS others: both must be handled like generate
        assert len({len(t) for t in ref}) > 1
    assert eng._decoder is not None and (eng._decoder._fused_weights is not None) == bool(options.get("fused"))


def test_loop_backend_prefix_and_partials(tiny):
    reqs = [
        req(tone(1.1, 500.0, 3), "final", 0, prefix="ab"),
        req(tone(0.9, 650.0, 4), "partial", 1),
        req(tone(1.3, 350.0, 5), "final", 2, task="translate", language="fr", target_language="en"),
    ]
    ref = make_engine(tiny, decode_backend="generate").transcribe_batch(reqs)
    got = make_engine(tiny, decode_backend="loop").transcribe_batch(reqs)
    assert [r.text for r in got] == [r.text for r in ref]
    assert [r.info.get("token_ids") for r in got] == [r.info.get("token_ids") for r in ref]


def test_decode_backend_selection(tiny):
    assert make_engine(tiny).decode_backend == "generate"  # auto on CPU
    with pytest.raises(ValueError):
        make_engine(tiny, decode_backend="graphs")  # CUDA only
    with pytest.raises(ValueError):
        make_engine(tiny, decode_backend="fast")
    eng = make_engine(tiny, decode_backend="loop", speculative=False, generate_kwargs={"repetition_penalty": 1.3})
    eng.transcribe_batch([req(tone(0.8, 300.0))])
    assert eng._decoder is None  # non-greedy settings: transformers' generate is used


def test_batched_ctc_partials_match_one_by_one(tiny):
    # The CTC head runs once for a whole batch of different lengths; each row must read as if alone.
    eng = make_engine(tiny)
    audio = [tone(0.7, 300.0, 30), tone(1.9, 700.0, 31), tone(1.2, 1500.0, 32)]
    together = eng.transcribe_batch([req(a, "partial", i, partial_mode="ctc") for i, a in enumerate(audio)])
    alone = [eng.transcribe_batch([req(a, "partial", 0, partial_mode="ctc")])[0] for a in audio]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.info["ctc_entropy"] for r in together] == pytest.approx([r.info["ctc_entropy"] for r in alone], rel=1e-4)
    assert all(r.text for r in together)


def test_batched_ctc_on_a_padded_encoder_batch_reads_each_row_alone(tiny):
    # Padded batching shares one (B, T, H) encoder output; the batched CTC pass must mask each row's padding.
    eng = make_engine(tiny, encoder_batching="padded")
    audio = [tone(0.7, 300.0, 30), tone(1.9, 700.0, 31), tone(1.2, 1500.0, 32)]
    works = eng.prepare([req(a, "partial", i, partial_mode="ctc") for i, a in enumerate(audio)])
    with torch.inference_mode():
        eng.encode(works)
        eng.ctc(works)
        alone = [eng._ctc_from_hidden(w.hidden) for w in works]
    assert [w.ctc_text for w in works] == [t for t, _ in alone] and all(t for t, _ in alone)
    assert [w.ctc_entropy for w in works] == pytest.approx([e for _, e in alone], rel=1e-5)


def test_encoder_backend_selection(tiny):
    assert make_engine(tiny).encoder_backend == "eager"  # auto on CPU
    assert make_engine(tiny, encoder_batching="padded").encoder_graphs is None
    with pytest.raises(ValueError, match="CUDA"):
        make_engine(tiny, encoder_backend="graphs", encoder_batching="padded")
    with pytest.raises(ValueError):
        make_engine(tiny, encoder_backend="fast")


@pytest.mark.parametrize("frames", [1, 7, 50, 250])
def test_padding_audio_to_max_samples_for_frames_gives_exactly_that_many_frames(frames):
    # The encoder graphs zero-pad a batch to this length; one sample more would need the next bucket.
    from stream_server.engines.granite.features import max_samples_for_frames, num_encoder_frames

    n = max_samples_for_frames(frames)
    extractor = GraniteFeatureExtractor()
    assert num_encoder_frames(n) == frames and num_encoder_frames(n + 1) == frames + 1
    assert extractor.log_mel_stacked(torch.zeros(2, n)).shape[1] == frames


def test_length_groups_trade_padding_against_extra_encoder_calls():
    from stream_server.engines.granite.decode import batch_bucket
    from stream_server.engines.granite.encoder import plan_length_groups

    bucket = lambda n: -(-n // 50) * 50  # noqa: E731 - 1 s buckets, as the encoder graphs use
    # One long partial among many short ones: encoding them all at 10 s would waste most of the work.
    lengths = [100] * 15 + [500]
    groups = plan_length_groups(lengths, bucket, batch_bucket, overhead_frames=1000)
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert [15] in groups and len(groups) == 2
    # Similar lengths stay together: another call would cost more than the padding it saves.
    groups = plan_length_groups([100, 110, 120, 140], bucket, batch_bucket, overhead_frames=1000)
    assert groups == [[0, 1, 2, 3]]
    assert plan_length_groups([], bucket) == [] and plan_length_groups([7], bucket) == [[0]]


def test_ctc_partials_are_reported_before_the_finals_are_decoded(tiny, monkeypatch):
    eng = make_engine(tiny, speculative=False)
    assert eng.capabilities.early_results
    reported, at_decode = [], []
    original = eng._generate
    monkeypatch.setattr(eng, "_generate",
                        lambda works, *rest: (at_decode.append(list(reported)), original(works, *rest))[1])
    reqs = [req(tone(1.2, 500.0, 40), "final", 0), req(tone(0.9, 800.0, 41), "partial", 1, partial_mode="ctc")]
    results = eng.transcribe_batch(reqs, on_result=lambda i, r: reported.append((i, r)))
    assert at_decode == [[(1, results[1])]]  # the partial was out before the final's decode began
    assert results[1].info["path"] == "partial_ctc" and results[0].info["path"] == "autoregressive"
    assert eng.stats()["partial_ctc"] == 1  # counted once, although reported early


def test_bad_decode_state_options_are_refused(tiny):
    with pytest.raises(ValueError, match="max_graphs"):
        make_engine(tiny, decode_options={"max_graphs": -1})
    with pytest.raises(ValueError, match="warm_decode_seconds"):
        make_engine(tiny, warm_decode_seconds=(3.0, 0.0))


def test_compiled_decode_step_serves_more_shapes_than_dynamos_default_limit(tiny):
    # torch._dynamo compiles a function for at most 8 input shapes by default; a server's decode
    # meets more batch x capacity buckets than that, and with fullgraph=True the 9th shape failed the
    # whole batch (FailOnRecompileLimitHit, seen on an H100). The engine raises the limit; this
    # backend only counts the graphs dynamo hands it and runs them as traced (no code generation),
    # so the test takes seconds on the CPU.
    import torch._dynamo

    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(len(example_inputs))
        return graph_module.forward

    torch._dynamo.reset()
    # Start from dynamo's defaults; the patch puts back whatever the engine raises them to.
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        options = {"fused": True, "compile_step": True, "compile_backend": counting_backend}
        compiled = make_engine(tiny, decode_backend="loop", force_new_tokens=3, speculative=False,
                               decode_options=options)
        plain = make_engine(tiny, decode_backend="loop", force_new_tokens=3, speculative=False,
                            decode_options={"fused": True})
        assert compiled.decoder.compile_step and not plain.decoder.compile_step
        for i, (rows, seconds) in enumerate([(1, 0.6), (1, 0.9), (2, 0.6), (2, 1.2), (3, 0.7), (1, 1.5),
                                             (4, 0.8), (2, 1.7), (1, 2.0), (3, 1.9), (5, 0.9)]):
            requests = [req(tone(seconds + 0.05 * r, 300.0 + 40 * r, 100 * i + r), "final", r) for r in range(rows)]
            got = [r.info["token_ids"] for r in compiled.transcribe_batch(requests)]
            assert got == [r.info["token_ids"] for r in plain.transcribe_batch(requests)]
    torch._dynamo.reset()
    assert len(compiled_graphs) > 8  # compiled for more shapes than dynamo's default limit, all equal to eager


def test_warmup_leaves_the_path_counters_at_zero(tiny):
    eng = make_engine(tiny, speculative=False)
    eng.warmup()
    assert not any(eng.stats().values())  # its decodes are not traffic
    eng.transcribe_batch([req(tone(0.8, 700.0, 3))])
    assert eng.stats()["autoregressive"] == 1


# ---------------------------------------------------------------------------------------------
# (7) issue 18: behave like the references on every task


def test_keywords_are_seen_by_the_llm_before_a_draft_is_final(tiny, monkeypatch):
    """A confident CTC draft is final only without keywords; with them, the LLM pass that decides
    (verification here) has the ``Keywords:`` prompt in its input."""
    eng = make_engine(tiny, ctc_entropy_threshold=math.inf, verify_threshold=0.0)
    audio = tone(1.1, 350.0, 20)
    plain = eng.transcribe_batch([req(audio)])[0]
    assert plain.info["path"] == "ctc_accept"
    seen: list[list[int]] = []
    original = eng._embed_batch
    monkeypatch.setattr(eng, "_embed_batch", lambda seqs, feats: (seen.extend(seqs), original(seqs, feats))[1])
    r = eng.transcribe_batch([req(audio, keywords=("Granite",))])[0]
    assert r.info["path"] == "verify_accept" and r.text == plain.text
    keywords = eng._encode("? Keywords: Granite")
    assert any(any(seq[i : i + len(keywords)] == keywords for i in range(len(seq))) for seq in seen)


def _hf_greedy_after(model, tokenizer, eng, audio, forced: list[int], n_new: int) -> list[int]:
    """transformers' generate on the transcription prompt followed by ``forced`` token ids."""
    feats = GraniteFeatureExtractor.from_config(model.config)(audio)
    prompt = eng.prompt_text(eng.instruction(req(audio)))
    ids = tokenizer.encode(prompt.replace("<|audio|>", "<|audio|>" * feats.audio_embed_sizes[0]),
                           add_special_tokens=False) + list(forced)
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             input_features=feats.input_features, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def test_rejected_draft_resumes_after_its_verified_prefix(tiny, monkeypatch):
    """The paper's step 3: the tokens equal a forced-prefix ``generate`` (draft tokens that passed,
    then greedy); IBM's notebook restarts from scratch instead (``resume_from_draft=False``)."""
    model, tokenizer = tiny
    audio = tone(1.3, 520.0, 30)
    probe = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0)
    feats = GraniteFeatureExtractor.from_config(model.config)(audio)
    prompt = probe.prompt_text(probe.instruction(req(audio)))
    ids = tokenizer.encode(prompt.replace("<|audio|>", "<|audio|>" * feats.audio_embed_sizes[0]),
                           add_special_tokens=False)

    def next_logits(forced):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids + forced]), input_features=feats.input_features).logits[0, -1]

    # A draft that is not the greedy decode (its first token is the runner-up), whose third token
    # is the least likely one: a threshold between them lets exactly two tokens pass.
    head = [int(next_logits([]).topk(2).indices[1])]
    head.append(int(next_logits(head).argmax()))
    worst = int(next_logits(head).argmin())
    draft = head + [worst] + head

    def fixed_draft(w):
        return Draft(tokenizer.decode(draft), tuple(draft))

    monkeypatch.setattr(probe, "draft", fixed_draft)
    probs = probe.transcribe_batch([req(audio)])[0].info["verify_token_probs"]
    threshold = min(probs[:2])
    assert probs[2] < threshold  # the draft fails at its third token

    budget = math.ceil(1.3 * 8) + 20
    for resume in (True, False):
        eng = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=threshold, resume_from_draft=resume,
                          repetition_guard=False)  # (the random model loops: the guard would change the text)
        monkeypatch.setattr(eng, "draft", fixed_draft)
        r = eng.transcribe_batch([req(audio)])[0]
        if resume:
            assert r.info["path"] == "resumed" and r.info["resumed_tokens"] == 2
            assert r.info["token_ids"] == head + _hf_greedy_after(model, tokenizer, eng, audio, head, budget - 2)
        else:
            assert r.info["path"] == "autoregressive" and "resumed_tokens" not in r.info
            assert r.info["token_ids"] == _hf_greedy_after(model, tokenizer, eng, audio, [], budget)
        assert r.text == tokenizer.decode(r.info["token_ids"], skip_special_tokens=True).strip()
    assert eng.stats()["autoregressive"] == 1


def test_token_budget_follows_the_output_language_and_reports_truncation(tiny):
    eng = make_engine(tiny, speculative=False)
    audio = tone(1.0, 500.0, 3)
    results = eng.transcribe_batch([
        req(audio, "final", 0),
        req(audio, "final", 1, language="ja"),
        req(audio, "final", 2, task="translate", language="en", target_language="ja"),
        req(audio, "final", 3, task="translate", language="ja", target_language="en"),
    ])
    # 8 tokens/s by default, 16 for Japanese output; + 20 each
    assert [r.info["new_tokens"] for r in results] == [28, 36, 36, 28]
    assert all(r.truncated for r in results)  # the random model never ends on its own
    assert eng.stats()["truncated"] == 4
    with pytest.raises(ValueError):
        make_engine(tiny, tokens_per_second_by_language={"ja": 0.0})


def test_finish_flags_truncation_and_collapses_repetition_loops(tiny):
    from stream_server.engines.whisper import collapse_repeats, looks_repetitive

    eng = make_engine(tiny)
    looping = eng._prepare(0, req(tone(5.0, 500.0, 3)))
    ending = eng._prepare(1, req(tone(5.0, 500.0, 4), i=1))
    budget = looping.budget
    loop_tokens = eng._encode(" go forward" * 20)[:budget]
    end_tokens = eng._encode(" go forward ten meters") + [eng.eos_ids[0]]
    out = torch.full((2, budget), eng.pad_id, dtype=torch.long)
    out[0] = torch.tensor(loop_tokens)
    out[1, : len(end_tokens)] = torch.tensor(end_tokens)
    eng._finish([looping, ending], out, forced=False)
    raw = tokenizer_text = eng.tokenizer.decode(loop_tokens).strip()
    assert looks_repetitive(raw) and looping.text == collapse_repeats(tokenizer_text) and len(looping.text) < len(raw)
    assert looping.truncated and looping.info["repetition_collapsed"]
    assert ending.text == "go forward ten meters" and not ending.truncated and "repetition_collapsed" not in ending.info
    assert eng.stats()["repetition_loops"] == 1 and eng.stats()["truncated"] == 1
    assert eng._result(looping).truncated and not eng._result(ending).truncated
    off = make_engine(tiny, repetition_guard=False)
    again = off._prepare(0, req(tone(5.0, 500.0, 3)))
    off._finish([again], out[:1], forced=False)
    assert again.text == raw and off.stats()["repetition_loops"] == 0


def test_ctc_greedy_decoding_of_hand_built_logits(tiny, monkeypatch):
    """Collapse repeats, drop blanks, map class i to chr(i); entropy per frame reduced over the valid
    frames only. Known answers, not the engine compared with itself."""
    eng = make_engine(tiny)
    classes = 348
    rows = ["hh_el_llo__ ww_orrldd", "n_o_oo_"]  # '_' = blank (class 0); row 1 is shorter
    lengths = [len(r) for r in rows]
    logits = torch.zeros(2, max(lengths), classes)
    for b, row in enumerate(rows):
        for t, ch in enumerate(row):
            logits[b, t, 0 if ch == "_" else ord(ch)] = 20.0
        logits[b, len(row):, ord("x")] = 20.0  # padding frames past the length: must be ignored
    logits[0, 2] = 0.0  # one uniform frame (argmax: class 0, a blank) of entropy log(348)
    monkeypatch.setattr(eng, "ctc_logits", lambda hidden: logits)
    confident = -(20.0 - math.log(math.exp(20.0) + classes - 1)) * math.exp(20.0) / (math.exp(20.0) + classes - 1) - (
        classes - 1) * (1 / (math.exp(20.0) + classes - 1)) * math.log(1 / (math.exp(20.0) + classes - 1))
    (text0, h0), (text1, h1) = eng._ctc_rows(torch.zeros(2, max(lengths), 1), lengths)
    assert (text0, text1) == ("hello world", "noo")
    assert h0 == pytest.approx(math.log(classes), rel=1e-5)  # "max" over frames: the uniform one
    assert h1 == pytest.approx(confident, rel=1e-3)
    eng.ctc_entropy_reduce = "mean"
    (_, m0), _ = eng._ctc_rows(torch.zeros(2, max(lengths), 1), lengths)
    assert m0 == pytest.approx((math.log(classes) + (lengths[0] - 1) * confident) / lengths[0], rel=1e-4)
    # all blanks: no text, and an infinite entropy so that no draft is accepted from it
    logits[1, :, :] = 0.0
    logits[1, :, 0] = 20.0
    assert eng._ctc_rows(torch.zeros(2, max(lengths), 1), lengths)[1] == ("", math.inf)


def test_ctc_head_is_used_only_when_its_classes_are_known(tiny):
    from granite_stream_testing.tiny_granite import build_tiny_granite as build

    model, tokenizer = build(seed=1, ctc_classes=42)  # not the 348-class character head
    eng = GraniteEngine(model=model, tokenizer=tokenizer, model_label="odd")
    assert not eng.has_ctc and not eng.speculative and eng.capabilities.partial_modes == ("llm",)
    r = eng.transcribe_batch([req(tone(0.8, 400.0, 2))])[0]
    assert r.info["path"] == "autoregressive"
    with_vocab = GraniteEngine(model=model, tokenizer=tokenizer, ctc_vocab=["<b>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 .,'?"))
    assert with_vocab.has_ctc and with_vocab.capabilities.partial_modes == ("llm", "ctc")
    assert make_engine(tiny).has_ctc  # 348 classes: IBM's chr(class) mapping


def test_lora_checkpoint_without_its_adapter_is_refused(tiny):
    from stream_server.engines.granite.engine import GraniteCheckpointError

    model, tokenizer = tiny
    model.config.has_lora_adapter = True
    try:
        with pytest.raises(GraniteCheckpointError, match="LoRA adapter.*(peft|adapter)"):
            GraniteEngine(model=model, tokenizer=tokenizer)
    finally:
        model.config.has_lora_adapter = False


def test_preprocessor_config_must_match_the_engine_features(tiny, tmp_path):
    import json

    from stream_server.engines.granite.engine import GraniteCheckpointError, check_preprocessor

    model, tokenizer = tiny
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    good = {"melspec_kwargs": {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80},
            "projector_window_size": 15, "projector_downsample_rate": 5, "sampling_rate": 16000}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(good))
    GraniteEngine(str(ckpt), options=GraniteOptions(speculative=False))  # matching: loads
    bad = dict(good, melspec_kwargs=dict(good["melspec_kwargs"], hop_length=320))
    (ckpt / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(GraniteCheckpointError, match="hop_length=320"):
        GraniteEngine(str(ckpt))
    (ckpt / "preprocessor_config.json").unlink()  # newer transformers: processor_config.json, nested
    (ckpt / "processor_config.json").write_text(json.dumps({"feature_extractor": bad, "processor_class": "x"}))
    with pytest.raises(GraniteCheckpointError, match="hop_length=320"):
        GraniteEngine(str(ckpt))
    with pytest.raises(GraniteCheckpointError, match="n_mels=128"):  # newer transformers: top-level keys
        check_preprocessor({"n_mels": 128, "projector_window_size": 15}, model.config)
    with pytest.raises(GraniteCheckpointError, match="projector_window_size=10"):
        check_preprocessor(dict(good, projector_window_size=10), model.config)


@pytest.mark.parametrize("options", [{"fused": False}, {"fused": True}])
def test_loop_decoder_logits_match_a_transformers_forward(tiny, options):
    """Not only the argmax: every step's logits equal transformers' forward over prompt + tokens so far
    (µP multipliers, untied head, left padding of a two-row batch)."""
    model, _ = tiny
    n_new = 6
    eng = make_engine(tiny, speculative=False, force_new_tokens=n_new, decode_backend="loop",
                      decode_options={**options, "record_logits": True})
    reqs = [req(tone(0.7, 200.0, 0), "final", 0), req(tone(1.9, 800.0, 1), "final", 1)]
    tokens = torch.tensor([r.info["token_ids"] for r in eng.transcribe_batch(reqs)])
    recorded = torch.stack(eng.decoder.logits_log, dim=1)  # (B, n_new, V)
    assert recorded.shape[1] == n_new
    with torch.inference_mode():
        works = eng.prepare(reqs)
        eng.encode(works)
        eng.project(works)
        embeds, mask = eng.prompt_embeddings(works)
        full = torch.cat([embeds, model.get_input_embeddings()(tokens[:, :-1])], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(inputs_embeds=full, attention_mask=full_mask, position_ids=positions).logits
    t0 = embeds.shape[1]
    torch.testing.assert_close(recorded, ref[:, t0 - 1 :].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(recorded.argmax(-1), tokens)


def test_a_final_that_hit_its_budget_says_truncated_on_the_wire(tiny):
    """Engine result -> session -> the final event: ``"truncated": true`` (absent otherwise)."""
    import json

    from stream_server.inference.types import InferenceResult
    from stream_server.core.session import Send, Session, SessionSettings, Submit
    from tests.vad.test_vad import voiced

    eng = make_engine(tiny, speculative=False)

    def finals(engine_answer):
        session = Session("s", eng.capabilities, SessionSettings())
        events = []

        def run(actions):
            for action in actions:
                if isinstance(action, Send):
                    events.append(action.event.to_wire())
                elif isinstance(action, Submit):
                    run(session.inference_done(action.request, engine_answer(action.request)))

        run(session.receive_text(json.dumps({"type": "start", "partials": False,
                                             "audio": {"encoding": "pcm_f32le", "sample_rate": 16000}})))
        run(session.receive_bytes(np.concatenate([np.zeros(8000, np.float32), voiced(1.0).astype(np.float32)]).tobytes()))
        run(session.receive_text('{"type":"finalize"}'))
        return [e for e in events if e["type"] == "final"]

    [final] = finals(lambda request: eng.transcribe_batch([request])[0])  # the random model never stops
    assert final["truncated"] is True
    [final] = finals(lambda request: InferenceResult(text="done", language="en"))
    assert "truncated" not in final and final["text"] == "done"


def test_compiled_step_auto_keeps_the_faster_and_decodes_the_same(tiny):
    import torch._dynamo

    def counting_backend(graph_module, example_inputs):
        return graph_module.forward

    torch._dynamo.reset()
    options = {"fused": True, "compile_step": "auto", "compile_backend": counting_backend}
    reqs = [req(tone(0.8, 300.0, 1), "final", 0), req(tone(1.1, 700.0, 2), "final", 1)]
    plain = make_engine(tiny, decode_backend="loop", force_new_tokens=4, speculative=False, decode_options={"fused": True})
    expected = [r.info["token_ids"] for r in plain.transcribe_batch(reqs)]
    for compiled_s, eager_s, kept in ((2.0, 1.0, "eager"), (1.0, 2.0, "compiled")):
        eng = make_engine(tiny, decode_backend="loop", force_new_tokens=4, speculative=False, decode_options=options)
        timings = iter([compiled_s, eager_s])
        assert eng._choose_compile_step(measure=lambda: next(timings))
        assert eng.compile_choice == {"compiled_s": compiled_s, "eager_s": eager_s, "kept": kept}
        assert eng.decoder.compile_step == (kept == "compiled")
        assert [r.info["token_ids"] for r in eng.transcribe_batch(reqs)] == expected
    assert eng._time_decode(repeats=1, tokens=3) > 0  # the real timer runs (a full batch, forced tokens)
    assert not plain._choose_compile_step()  # not "auto": nothing to choose
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile_step"):
        make_engine(tiny, decode_options={"compile_step": "sometimes"})


def test_decode_states_are_sized_from_free_memory(tiny):
    from stream_server.engines.granite.decode import decode_states_for_memory

    gib = 1 << 30
    assert decode_states_for_memory(130 * gib, int(1.34 * gib)) == 48  # an H200, batch 64 x 12 s states
    assert decode_states_for_memory(70 * gib, int(1.34 * gib)) == 26  # an H100
    assert decode_states_for_memory(4 * gib, gib) == 8 and decode_states_for_memory(10**15, gib) == 64
    eng = make_engine(tiny, decode_backend="loop", decode_options={"max_graphs": 0})
    assert eng.decode_states_for_free_memory() == 8  # off CUDA: the old default
    assert eng.decoder.max_graphs == 8


def test_drafts_are_scored_by_the_decoders_prefill_like_transformers(tiny, monkeypatch):
    """With the loop/graphs backends the verify pass runs the decoder's prefill (a graph replay on
    CUDA) instead of transformers' eager forward: the same hidden states, the same token probabilities."""
    audio = [tone(1.1, 350.0, 20), tone(0.9, 1200.0, 21)]
    reqs = [req(a, "final", i) for i, a in enumerate(audio)]
    ref = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0, decode_backend="generate")
    fast = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0, decode_backend="loop")
    assert fast._fast_verify and not ref._fast_verify
    eager_lm = []
    original = fast.model.model.language_model.forward
    monkeypatch.setattr(fast.model.model.language_model, "forward",
                        lambda *a, **k: (eager_lm.append(1), original(*a, **k))[1])
    got = fast.transcribe_batch(reqs)
    monkeypatch.undo()
    want = ref.transcribe_batch(reqs)
    assert not eager_lm  # transformers' forward was not used
    assert [r.info["path"] for r in got] == [r.info["path"] for r in want] == ["verify_accept"] * 2
    for g, w in zip(got, want):
        assert g.info["verify_token_probs"] == pytest.approx(w.info["verify_token_probs"], rel=1e-4, abs=1e-7)
    # and directly: the decoder's hidden states equal transformers' last_hidden_state, left padding included
    with torch.inference_mode():
        works = fast.prepare(reqs)
        fast.encode(works)
        fast.project(works)
        embeds, mask = fast.prompt_embeddings(works)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
        hf = fast.model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        ours = fast.decoder.hidden_states(embeds, mask, pad_token_id=fast.pad_id, eos_token_ids=fast.eos_ids)
    real = mask.bool()
    torch.testing.assert_close(ours[real], hf[real], rtol=1e-4, atol=1e-4)


def test_warm_verify_runs_the_scoring_pass_of_a_typical_draft(tiny, monkeypatch):
    eng = make_engine(tiny, decode_backend="loop")
    shapes = []
    original = eng.decoder.hidden_states
    monkeypatch.setattr(eng.decoder, "hidden_states", lambda e, m, **k: (shapes.append(tuple(e.shape)), original(e, m, **k))[1])
    eng._warm_verify(2, 3.0)
    prompt = len(eng._sequence(eng._prepare(0, req(np.zeros(48000, np.float32)))))
    assert shapes == [(2, prompt + 12, 32)]  # 3 s of speech: 30 audio tokens in the prompt + a 12-token draft


def test_finals_are_timed_from_the_ctc_posteriors(tiny):
    """A transcription final in a CTC language gets words aligned to the encoder's CTC posteriors
    (no second pass): they rebuild its text, in order, inside the audio. Translations and partials
    are not timed, and word_timestamps=False turns it off."""
    audio = [tone(1.1, 350.0, 20), tone(1.6, 900.0, 22)]
    eng = make_engine(tiny, ctc_entropy_threshold=math.inf)  # the final is the CTC draft: its own path
    for a, r in zip(audio, eng.transcribe_batch([req(a, "final", i) for i, a in enumerate(audio)])):
        assert r.info["path"] == "ctc_accept" and r.text
        assert r.words is not None and " ".join(w.word for w in r.words) == r.text
        starts = [w.start for w in r.words]
        assert starts == sorted(starts) and all(0 <= w.start < w.end <= len(a) / 16000 + 0.02 for w in r.words)
        assert all(0 < w.confidence <= 1 for w in r.words)
        assert r.confidence == pytest.approx(np.mean([w.confidence for w in r.words]), abs=1e-3)
    [translated] = eng.transcribe_batch([req(audio[0], task="translate", language="en", target_language="fr")])
    assert translated.words is None and translated.confidence is None
    [partial] = eng.transcribe_batch([req(audio[0], "partial", partial_mode="ctc")])
    assert partial.words is None
    off = make_engine(tiny, ctc_entropy_threshold=math.inf, word_timestamps=False)
    assert off.transcribe_batch([req(audio[0])])[0].words is None


def test_a_final_known_before_the_llm_decode_aligns_meanwhile_to_the_same_words(tiny, monkeypatch):
    """A final accepted from its CTC draft in a batch the LLM still decodes for starts aligning at
    once (on the aligner's threads) and gets the words it gets in a batch of its own."""
    import stream_server.engines.granite.engine as engine_module

    audio = tone(1.6, 900.0, 22)
    eng = make_engine(tiny, ctc_entropy_threshold=math.inf)
    [alone] = eng.transcribe_batch([req(audio)])
    started = []
    original = engine_module.align_words_soon
    monkeypatch.setattr(engine_module, "align_words_soon", lambda *a, **k: (started.append(a[0]), original(*a, **k))[1])
    translate = req(tone(1.0, 500.0, 3), "final", 1, task="translate", language="en", target_language="fr")
    accepted, translated = eng.transcribe_batch([req(audio), translate])
    assert [accepted.info["path"], translated.info["path"]] == ["ctc_accept", "autoregressive"]
    assert started == [accepted.text]
    assert accepted.words is not None and accepted.words == alone.words


def test_long_decoded_finals_align_as_they_are_detokenised_to_the_same_words(tiny, monkeypatch):
    """Decoded finals with a large Viterbi table start aligning as soon as their row is
    detokenised; their words (and confidences, with the LLM's token probabilities) are those of
    aligning after the whole batch."""
    import stream_server.engines.granite.engine as engine_module

    requests = [req(tone(1.1, 350.0, 20), "final", 0), req(tone(1.6, 900.0, 22), "final", 1)]
    eng = make_engine(tiny, speculative=False)
    later = eng.transcribe_batch(requests)
    assert all(r.info["path"] == "autoregressive" for r in later)
    assert any(r.words for r in later)
    started = []
    original = engine_module.align_words_soon
    monkeypatch.setattr(engine_module, "align_words_soon", lambda *a, **k: (started.append(a[0]), original(*a, **k))[1])
    monkeypatch.setattr(engine_module, "ALIGN_SOON_CELLS", 0)
    soon = eng.transcribe_batch(requests)
    assert started == [r.text for r in soon if r.text]
    assert [(r.text, r.words, r.confidence) for r in soon] == [(r.text, r.words, r.confidence) for r in later]


def test_closing_the_engine_stops_its_word_aligner_threads(tiny, monkeypatch):
    """The word aligner's threads belong to the engine: it aligns on threads of its own, and its
    close() stops them instead of leaving them to the process."""
    import stream_server.engines.granite.engine as engine_module

    def aligner_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("ctc-align")}

    monkeypatch.setattr(engine_module, "ALIGN_SOON_CELLS", 0)  # every timed final aligns on the threads
    eng = make_engine(tiny, speculative=False)
    before = aligner_threads()
    results = eng.transcribe_batch([req(tone(1.1, 350.0, 20), "final", 0), req(tone(1.6, 900.0, 22), "final", 1)])
    assert any(r.words for r in results)
    own = aligner_threads() - before
    assert own
    eng.close()
    assert not any(t.is_alive() for t in own)


@pytest.mark.parametrize("backend", ["generate", "loop"])
def test_public_stages_compose_to_the_batch_decode(tiny, backend):
    # prepare -> encode -> project -> prompt_embeddings -> decode is transcribe_batch's own path
    # (benchmarks time the stages one by one): the same tokens for the same batch.
    eng = make_engine(tiny, speculative=False, force_new_tokens=6, decode_backend=backend)
    requests = [req(tone(0.8, 300.0, 1), "final", 0), req(tone(1.6, 900.0, 2), "final", 1)]
    want = [r.info["token_ids"] for r in eng.transcribe_batch(requests)]
    with torch.inference_mode():
        works = eng.prepare(requests)
        for _ in range(2):  # encode clears the previous projection: repeating the stages repeats the work
            eng.encode(works)
            eng.project(works)
        embeds, mask = eng.prompt_embeddings(works)
        got = eng.decode(embeds, mask, 6, suppress_eos=True)
    assert [list(map(int, row)) for row in got.tolist()] == want


@pytest.mark.parametrize("backend", ["generate", "loop"])
def test_public_speculation_stages_compose_to_the_verified_final(tiny, backend):
    # prepare -> encode -> ctc -> project -> draft -> verify is transcribe_batch's path for a final
    # that speculates: the same draft, the same probabilities and the same verdict.
    eng = make_engine(tiny, ctc_entropy_threshold=-1.0, verify_threshold=0.0, decode_backend=backend)
    audio = [tone(1.1, 350.0, 20), tone(1.3, 520.0, 30)]
    prefix = eng.ctc_greedy(audio[1])[:2]  # the draft starts with it: the rest is scored
    requests = [req(audio[0], "final", 0), req(audio[1], "final", 1, prefix=prefix)]
    want = eng.transcribe_batch(requests)
    assert [r.info["path"] for r in want] == ["verify_accept"] * 2
    with torch.inference_mode():
        works = eng.prepare(requests)
        eng.encode(works)
        eng.ctc(works)
        eng.project(works)
        drafts = [eng.draft(w) for w in works]
        verdicts = eng.verify(works, drafts)
    assert [d.text for d in drafts] == [r.text for r in want] == [r.info["draft"] for r in want]
    assert drafts[1].text.startswith(prefix)
    assert all(v.accepted and v.passed_prefix == len(d.token_ids) > 0 for v, d in zip(verdicts, drafts))
    for v, r in zip(verdicts, want):
        assert list(v.token_probs) == r.info["verify_token_probs"]
        assert v.is_argmax is not None and v.is_argmax.tolist() == r.info["verify_is_argmax"]
    with pytest.raises(ValueError):
        eng.verify(works, drafts[:1])


def test_traced_engine_records_the_tokens_the_product_publishes(tiny):
    # The product engine carries no token ids; the traced test subclass adds them and changes nothing else.
    model, tokenizer = tiny
    options = GraniteOptions(decode_backend="loop", ctc_entropy_threshold=-1.0, verify_threshold=0.0,
                             repetition_guard=False)
    product = GraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny", options=options)
    traced = TracedGraniteEngine(model=model, tokenizer=tokenizer, model_label="tiny", options=options)
    requests = [req(tone(1.3, 520.0, 30), "final", 0),  # verified draft
                req(tone(1.0, 500.0, 3), "final", 1, task="translate", language="en", target_language="fr")]
    plain, recorded = product.transcribe_batch(requests), traced.transcribe_batch(requests)
    assert [r.info["path"] for r in recorded] == ["verify_accept", "autoregressive"]
    traced_keys = {"token_ids", "verify_token_probs", "verify_is_argmax"}
    for p, r in zip(plain, recorded):
        assert not traced_keys & p.info.keys()
        assert (p.text, p.words, p.confidence) == (r.text, r.words, r.confidence)
        assert p.info == {k: v for k, v in r.info.items() if k not in traced_keys}
    assert "verify_token_probs" in recorded[0].info and "token_ids" not in recorded[0].info
    assert recorded[1].text == tokenizer.decode(recorded[1].info["token_ids"], skip_special_tokens=True).strip()
