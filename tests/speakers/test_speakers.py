"""Speaker labels (issue #20): clustering, the GE2E encoder on real speech, the batching hook, the
session's ``speaker`` fields, captions, the Deepgram ``diarize`` option, and a two-speaker
conversation over a real socket."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from granite_stream_testing.datasets import read_audio
from stream_server.core import captions
from stream_server.inference.types import InferenceRequest
from stream_server.speakers.clustering import Attribution, OnlineClusterer, SpeakerSettings, SpeakerTracker, SpeakerTurn
from stream_server.speakers.encoder import HOP, SAMPLE_RATE, SpeakerEmbeddings, SpeakerEncoder, mel_spectrogram, normalize_volume, partial_slices
from stream_server.speakers.engine import SpeakerEmbeddingEngine
from tests.fakes import CountingEngine
from tests.core.test_session import Harness, new_session, start

RNG = np.random.default_rng(20)
DIM = 256


def unit(v):
    return v / np.linalg.norm(v)


def voice(seed: int) -> np.ndarray:
    """A synthetic speaker: a random direction (distinct seeds are nearly orthogonal in 256-d)."""
    return unit(np.random.default_rng(seed).standard_normal(DIM))


def sample(speaker: np.ndarray, noise: float = 0.25) -> np.ndarray:
    """One utterance of ``speaker``: its direction plus noise (cosine to it about 0.97 at 0.25)."""
    return unit(speaker + noise * RNG.standard_normal(DIM) / np.sqrt(DIM))


# ---- clustering on synthetic embeddings ---------------------------------------------------------


def test_one_voice_stays_one_speaker_and_new_voices_are_numbered_by_first_appearance():
    a, b, c = voice(1), voice(2), voice(3)
    clusterer = OnlineClusterer()
    labels = [clusterer.assign(sample(v), 3.0) for v in (b, b, a, b, c, a, c, b)]
    assert labels == [0, 0, 1, 0, 2, 1, 2, 0]
    assert clusterer.speakers == 3


def test_the_maximum_number_of_speakers_is_never_exceeded():
    clusterer = OnlineClusterer(replace(SpeakerSettings(), max_speakers=2))
    labels = [clusterer.assign(sample(voice(seed)), 3.0) for seed in (1, 2, 3, 4, 1, 2)]
    assert labels[:2] == [0, 1] and set(labels) == {0, 1}
    assert labels[4:] == [0, 1]  # the first two voices are still told apart


def test_short_audio_never_starts_a_new_speaker():
    a, b = voice(1), voice(2)
    clusterer = OnlineClusterer(replace(SpeakerSettings(), min_new_speaker_s=1.0))
    assert clusterer.assign(sample(a), 3.0) == 0
    assert clusterer.assign(sample(b), 0.4) == 0  # too short to found speaker 1
    assert clusterer.assign(sample(b), 2.0) == 1


def test_clusters_that_turn_out_to_be_one_voice_merge_into_the_older_label():
    # A voice heard first in two guises (e.g. far from, then near the microphone) splits in two;
    # utterances in between pull the centroids together; from then on the older label is used.
    base = voice(1)
    other = unit(base + 0.9 * voice(9))  # cosine 0.74 to base: below the new-speaker threshold
    settings = replace(SpeakerSettings(), threshold=0.84, merge_threshold=0.9)
    clusterer = OnlineClusterer(settings)
    assert clusterer.assign(base, 3.0) == 0
    assert clusterer.assign(other, 3.0) == 1
    middle = unit(base + other)
    labels = [clusterer.assign(middle, 3.0) for _ in range(6)]
    assert labels[-1] == 0 and clusterer.assign(other, 3.0) == 0
    assert clusterer.speakers == 2  # label 1 was published; it is retired, never reused
    assert clusterer.assign(voice(5), 3.0) == 2


def windows(vectors_per_window: list[np.ndarray], rate: float = 1.3) -> SpeakerEmbeddings:
    n = len(vectors_per_window)
    step = 1 / rate
    starts = np.arange(n) * step
    return SpeakerEmbeddings(np.stack(vectors_per_window), starts, starts + 1.6)


def test_a_change_of_speaker_inside_an_utterance_becomes_speaker_turns():
    a, b = voice(1), voice(2)
    tracker = SpeakerTracker()
    first = tracker.attribute(windows([sample(a) for _ in range(4)]), 10.0, 14.0)
    assert first.speaker == 0 and not first.changes
    # 5 windows of b then 4 of a: the cut falls between the windows (at ~5.9 s into the utterance).
    mixed = windows([sample(b) for _ in range(5)] + [sample(a) for _ in range(4)])
    result = tracker.attribute(mixed, 20.0, 27.5)
    assert result.changes and result.speaker == 1
    assert [t.speaker for t in result.turns] == [1, 0]
    assert result.turns[0].start == 20.0 and result.turns[-1].end == 27.5
    boundary = result.turns[0].end - 20.0
    assert abs(boundary - (4 / 1.3 + 1.6 + 5 / 1.3) / 2) < 1e-6
    # One window of another voice is not a turn (min_turn_windows = 2).
    blip = windows([sample(a)] * 3 + [sample(b)] + [sample(a)] * 3)
    assert not tracker.attribute(blip, 30.0, 35.0).changes


def test_a_change_of_speaker_at_a_pause_is_cut_there_with_one_window_a_side():
    # Two people with a pause shorter than the VAD's end of speech: one utterance, two pieces
    # (the encoder windows each on its own). One window a side is enough at a pause, and the turn
    # boundary is the middle of the pause.
    a, b = voice(1), voice(2)
    tracker = SpeakerTracker()
    tracker.attribute(windows([sample(a) for _ in range(4)]), 0.0, 4.0)
    starts = np.array([0.0, 2.4])
    joined = SpeakerEmbeddings(np.stack([sample(b), sample(a)]), starts, starts + 1.6, np.array([0, 1]),
                               ((2.0, 2.4),))
    result = tracker.attribute(joined, 10.0, 14.0)
    assert [t.speaker for t in result.turns] == [1, 0]
    assert result.turns[0].end == pytest.approx(12.2)
    # The same two windows without the pause between them stay one stretch (two windows a side).
    plain = SpeakerEmbeddings(np.stack([sample(b), sample(a)]), starts, starts + 1.6)
    assert not tracker.attribute(plain, 20.0, 24.0).changes


def test_the_encoder_windows_each_side_of_a_pause_on_its_own(librivox_clips, asterisk_en_dev):
    import soxr

    from stream_server.speakers.encoder import pause_pieces

    reader = read_audio(librivox_clips[0])[0][: 3 * SAMPLE_RATE]
    phone = soxr.resample(read_audio(asterisk_en_dev[0])[0], 8000, SAMPLE_RATE)[: 3 * SAMPLE_RATE]
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    joined = np.concatenate([reader, gap, phone]).astype(np.float32)
    pieces = pause_pieces(joined)
    # A pause covers the inserted 0.4 s of silence (it may be longer: the clips' own silent edges).
    assert any(b <= 3.05 * SAMPLE_RATE and a >= 3.35 * SAMPLE_RATE for (_, b), (a, _) in zip(pieces, pieces[1:]))
    # A pause shorter than PAUSE_S is no cut, nor is one that would leave a piece under MIN_PIECE_S.
    assert len(pause_pieces(np.concatenate([reader, gap[:1600], reader]))) == len(pause_pieces(reader))
    assert pause_pieces(np.concatenate([reader, gap, reader[:1600]])) == pause_pieces(np.concatenate([reader, gap, reader[:1600]]))[:1]
    [embedding] = SpeakerEncoder("cpu").embed([joined])
    assert embedding.pieces is not None and len(embedding.pauses) == len(pieces) - 1
    for k, (pause_start, pause_end) in enumerate(embedding.pauses):
        before, after = embedding.pieces <= k, embedding.pieces > k
        assert np.all(embedding.starts[after] >= pause_end) and np.all(embedding.starts[before] < pause_start)
    result = SpeakerTracker().attribute(embedding, 0.0, len(joined) / SAMPLE_RATE)
    assert [t.speaker for t in result.turns] == [0, 1]
    [middle] = [(a + b) / 2 for a, b in embedding.pauses if a <= 3.05 and b >= 3.35]
    assert result.turns[0].end == pytest.approx(middle)
    [whole] = SpeakerEncoder("cpu", split_pauses=False).embed([joined])
    assert whole.pieces is None


def test_words_take_the_speaker_of_the_turn_they_overlap_most():
    attribution = Attribution(1, (SpeakerTurn(1, 0.0, 3.0), SpeakerTurn(0, 3.0, 5.0)))
    words = [{"word": "a", "start": 0.1, "end": 0.5}, {"word": "b", "start": 2.8, "end": 3.6},
             {"word": "c", "start": 4.0, "end": 4.4}, {"word": "d", "start": 5.2, "end": 5.4}]
    assert [w["speaker"] for w in attribution.label_words(words)] == [1, 0, 0, 0]
    assert Attribution(3).speaker_at(0, 1) == 3  # no turns: the utterance's speaker


# ---- the encoder: Resemblyzer's network and features, on real speech ----------------------------


def test_encoder_reproduces_resemblyzer_on_real_speech(goforward):
    # tests/data/resemblyzer_goforward.npz was written by Resemblyzer 0.1.4 itself (VoiceEncoder,
    # librosa 0.11.0 mel) on this clip: tests/data/make_resemblyzer_reference.py.
    reference = np.load("tests/data/resemblyzer_goforward.npz")
    wav, rate = read_audio(goforward)
    assert rate == SAMPLE_RATE
    mel = mel_spectrogram(normalize_volume(wav))
    np.testing.assert_allclose(mel[:50], reference["mel"], rtol=1e-4, atol=1e-6 * reference["mel"].max())
    [embedding] = SpeakerEncoder("cpu", precision="float32").embed([wav])
    np.testing.assert_allclose(embedding.starts * SAMPLE_RATE, reference["starts"])
    np.testing.assert_allclose(embedding.partials, reference["partials"], atol=2e-5)
    assert float(embedding.utterance @ reference["utterance"]) > 0.99999


def test_bfloat16_keeps_resemblyzers_embeddings_on_real_speech(goforward):
    # The cheaper arithmetic (the default on CPUs that compute bfloat16 natively) stays next to
    # Resemblyzer's own float32 embeddings: every window, and the utterance.
    reference = np.load("tests/data/resemblyzer_goforward.npz")
    wav, _ = read_audio(goforward)
    encoder = SpeakerEncoder("cpu", precision="bfloat16")
    assert encoder.precision == "bfloat16"
    [embedding] = encoder.embed([wav])
    np.testing.assert_allclose(np.linalg.norm(embedding.partials, axis=1), 1.0, atol=1e-6)
    assert np.min(np.sum(embedding.partials * reference["partials"], axis=1)) > 0.99
    assert float(embedding.utterance @ reference["utterance"]) > 0.999


def test_the_encoder_chooses_bfloat16_only_where_the_cpu_computes_it():
    from stream_server.speakers.encoder import native_bfloat16

    assert SpeakerEncoder("cpu").precision == ("bfloat16" if native_bfloat16("cpu") else "float32")
    assert not native_bfloat16("cuda:0")  # a GPU keeps float32: the encoder is cheap there
    with pytest.raises(ValueError, match="precision"):
        SpeakerEncoder("cpu", precision="int8")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_same_speaker_is_closer_than_different_speakers_on_real_speech(librivox_clips, asterisk_en_dev, precision):
    # The LibriVox reader and the Asterisk English voice: every same-voice pair is closer than
    # every cross-voice pair, in either arithmetic the server may use.
    reader = [read_audio(c)[0] for c in librivox_clips]
    import soxr

    phone = [soxr.resample(read_audio(c)[0], 8000, SAMPLE_RATE) for c in asterisk_en_dev[:5]]
    encoder = SpeakerEncoder("cpu", precision=precision)
    r = np.stack([e.utterance for e in encoder.embed(reader)])
    p = np.stack([e.utterance for e in encoder.embed(phone)])
    same = np.concatenate([(r @ r.T)[np.triu_indices(5, 1)], (p @ p.T)[np.triu_indices(5, 1)]])
    cross = (r @ p.T).ravel()
    assert same.min() > cross.max(), (same.min(), cross.max())


def test_partial_windows_are_resemblyzers():
    assert partial_slices(int(2.8 * SAMPLE_RATE)) == [(0, 160), (77, 237), (154, 314)]
    assert partial_slices(8000) == [(0, 160)]  # shorter than a window: one, zero-padded
    assert all(b - a == 160 for a, b in partial_slices(20 * SAMPLE_RATE))
    assert HOP == 160


# ---- the batching hook ----------------------------------------------------------------------------


class DirectionEncoder:
    """Stands in for the GE2E encoder: a window's embedding is voice 1 if its audio's fundamental
    is below 220 Hz, else voice 2. Records each call's batch size."""

    def __init__(self):
        self.calls: list[int] = []

    def embed(self, wavs):
        self.calls.append(len(wavs))
        out = []
        for wav in wavs:
            spans = np.array(partial_slices(len(wav)), dtype=np.float64) * HOP / SAMPLE_RATE
            vectors = []
            for a, b in spans:
                piece = wav[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)]
                spectrum = np.abs(np.fft.rfft(piece, n=SAMPLE_RATE))
                f0 = int(np.argmax(spectrum[50:1000])) + 50
                vectors.append(voice(1) if f0 < 220 else voice(2))
            out.append(SpeakerEmbeddings(np.stack(vectors), spans[:, 0], spans[:, 1]))
        return out

    def close(self):
        pass


def request(kind, seconds=1.0, diarize=True, uid=0):
    return InferenceRequest("s", uid, kind, np.zeros(int(seconds * SAMPLE_RATE), np.float32), diarize=diarize)


def test_the_wrapper_embeds_the_diarized_finals_of_a_batch_in_one_call_and_nothing_else():
    encoder = DirectionEncoder()
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=lambda: encoder)
    assert engine.capabilities.diarization and not CountingEngine().capabilities.diarization
    batch = [request("final"), request("partial"), request("final", diarize=False), request("final", 2.0)]
    results = engine.transcribe_batch(batch)
    assert [r.text for r in results] == [r.text for r in CountingEngine().transcribe_batch(batch)]
    assert encoder.calls == [2]
    assert [r.speaker is not None for r in results] == [True, False, False, True]
    assert "partials" not in repr(results[0]) and "speaker" not in repr(results[0])  # never in logs
    engine.transcribe_batch([request("partial"), request("final", diarize=False)])
    assert encoder.calls == [2]  # nothing to embed: the encoder is not called


def test_an_early_result_is_embedded_before_it_is_handed_on():
    class Early(CountingEngine):
        def transcribe_batch(self, requests, on_result=None):
            results = super().transcribe_batch(requests)
            if on_result:
                on_result(0, results[0])
            return results

    seen = []
    engine = SpeakerEmbeddingEngine(Early(early_results=True), encoder_factory=DirectionEncoder)
    engine.transcribe_batch([request("final"), request("final")], on_result=lambda i, r: seen.append(r.speaker))
    assert seen and seen[0] is not None


def test_results_that_need_no_embedding_are_handed_on_before_the_encoder_runs():
    order = []

    class Recording(DirectionEncoder):
        def embed(self, wavs):
            order.append("encoder")
            return super().embed(wavs)

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=Recording)
    assert engine.capabilities.early_results  # so the worker passes on_result
    batch = [request("final"), request("partial"), request("final", diarize=False, uid=1)]
    results = engine.transcribe_batch(batch, on_result=lambda i, r: order.append(i))
    assert order == [1, 2, "encoder"]  # the diarized final is returned, with its embedding, after
    assert results[0].speaker is not None and results[2].speaker is None


def test_a_server_whose_sessions_never_diarize_never_loads_the_encoder():
    built = []
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=lambda: built.append(1) or DirectionEncoder())
    engine.warmup()
    engine.transcribe_batch([request("final", diarize=False), request("partial", diarize=False)])
    assert built == [] and engine.capabilities.diarization  # it can still label speakers when asked


def test_with_preload_the_encoder_loads_at_warmup_so_the_first_diarized_final_does_not_wait_for_it():
    built: list[DirectionEncoder] = []

    def factory():
        built.append(DirectionEncoder())
        return built[-1]

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=factory, preload=True)
    engine.warmup()
    assert len(built) == 1 and built[0].calls == [1]  # loaded, and its first call made
    engine.transcribe_batch([request("final")])
    assert len(built) == 1 and built[0].calls == [1, 1]
    assert engine.stats()["speaker_embeddings"] == 1  # the warm-up is not counted as a final


def test_the_encoder_loads_on_the_first_diarized_request_and_that_final_is_labelled():
    built = []
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=lambda: built.append(1) or DirectionEncoder())
    engine.warmup()
    engine.transcribe_batch([request("final", diarize=False), request("partial", diarize=False)])
    assert built == []
    [result] = engine.transcribe_batch([request("final")])
    assert built == [1] and result.speaker is not None  # loaded once, and the final waited for it
    engine.transcribe_batch([request("final")])
    assert built == [1]


def test_a_diarizing_partial_starts_the_load_without_waiting_for_it():
    # A session that says it diarizes on its partials lets the load overlap its first utterance.
    import threading

    release = threading.Event()

    def slow():
        release.wait(5)
        return DirectionEncoder()

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=slow)
    [partial] = engine.transcribe_batch([request("partial")])
    assert partial.text and partial.speaker is None and not release.is_set()  # answered during the load
    release.set()
    [final] = engine.transcribe_batch([request("final")])
    assert final.speaker is not None


def test_close_during_the_load_waits_for_it_and_closes_what_it_loaded():
    # A server shutting down while the first diarizing request's load is under way must not leave
    # an encoder (and its memory) behind, nor start another load afterwards.
    import threading

    release = threading.Event()
    built: list[DirectionEncoder] = []

    class Closable(DirectionEncoder):
        closed = False

        def close(self):
            self.closed = True

    def slow():
        release.wait(5)
        built.append(Closable())
        return built[-1]

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=slow)
    engine.transcribe_batch([request("partial")])  # starts the load on its own thread
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close waits for the load ...
    release.set()
    closer.join(5)
    assert not closer.is_alive() and len(built) == 1 and built[0].closed  # ... and closes what it loaded
    [final] = engine.transcribe_batch([request("final")])  # a straggler after close: no second load
    assert len(built) == 1 and final.speaker is None


def test_a_failure_to_load_at_warmup_leaves_transcription_working():
    def broken():
        raise RuntimeError("no weights")

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=broken, preload=True)
    engine.warmup()  # logged, not raised
    [result] = engine.transcribe_batch([request("final")])
    assert result.text and result.speaker is None


# ---- the session -----------------------------------------------------------------------------------


def _two_voices(session, h, f0s):
    from tests.vad.test_vad import voiced

    for f0 in f0s:
        h.feed(voiced(2.0, f0=f0))
        h.run(session.receive_text('{"type":"finalize"}'))
        h.feed(np.zeros(SAMPLE_RATE // 2, np.float32))


def test_diarize_labels_finals_in_order_of_first_appearance_even_when_answered_out_of_order():
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=DirectionEncoder)
    session = new_session(engine)
    h = Harness(session, engine, hold=True)
    h.run(start(session, partials=False, diarize=True))
    _two_voices(session, h, [300, 150, 300, 150])
    h.held.reverse()  # the last utterance is answered first
    h.release()
    finals = h.of("final")
    assert [f["utterance_id"] for f in finals] == [0, 1, 2, 3]
    assert [f["speaker"] for f in finals] == [0, 1, 0, 1]
    assert all("speaker_turns" not in f for f in finals)


def test_diarize_off_changes_nothing():
    def events(engine, **fields):
        session = new_session(engine)
        h = Harness(session, engine)
        h.run(start(session, **fields))
        _two_voices(session, h, [300, 150])
        h.run(session.receive_text('{"type":"stop"}'))
        return h.events, [r for b in engine.batches for r in b] if hasattr(engine, "batches") else None

    plain = CountingEngine()
    encoder = DirectionEncoder()
    wrapped = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=lambda: encoder)
    base, _ = events(plain)
    with_wrapper, _ = events(wrapped)
    ready_plain, ready_wrapped = base[0], with_wrapper[0]
    assert ready_wrapped["engine"].pop("diarization") is True and ready_plain["engine"].pop("diarization") is False
    assert ready_plain["config"]["diarize"] is False
    assert base == with_wrapper
    assert encoder.calls == []
    assert not any(r.diarize for r in wrapped.inner.batches[0])


def test_diarize_needs_an_engine_that_can_label_speakers():
    session = new_session(CountingEngine())
    [action] = start(session, diarize=True)
    assert action.event.to_wire()["code"] == "bad_config" and "speakers" in action.event.to_wire()["message"]
    session = new_session(CountingEngine())
    [action] = start(session, diarize="yes")
    assert action.event.to_wire()["code"] == "bad_config"


def test_configure_turns_diarize_on_from_the_next_utterance():
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=DirectionEncoder)
    session = new_session(engine)
    h = Harness(session, engine)
    h.run(start(session, partials=False))
    _two_voices(session, h, [300])
    h.run(session.receive_text('{"type":"configure","diarize":true}'))
    assert h.of("configured")[0]["config"]["diarize"] is True
    _two_voices(session, h, [150, 300])
    assert [f.get("speaker") for f in h.of("final")] == [None, 0, 1]


# ---- captions and the Deepgram API -----------------------------------------------------------------


def test_captions_name_the_speaker():
    finals = [{"start": 0.0, "end": 1.5, "text": " Hello. ", "speaker": 0},
              {"start": 2.0, "end": 3.0, "text": "Hi there.", "speaker": 1},
              {"start": 3.0, "end": 4.0, "text": "No label."}]
    assert captions.to_text(finals) == "Speaker 1: Hello.\nSpeaker 2: Hi there.\nNo label.\n"
    assert "00:00:00,000 --> 00:00:01,500\nSpeaker 1: Hello.\n" in captions.to_srt(finals)
    vtt = captions.to_vtt(finals)
    assert "00:00:02.000 --> 00:00:03.000\n<v Speaker 2>Hi there.\n" in vtt
    assert "00:00:03.000 --> 00:00:04.000\nNo label.\n" in vtt


def test_deepgram_diarize_puts_speakers_on_the_words():
    from tests.adapters.test_adapters import deepgram_harness, dg_validate, pcm16, quiet
    from tests.vad.test_vad import voiced

    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=DirectionEncoder)
    h = deepgram_harness("encoding=linear16&sample_rate=16000&diarize=true", engine=engine)
    assert [m for m in h.replies if m["type"] == "Error"] == []
    assert h.native_log[0][1]["diarize"] is True
    for f0 in (300, 150):
        h.binary(pcm16(np.concatenate([quiet(0.3), voiced(2.0, f0=f0), quiet(1.0)])))
    results = [m for m in h.replies if m["type"] == "Results" and m["is_final"]]
    assert len(results) == 2
    for message in results:
        dg_validate(message)
    speakers = [{w["speaker"] for w in m["channel"]["alternatives"][0]["words"]} for m in results]
    assert speakers == [{0}, {1}]


def test_deepgram_words_carry_the_speakers_of_the_typed_final():
    # The adapter translates the native event: a timed word keeps the speaker the session gave it
    # (even where the turns alone would say otherwise); an untimed final's words take its turns'.
    from stream_server.core.events import Final, FinalWord
    from tests.adapters.test_adapters import deepgram_harness

    translator = deepgram_harness("encoding=linear16&sample_rate=16000&diarize=true").t
    turns = (SpeakerTurn(0, 0.0, 1.0), SpeakerTurn(1, 1.0, 2.0))
    timed = Final(0, "a b", 0.0, 2.0, "en", "transcribe", speaker=0, speaker_turns=turns,
                  words=(FinalWord("a", 0.0, 0.9, 0.9, speaker=1), FinalWord("b", 1.1, 2.0, 0.9, speaker=0)))
    untimed = Final(1, "one two", 0.0, 2.0, "en", "transcribe", speaker=0, speaker_turns=turns)
    for event, expected in ((timed, [1, 0]), (untimed, [0, 1])):
        [reply] = [out for out in translator.native_event("0", event) if getattr(out, "message", None)]
        assert [w["speaker"] for w in reply.message["channel"]["alternatives"][0]["words"]] == expected


# ---- over a real socket: two real voices ------------------------------------------------------------


@pytest.mark.slow
async def test_two_speakers_over_a_real_socket_get_two_stable_labels(librivox_clips, asterisk_en_dev):
    import soxr

    from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer
    from tests.server.test_server import stream_clip

    reader = [read_audio(c)[0] for c in librivox_clips[:3]]
    phone = [soxr.resample(read_audio(c)[0], 8000, SAMPLE_RATE) for c in asterisk_en_dev
             if 2.0 <= read_audio(c)[0].size / 8000 <= 6.0][:3]
    gap = np.zeros(int(1.2 * SAMPLE_RATE), np.float32)
    turns = [reader[0], phone[0], reader[1], phone[1], reader[2], phone[2]]
    audio = np.concatenate([piece for t in turns for piece in (t, gap)])
    engine = SpeakerEmbeddingEngine(CountingEngine())  # the real GE2E encoder
    async with StreamServer(engine, ServerSettings(network=NetworkSettings(port=0))) as server:
        events = await stream_clip(server.url, audio, SAMPLE_RATE, pace=3.0, partials=False, diarize=True)
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 6, [(f["start"], f["end"]) for f in finals]
    assert [f["speaker"] for f in finals] == [0, 1, 0, 1, 0, 1]
    assert engine.embedded >= 6  # (and an early final that speech resumed over, when one ran)
    assert max(len(json.dumps(f)) for f in finals) < 1000  # no embedding (256 floats) reaches the client


def test_serve_refuses_speaker_settings_out_of_range():
    from stream_server.settings import ConfigError, load_config

    for name, bad in (("diarize_threshold", "1.5"), ("diarize_change_threshold", "-2"), ("diarize_max_speakers", "0")):
        with pytest.raises(ConfigError, match=name):
            load_config({name: bad}, {})


def test_the_wrapper_passes_engine_options_through():
    class Options(CountingEngine):
        def warmup(self, graph_seconds=12.0):
            self.warmed = graph_seconds

        def stats(self):
            return {"ctc_accept": 3}

    inner = Options()
    engine = SpeakerEmbeddingEngine(inner, encoder_factory=DirectionEncoder)
    engine.warmup(graph_seconds=5.0)
    assert inner.warmed == 5.0
    assert not hasattr(engine, "delay") and engine.inner.delay == inner.delay  # no implicit forwarding
    engine.transcribe_batch([request("final")])
    assert engine.stats()["ctc_accept"] == 3 and engine.stats()["speaker_embeddings"] == 1


@pytest.mark.slow
def test_transcribe_diarize_writes_captions_with_two_speakers(librivox_clips, asterisk_en_dev, tmp_path):
    # A file of two real voices (the LibriVox reader, the Asterisk English voice) taking turns.
    import subprocess
    import sys
    import wave

    import soxr

    reader = [read_audio(c)[0] for c in librivox_clips[:2]]
    phone = [soxr.resample(read_audio(c)[0], 8000, SAMPLE_RATE) for c in asterisk_en_dev
             if 2.0 <= read_audio(c)[0].size / 8000 <= 6.0][:2]
    gap = np.zeros(int(1.2 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([p for t in (reader[0], phone[0], reader[1], phone[1]) for p in (t, gap)])
    path = tmp_path / "meeting.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    result = subprocess.run([sys.executable, "-m", "stream_server.cli", "transcribe", str(path), "--engine", "whisper",
                             "--cpu-threads", "2", "--diarize", "--formats", "vtt,txt"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    vtt = (tmp_path / "meeting.vtt").read_text()
    cues = re.findall(r"^<v (Speaker \d+)>", vtt, re.M)  # a long final may span several cues
    voices = [v for i, v in enumerate(cues) if i == 0 or cues[i - 1] != v]
    assert voices == ["Speaker 1", "Speaker 2", "Speaker 1", "Speaker 2"], vtt
    txt = (tmp_path / "meeting.txt").read_text().splitlines()
    said = [line.split(":")[0] for line in txt]
    assert [v for i, v in enumerate(said) if i == 0 or said[i - 1] != v] == voices, txt
    assert "Speaker 2: " in result.stdout


@pytest.mark.slow
async def test_the_demo_colours_each_speaker(tmp_path):
    from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer
    from tests.vad.test_vad import voiced
    from tests.web_demo.test_web_demo import ARTIFACTS, open_page, playwright_or_fail, write_wav

    async_playwright = playwright_or_fail()
    wav = tmp_path / "two-voices.wav"
    quiet = np.zeros(SAMPLE_RATE, np.float32)
    write_wav(wav, np.concatenate([quiet, voiced(2.0, f0=300), quiet, voiced(2.0, f0=150), quiet]), SAMPLE_RATE)
    engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=DirectionEncoder)
    settings = ServerSettings(network=NetworkSettings(port=0))
    async with StreamServer(engine, settings) as server, async_playwright() as pw:
        demo = await open_page(pw, tmp_path / "profile", f"http://127.0.0.1:{server.port}/", wav)
        page = demo.page
        try:
            assert await page.is_enabled("#diarize")
            await page.check("#diarize")
            await page.click("#toggle")

            async def two_speakers():
                badges = await page.locator("#finals li.final .speaker").all_inner_texts()
                return badges if {"Speaker 1", "Speaker 2"} <= set(badges) else None

            badges = await demo.wait_for(two_speakers, 40, "finals of two speakers")
            assert badges[:2] == ["Speaker 1", "Speaker 2"]
            assert demo.sent_text[0]["diarize"] is True
            colours = await page.eval_on_selector_all(
                "#finals li.final .speaker", "els => els.map(e => getComputedStyle(e).backgroundColor)")
            assert colours[0] != colours[1]
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "web-demo-speakers.png"))
            assert not demo.errors, demo.errors
        finally:
            await demo.context.close()


def test_the_wrapper_computes_where_its_engine_does(whisper_engine):
    """The speaker encoder is placed on the inner engine's device, and the worker's thread hook
    reaches the inner engine (no attribute probing)."""
    from stream_server.speakers.engine import SpeakerEmbeddingEngine
    from tests.fakes import CountingEngine

    assert whisper_engine.placement() == "cpu"
    bound = []

    class Placed(CountingEngine):
        def placement(self):
            return "cuda:1"

        def bind_thread(self):
            bound.append(True)

    wrapped = SpeakerEmbeddingEngine(Placed(), encoder_factory=lambda: None)
    assert wrapped.placement() == "cuda:1" and wrapped.model_path is None
    assert SpeakerEmbeddingEngine(whisper_engine).model_path == whisper_engine.model_path  # the benchmarks read it
    wrapped.bind_thread()
    assert bound == [True]


def test_a_diarize_session_marks_its_partials_so_the_encoder_loads_before_its_first_final():
    """The encoder loads on demand; a diarize session's partials ask for speakers too, so the load
    overlaps the first utterance instead of delaying its final (the wrapper embeds finals only)."""
    from tests.vad.test_vad import voiced

    def requests(**fields):
        engine = SpeakerEmbeddingEngine(CountingEngine(), encoder_factory=DirectionEncoder)
        session = new_session(engine)
        h = Harness(session, engine, hold=True)
        h.run(start(session, **fields))
        h.feed(voiced(2.0, f0=200))
        return h.held

    marked = requests(diarize=True)
    assert marked and all(r.kind == "partial" and r.diarize for r in marked)
    assert not any(r.diarize for r in requests(diarize=False))
