"""Dropped-word attribution (benchmarks.scoring.attribute_drops): each word of the offline decode that
the streaming finals lack is charged to one cause, from what the client saw and the free decode."""

from benchmarks.scoring import DROP_CAUSES, UtteranceTrace, attribute_drops, stable_ledger


def trace(uid, final, stable="", free=None, start=0.0, end=1.0, **flags):
    t = UtteranceTrace(uid, start, end, final, stable, **flags)
    t.free = final if free is None else free
    return t


def causes(offline, *traces):
    out = attribute_drops(offline, list(traces))
    assert out["dropped"] == sum(out["by_cause"].values()) and set(out["by_cause"]) == set(DROP_CAUSES)
    return {c: n for c, n in out["by_cause"].items() if n}


def test_a_wrong_stable_word_is_the_stabilizer_s():
    # The free decode heard "to lock"; the partials had made "Do like" stable.
    assert causes("to lock or unlock the conference",
                  trace(0, "Do like or unlock the conference", stable="Do like or",
                        free="To lock or unlock the conference")) == {"stable": 2}


def test_words_lost_after_the_stable_prefix_are_the_splice_s():
    # The old splice jumped to the last "the" of the free decode and lost what came between.
    assert causes("here are the more words the end",
                  trace(0, "here are the end", stable="here are the",
                        free="here are the more words the end")) == {"splice": 3}


def test_segmentation_causes_come_from_the_free_decode():
    offline = "please press eight for more options and dial four to send this caller"
    first = trace(0, "please press eight for more options and", start=0.0, end=20.0, cut_after=True)
    second = trace(1, "Dau 4 to send this caller", start=20.0, end=24.0, cut_before=True)
    assert causes(offline, first, second) == {"cut": 1}  # "dial" -> "Dau" right after the cut ("4" is "four")
    assert causes("press four to mark this message as urgent",
                  trace(0, "Press 4 to mark this message as")) == {"boundary": 1}
    assert causes("the estimated hold time is currently",
                  trace(0, "The estimated whole time is currently.")) == {"decode": 1}
    assert causes("the estimated hold time is currently",
                  trace(0, "The estimated whole time is currently.", loop_guard=True)) == {"loop_guard": 1}


def test_nothing_dropped_when_the_finals_say_it_all():
    out = attribute_drops("Go forward ten meters.", [trace(0, "go forward 10 meters", stable="go forward")])
    assert out["dropped"] == 0 and out["offline_words"] == 4


def test_a_dropped_word_the_offline_decode_misheard_is_marked_not_right():
    # Stable "star" is what the speaker said; the offline decode's "start" was the mishearing.
    final = trace(0, "Press star to toggle pause", stable="Press star to toggle", free="Press start to toggle pause")
    misheard = attribute_drops("press start to toggle pause", [final], truth="press * to toggle pause")
    assert misheard["by_cause"]["stable"] == 1 and misheard["right_by_cause"]["stable"] == 0
    assert misheard["examples"] == [{"word": "start", "cause": "stable", "context": "press start to toggle pause",
                                     "offline_right": False}]
    # The same streaming final against a reference that says "start": a word the speaker said, lost.
    lost = attribute_drops("press start to toggle pause", [final], truth="Press start to toggle pause.")
    assert lost["right_by_cause"]["stable"] == 1
    assert "right_by_cause" not in attribute_drops("press start to toggle pause", [final])


def test_the_stable_ledger_counts_words_the_stable_words_saved_and_lost():
    # Both sides of the promise, from the asterisk-en dev replays (tiny.en): the stable words kept
    # "to switch" where the final's own decode said "does which" ...
    saved = trace(0, "Press 1 to switch to record mode.", stable="Press 1 to switch to",
                  free="Press 1 does which to record mode.")
    assert stable_ledger("press 1 to switch to record mode", [saved]) == {"saved": 2, "lost": 0}
    # ... and kept "read" where the whole utterance says "reach".
    lost = trace(0, "If you wish this caller to read you directly now", stable="If you wish this caller to read",
                 free="If you wish this caller to reach you directly now")
    assert stable_ledger("if you wish this caller to reach you directly now", [lost]) == {"saved": 0, "lost": 1}
    # Words after the stable prefix, and words both decodes share, are not the stable words' doing.
    after = trace(0, "Press 1 to switch to record mode.", stable="Press 1", free="Press 1 does which to record mode.")
    assert stable_ledger("press 1 to switch to record mode", [after]) == {"saved": 0, "lost": 0}
    # attribute_drops carries it when it knows the reference; the lost word is also its stable drop.
    drops = attribute_drops("if you wish this caller to reach you directly now", [lost],
                            truth="If you wish this caller to reach you directly now.")
    assert drops["stable_ledger"] == {"saved": 0, "lost": 1} and drops["right_by_cause"]["stable"] == 1
