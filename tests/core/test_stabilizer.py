"""The stabilizer's contract on real Whisper hypotheses and on arbitrary ones: stable words are never
revised, and reconciling a final with them loses no word they do not stand for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_server.core.stabilizer import PartialStabilizer, extends, reconcile

WORDS = st.lists(st.sampled_from(["go", "Go,", "forward", "ten", "10", "meters", "meters.", "the", "a", "to", "do"]),
                 max_size=8)


@settings(max_examples=300, deadline=None)
@given(stable=WORDS, final=WORDS)
def test_a_final_keeps_the_stable_words_and_everything_after_what_they_stand_for(stable, final):
    stab = PartialStabilizer()
    stab.stable_words = list(stable)
    published = stab.finish(" ".join(final))
    text = published.split()
    j = reconcile(stable, final)
    if stable and j and final[j - 1] == stable[-1] + ".":
        # The last stable word as the final punctuates it ("meters" + "meters." is "meters.").
        assert text == stable[:-1] + [final[j - 1]] + final[j:]
    else:
        assert text == stable + final[j:]
    assert extends(" ".join(stable), published) and published.startswith(" ".join(stable))
    if stab.agrees(" ".join(final)):  # nothing to reconcile: the final is published as decoded
        assert [w.strip(",.").lower() for w in text] == [w.strip(",.").lower() for w in final]
    # No better choice was passed over: every other split differs from the final by more edits,
    # or by as many while leaving out at least as many of its words.
    assert j <= len(final)


# Whisper tiny.en partials (every 0.5 s, 10 s window) at the start of a stress-en chain
# (asterisk-en confbridge prompts joined by short pauses), and the final's free decode.
EARLY_GUESSES = [
    (0.5, "Do"), (1.0, "Do log."), (1.5, "Do like or unlock."), (2.0, "Do lock or unlock the company."),
    (2.5, "Do lock or unlock the conference."), (3.0, "Do lock or unlock the conference when you"),
    (3.5, "to lock or unlock the conference when a conference"),
    (4.0, "to lock or unlock the conference when a conference is locked."),
    (4.5, "to lock or unlock the conference when a conference is locked"),
    (5.0, "to lock or unlock the conference when a conference is locked only come"),
    (5.5, "to lock or unlock the conference when a conference is locked only conference at night."),
    (6.0, "to lock or unlock the conference when a conference is locked only conference administrator"),
]
EARLY_FINAL = "To lock or unlock the conference, when a conference is locked, only conference administrators can join."


def test_an_early_guess_held_for_seconds_is_not_locked_in():
    """Three partials agreed on "Do" within 1.5 s of audio; stable words need agreement over more
    audio than that, so the final's "To lock" is published rather than "Do like"."""
    stab = PartialStabilizer(min_span_s=1.5)  # even over 1.5 s of agreement (3 s by default)
    published = []
    for audio_s, text in EARLY_GUESSES:
        _, stable = stab.update(text, audio_s)
        published.append(stable)
    assert all(not s.startswith("Do") for s in published)
    assert published[-1].startswith("to lock or unlock the conference")
    final = stab.finish(EARLY_FINAL)
    assert final.startswith(published[-1]) and final.endswith("only conference administrators can join.")


def test_agreement_must_span_audio_when_hypotheses_come_fast():
    """With partials every 0.5 s, three agreeing hypotheses span 1 s; more must agree until they
    span min_span_s, and none counts before min_audio_s."""
    stab = PartialStabilizer(agreement=3, min_audio_s=1.0, min_span_s=1.5)
    assert stab.update("a b c", 0.5)[1] == ""  # too little audio to count
    for audio_s in (1.0, 1.5, 2.0):
        assert stab.update("a b c d", audio_s)[1] == ""  # three agree, over only 1 s
    assert stab.update("a b c d", 2.5)[1] == "a b c"  # four, spanning 1.5 s
    slow = PartialStabilizer(agreement=3, min_audio_s=1.0, min_span_s=1.5)
    for audio_s in (1.0, 2.0, 3.0):  # under load partials come slower: three already span 2 s
        _, stable = slow.update("a b c d", audio_s)
    assert stable == "a b c"


def test_a_piece_after_a_cut_drops_only_the_words_that_echo_the_end_of_the_piece_before():
    from stream_server.core.stabilizer import drop_repeated_lead

    before = "to decrease your speaking volume to other participants to increase the"
    assert drop_repeated_lead(before, "To increase the audio volume from other participants.") == \
        "audio volume from other participants."
    assert drop_repeated_lead(before, "The audio volume") == "audio volume"  # one word echoed
    assert drop_repeated_lead(before, "audio volume from others") == "audio volume from others"
    assert drop_repeated_lead("", "to increase the") == "to increase the"
    assert drop_repeated_lead(before, "increase volume") == "increase volume"  # not the end of before


# Whisper tiny.en partials (every 0.5 s, 10 s window) over the start of the LibriVox reading in
# stress-en, by seconds of the utterance's audio: the first word, "And", is heard only from about 4 s.
LATE_FIRST_WORD = [
    (0.9, "And this is the end of the video."), (1.4, "And Mr. John."), (1.9, "Mr. John Dashwood"),
    (2.4, "Mr. John Dashwood had that"), (2.9, "Mr. John Dashwood had then"),
    (3.4, "Mr. John Dashwood had then leisure to"), (3.9, "Mr. John Dashwood had then leisure to consider"),
    (4.5, "And Mr. John Dashwood had then leisure to consider how"),
    (5.0, "And Mr. John Dashwood had then leisure to consider how much their"),
    (5.5, "And Mr. John Dashwood had then leisure to consider how much there might be proof."),
    (6.0, "And Mr. John Dashwood had then leisure to consider how much there might be prudently in it."),
    (6.5, "And Mr. John Dashwood had then leisure to consider how much there might be prudently in his power to"),
]


def test_words_become_stable_only_over_seconds_of_agreement():
    """Over 2-4 s the partials agree on "Mr. John Dashwood" and leave out the "And" that every longer
    one has; over 1.5 s of agreement "Mr." became stable and the final lost the "And". Over 3 s (the
    default) the short hypotheses disagree with the longer ones: nothing is stable, the final keeps it."""
    def published(**options) -> tuple[str, str]:
        stab = PartialStabilizer(**options)
        stable = ""
        for audio_s, text in LATE_FIRST_WORD:
            _, now = stab.update(text, audio_s)
            assert now.startswith(stable)  # never revised
            stable = now
        return stable, stab.finish("And Mr. John Dashwood had then leisure to consider how much there might be "
                                   "prudently in his power to do for them.")

    stable, final = published(min_span_s=1.5)
    assert stable.startswith("Mr. John") and final.startswith("Mr. John")  # the word is lost
    stable, final = published()
    assert stable == ""  # no hypothesis pair over 3 s agrees on the lead before the final
    assert final.startswith("And Mr. John Dashwood had then leisure to consider how much")


def test_the_final_keeps_the_punctuation_it_puts_after_the_last_stable_word():
    """Partials of a sentence still running on agreed on "dial 3" (no period yet); the final hears
    the sentence end and says "dial 3. To send". Published: "dial 3. To send", not "dial 3 To send":
    adding punctuation to the last stable word extends the stable text as a string."""
    stab = PartialStabilizer()
    for audio_s in (2.0, 3.0, 4.0, 5.0):
        _, stable = stab.update("If you wish to send this caller to voicemail, dial 3 to", audio_s)
    assert stable == "If you wish to send this caller to voicemail, dial 3"
    final = stab.finish("If you wish to send this caller to voicemail, dial 3. To send this caller to the torture menus.")
    assert final == "If you wish to send this caller to voicemail, dial 3. To send this caller to the torture menus."
    assert final.startswith(stable) and extends(stable, final)
    # A partial that says it with the period makes it stable so, and none takes it back.
    stab = PartialStabilizer(min_span_s=0.0, min_audio_s=0.0)
    for text in ("dial 3 to", "dial 3 to", "dial 3 to"):
        _, stable = stab.update(text)
    assert stable == "dial 3"
    text, stable = stab.update("dial 3. To send")
    assert (text, stable) == ("dial 3. To send", "dial 3. To")  # "to" had agreed too
    text, stable = stab.update("dial 3 to send this")
    assert text.startswith("dial 3.") and stable.startswith("dial 3.")
    # Only trailing punctuation: a word the final hears differently stays as published.
    assert stab.finish("dial 30. To send") == "dial 3. To send"


def test_extends_is_the_stable_text_guarantee():
    assert extends("", "anything") and extends("dial 3", "dial 3") and extends("dial 3", "dial 3. To send")
    assert extends("Please press", "Please press, then")
    assert not extends("dial 3", "dial 30 To send")  # a string prefix, but the word changed
    assert not extends("dial 3", "dial")
    assert not extends("dial, 3", "dial 3")  # only the last word may change, and only by gaining
    assert not extends("dial 3.", "dial 3")
    assert not extends("to lock", "Do lock")
