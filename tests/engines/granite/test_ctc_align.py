"""CTC forced alignment on synthetic posteriors with known answers (stream_server.engines.ctc_align)."""

import itertools
import threading
import time

import numpy as np
import pytest

from stream_server.engines.granite import ctc_align
from stream_server.engines.granite.ctc_align import (
    align_words,
    align_words_many,
    align_words_soon,
    best_path,
    forced_align,
)


def posteriors(frames: list[int], classes: int, peak: float = 0.9) -> np.ndarray:
    """Log posteriors whose argmax at frame t is ``frames[t]`` (probability ``peak``)."""
    p = np.full((len(frames), classes), (1 - peak) / (classes - 1))
    p[np.arange(len(frames)), frames] = peak
    return np.log(p)


def collapse(labels, blank=0):
    out = []
    previous = None
    for label in labels:
        if label != previous and label != blank:
            out.append(label)
        previous = label
    return out


def test_spans_follow_the_peaks():
    # blank blank a a blank b b b blank blank
    spans = forced_align(posteriors([0, 0, 1, 1, 0, 2, 2, 2, 0, 0], 3), [1, 2])
    assert [(s.start, s.end) for s in spans] == [(2, 4), (5, 8)]
    assert all(s.probability == pytest.approx(0.9) for s in spans)


def test_a_repeated_label_needs_a_blank_between():
    spans = forced_align(posteriors([1, 1, 0, 1, 0], 3), [1, 1])
    assert [(s.start, s.end) for s in spans] == [(0, 2), (3, 4)]
    assert forced_align(posteriors([1, 1], 3), [1, 1]) is None  # no room for the blank
    assert forced_align(posteriors([1], 3), [1, 2]) is None  # more labels than frames


def test_forced_labels_against_the_peaks_still_get_every_frame_right():
    # The audio "says" a-b, we force a-c: c must take b's frames, a keeps its own.
    spans = forced_align(posteriors([0, 1, 1, 0, 2, 2, 0], 4), [1, 3])
    assert [(s.start, s.end) for s in spans][0] == (1, 3)
    assert spans[1].probability < 0.1


@pytest.mark.parametrize("seed", range(20))
def test_viterbi_finds_the_best_path_that_a_brute_force_finds(seed):
    rng = np.random.default_rng(seed)
    frames, classes = 6, 3
    log_probs = np.log(rng.dirichlet(np.ones(classes), size=frames))
    targets = [int(x) for x in rng.integers(1, classes, size=int(rng.integers(1, 4)))]
    best = -np.inf
    for labels in itertools.product(range(classes), repeat=frames):
        if collapse(labels) == targets:
            best = max(best, float(sum(log_probs[t, c] for t, c in enumerate(labels))))
    found = best_path(log_probs, targets)
    if best == -np.inf:
        assert found is None
        return
    path, score = found
    assert score == pytest.approx(best)
    extended = [0] + [x for t in targets for x in (t, 0)]
    assert collapse([extended[s] for s in path]) == targets


def test_words_get_the_times_of_their_characters_and_unknown_characters_follow_their_word():
    # Classes: 0 blank, 1 ' ', 2 'h', 3 'i', 4 'y', 5 'o'. "hi, yo" over 12 frames at 20 ms a frame.
    frames = [0, 2, 2, 3, 0, 1, 0, 4, 4, 5, 0, 0]
    vocab = {" ": 1, "h": 2, "i": 3, "y": 4, "o": 5}
    words = align_words("Hi, yo", posteriors(frames, 6), lambda c: vocab.get(c.lower()), frame_s=0.02)
    assert [(w.word, w.start, w.end) for w in words] == [("Hi,", 0.02, 0.08), ("yo", 0.14, 0.2)]
    assert all(w.confidence == pytest.approx(0.9) for w in words)


def test_words_that_cannot_be_placed_give_no_timing():
    vocab = {"a": 1}
    assert align_words("?? a", posteriors([0, 1, 0], 2), vocab.get, 0.02) is None  # "??" has no CTC class
    assert align_words("a a a", posteriors([1, 0], 2), vocab.get, 0.02) is None  # too few frames
    assert align_words("", posteriors([0], 2), vocab.get, 0.02) == ()


@pytest.mark.parametrize("seed", range(10))
def test_the_greedy_shortcut_agrees_with_viterbi(seed):
    """When the argmax path already emits the targets, the shortcut's path and score are Viterbi's."""
    rng = np.random.default_rng(100 + seed)
    frames = [int(x) for x in rng.integers(0, 4, size=12)]
    log_probs = posteriors(frames, 4, peak=0.6) + rng.normal(0, 0.01, size=(12, 4))
    targets = collapse(list(np.argmax(log_probs, axis=1)))
    if not targets:
        return
    shortcut = best_path(log_probs, targets)
    path, score = best_path(log_probs, targets, greedy_first=False)
    assert score == pytest.approx(shortcut[1]) and list(path) == list(shortcut[0])


def reference_best_path(log_probs, targets, blank=0):
    """The contract of ``best_path`` written plainly (Python floats, one cell at a time): the best
    score over predecessors stay / step from s-1 / jump from s-2 (into a label unlike the one two
    states back), ties to the earlier of those three; the path ends on the final blank unless the
    last label scores strictly higher."""
    extended = [blank] + [x for t in targets for x in (t, blank)]
    states, frames = len(extended), len(log_probs)
    score = [[-np.inf] * states for _ in range(frames)]
    move = [[0] * states for _ in range(frames)]
    for s in range(min(2, states)):
        score[0][s] = float(log_probs[0][extended[s]])
    for t in range(1, frames):
        for s in range(states):
            candidates = [score[t - 1][s]]
            candidates.append(score[t - 1][s - 1] if s >= 1 else -np.inf)
            jump = s >= 3 and s % 2 == 1 and extended[s] != extended[s - 2]
            candidates.append(score[t - 1][s - 2] if jump else -np.inf)
            best = max(candidates)
            move[t][s] = candidates.index(best)  # the first of equal candidates
            score[t][s] = best + float(log_probs[t][extended[s]])
    last = states - 1 if states == 1 or score[-1][-1] >= score[-1][-2] else states - 2
    if score[-1][last] == -np.inf:
        return None
    path = [0] * frames
    state = last
    for t in range(frames - 1, -1, -1):
        path[t] = state
        state -= move[t][state]
    return path, score[-1][last]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(40))
def test_viterbi_equals_the_plain_reference_path_for_path_ties_included(seed, dtype):
    """Same path and score as the reference, frame for frame. Posteriors are quantized to a few
    values so that equal-scoring predecessors are common and the tie order is exercised."""
    rng = np.random.default_rng(1000 + seed)
    frames, classes = int(rng.integers(1, 40)), int(rng.integers(2, 6))
    log_probs = np.log(rng.dirichlet(np.ones(classes), size=frames))
    if seed % 2:
        log_probs = np.round(log_probs * 2) / 2
    log_probs = log_probs.astype(dtype)
    targets = [int(x) for x in rng.integers(1, classes, size=int(rng.integers(1, 12)))]
    expected = reference_best_path(log_probs, targets)
    found = best_path(log_probs, targets, greedy_first=False)
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert list(found[0]) == expected[0]
    assert found[1] == expected[1]
    shortcut = best_path(log_probs, targets)  # greedy first: a path as good when it applies
    assert shortcut is not None and shortcut[1] == pytest.approx(expected[1])


@pytest.mark.parametrize("threaded", [False, True])
def test_a_batch_of_finals_gets_each_final_its_own_words_in_order(threaded, monkeypatch):
    """align_words_many answers as align_words does for each final, on threads or not."""
    if threaded:
        monkeypatch.setattr(ctc_align, "THREADED_CELLS", 0)
    vocab = {" ": 1, "h": 2, "i": 3, "y": 4, "o": 5}
    rng = np.random.default_rng(7)
    finals = []
    for n in range(6):
        frames = [0, 2, 2, 3, 0, 1, 0, 4, 4, 5, 0, 0] * (n + 1)
        log_probs = posteriors(frames, 6) + rng.normal(0, 0.3, size=(len(frames), 6))
        finals.append((" ".join(["hi", "yo"] * (n + 1)), log_probs))
    finals.append(("??", posteriors([0, 1], 6)))  # no word can be placed
    expected = [align_words(text, log_probs, vocab.get, 0.02) for text, log_probs in finals]
    assert expected[-1] is None and len(expected[-2]) == 12
    threads = ctc_align.AlignerThreads()
    try:
        assert align_words_many(finals, vocab.get, 0.02, threads=threads) == expected
    finally:
        threads.close()


def test_a_final_aligned_soon_waits_for_its_posteriors_and_gets_the_same_words():
    """align_words_soon calls ``ready`` on its thread before reading the posteriors (the engine's
    copy to the host may still be running), then answers as align_words does."""
    vocab = {" ": 1, "h": 2, "i": 3, "y": 4, "o": 5}
    frames = [0, 2, 2, 3, 0, 1, 0, 4, 4, 5, 0, 0]
    buffer = np.zeros((len(frames), 6))  # filled by ``ready``, as the copy would fill it
    filled = posteriors(frames, 6) + np.random.default_rng(3).normal(0, 0.3, size=buffer.shape)

    def ready() -> None:
        buffer[:] = filled

    threads = ctc_align.AlignerThreads()
    try:
        got = align_words_soon("hi yo", buffer, vocab.get, 0.02, ready=ready, threads=threads).result(timeout=10)
    finally:
        threads.close()
    assert got == align_words("hi yo", filled, vocab.get, 0.02)
    assert got is not None and [w.word for w in got] == ["hi", "yo"]


def test_closing_aligner_threads_waits_for_started_alignments_and_stops_the_threads():
    """AlignerThreads.close: an alignment already started finishes (its future answered), and the
    threads are gone afterwards, not left idle for the rest of the process."""
    vocab = {" ": 1, "h": 2, "i": 3, "y": 4, "o": 5}
    frames = [0, 2, 2, 3, 0, 1, 0, 4, 4, 5, 0, 0]
    log_probs = posteriors(frames, 6)
    ran_on: list[threading.Thread] = []

    def ready() -> None:
        ran_on.append(threading.current_thread())
        time.sleep(0.2)  # still aligning when close() is called

    threads = ctc_align.AlignerThreads()
    future = align_words_soon("hi yo", log_probs, vocab.get, 0.02, ready=ready, threads=threads)
    threads.close()
    assert future.done() and future.result() == align_words("hi yo", log_probs, vocab.get, 0.02)
    assert len(ran_on) == 1 and not ran_on[0].is_alive()
