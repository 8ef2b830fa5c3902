"""CTC forced alignment (Viterbi) and word timings from it: pure numpy, no model.

Granite's encoder has a character CTC head whose posteriors the engine computes for every
utterance anyway (CTC partials, speculative drafts). Aligning a final's characters to those
posteriors gives word times at no second model pass: the best CTC path that emits exactly the
final's characters (blanks and repeats allowed, as CTC defines), found by Viterbi over the usual
extended label sequence ``blank, c1, blank, c2, …, cL, blank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from stream_server.inference.types import Word


@dataclass(frozen=True)
class CharSpan:
    """Where one target label was emitted: frames ``[start, end)`` and its mean posterior there."""

    start: int
    end: int
    probability: float


def best_path(log_probs: np.ndarray, targets: Sequence[int], blank: int = 0,
              greedy_first: bool = True) -> tuple[np.ndarray, float] | None:
    """Viterbi over the extended labels: the most likely frame-by-frame path emitting ``targets``.

    With ``greedy_first``, the frame-wise argmax path is taken at once when it emits exactly
    ``targets`` (the same path and score, without the Viterbi pass).

    Returns:
        ``(states, log_score)``: for every frame its state in ``blank, t1, blank, t2, …, blank``
        (odd states are ``targets[state // 2]``), and the path's summed log posterior; ``None``
        when no path fits (too few frames: a label repeated back to back needs a blank between).
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    frames = log_probs.shape[0]
    labels = np.asarray(targets, dtype=np.int64)
    greedy = _greedy_path(log_probs, labels, blank) if greedy_first else None
    if greedy is not None:
        return greedy
    extended = np.full(2 * len(labels) + 1, blank, dtype=np.int64)
    extended[1::2] = labels
    states = len(extended)
    # Why this shape: the recursion is sequential in frames, so its cost is numpy calls per frame.
    # The forward pass makes four, each writing in place into one preallocated score table (two
    # -inf columns on the left stand for "no state s-1 / s-2"); no back-pointer table is kept:
    # the backtrack recomputes the one choice per frame the path needs from the table, on a
    # memoryview (Python floats, not numpy scalars). Cost: docs/benchmarks.md.
    emit = log_probs[:, extended]
    # A skip from s-2 to s is allowed into a label that differs from the label two states back:
    # 0 there, -inf elsewhere, added to the jump candidate.
    jump_ok = np.full(states, -np.inf)
    jump_ok[3::2][labels[1:] != labels[:-1]] = 0.0
    width = states + 2
    table = np.full((frames, width), -np.inf)
    table[0, 2: 2 + min(2, states)] = emit[0, : min(2, states)]
    jump = np.empty(states)
    for t in range(1, frames):
        previous, current = table[t - 1], table[t, 2:]
        np.maximum(previous[2:], previous[1:-1], out=current)  # stay or step from s-1
        np.add(previous[:-2], jump_ok, out=jump)
        np.maximum(current, jump, out=current)
        current += emit[t]
    score = table[-1, 2:]
    # The path ends on the last label or on the blank after it.
    last = states - 1 if states == 1 or score[-1] >= score[-2] else states - 2
    if not np.isfinite(score[last]):
        return None
    flat = table.reshape(-1).data  # a memoryview
    can_jump = (jump_ok == 0.0).tolist()
    path = [0] * frames
    state = last
    for t in range(frames - 1, 0, -1):
        path[t] = state
        cell = (t - 1) * width + state + 2
        # Ties prefer staying, then a step (the order the forward maximum does not record).
        best, move = flat[cell], 0
        if flat[cell - 1] > best:
            best, move = flat[cell - 1], 1
        if can_jump[state] and flat[cell - 2] > best:
            move = 2
        state -= move
    path[0] = state
    return np.asarray(path, dtype=np.int64), float(score[last])


def _greedy_path(log_probs: np.ndarray, labels: np.ndarray, blank: int) -> tuple[np.ndarray, float] | None:
    """The frame-wise argmax path when it emits exactly ``labels``: then it is also the best path
    that does (it is the best of all paths), found without Viterbi. The common case for a final that
    is the CTC draft itself (Granite's speculative paths)."""
    best = log_probs.argmax(axis=1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    emitted = best[keep]
    if not np.array_equal(emitted[emitted != blank], labels):
        return None
    # State of each frame: 2k+1 while on label k, 2k on the blank before it (2L after the last).
    starts = keep & (best != blank)  # the first frame of each emitted label
    k = np.cumsum(starts)  # labels started so far, this frame's included
    states = np.where(best == blank, 2 * k, 2 * k - 1)
    return states.astype(np.int64), float(log_probs[np.arange(len(best)), best].sum())


def forced_align(log_probs: np.ndarray, targets: Sequence[int], blank: int = 0) -> list[CharSpan] | None:
    """Where each of ``targets`` is emitted on the most likely CTC path that emits exactly them.

    Args:
        log_probs: ``[frames, classes]`` log posteriors (log-softmax of the CTC head).
        targets: the label sequence to align (no blanks).
        blank: the blank class.

    Returns:
        One :class:`CharSpan` per target, in order (the frames the path spends on it, at least one,
        and its mean posterior over them); ``None`` when no path fits (see :func:`best_path`).
    """
    if len(targets) == 0:
        return []
    found = best_path(log_probs, targets, blank)
    if found is None:
        return None
    path, _ = found
    log_probs = np.asarray(log_probs)
    spans: list[CharSpan] = []
    for k, label in enumerate(targets):
        where = np.flatnonzero(path == 2 * k + 1)
        probability = float(np.mean(np.exp(log_probs[where, label])))
        spans.append(CharSpan(int(where[0]), int(where[-1]) + 1, probability))
    return spans


def align_words(
    text: str,
    log_probs: np.ndarray,
    label_of: Callable[[str], int | None],
    frame_s: float,
    blank: int = 0,
) -> tuple[Word, ...] | None:
    """Time and score ``text``'s space-separated words from CTC posteriors.

    Args:
        text: the final's text (single spaces between words).
        log_probs: ``[frames, classes]`` CTC log posteriors of the utterance's audio.
        label_of: the CTC class of a character, or ``None`` for one the head cannot emit
            (punctuation it was not trained on, say): those characters are not aligned and take
            their word's times.
        frame_s: seconds per CTC frame.
        blank: the blank class.

    Returns:
        One :class:`Word` per word (seconds from the audio's start), or ``None`` when the text has
        characters to align but none of a word could be placed (the final then keeps utterance timing).
    """
    words = text.split(" ")
    if not text.strip():
        return ()
    chars: list[tuple[int, int]] = []  # (label, word index)
    for index, word in enumerate(words):
        if index:  # the space before this word, when the head has a class for it
            space = label_of(" ")
            if space is not None:
                chars.append((space, -1))
        for char in word:
            label = label_of(char)
            if label is not None:
                chars.append((label, index))
    spans = forced_align(log_probs, [label for label, _ in chars], blank)
    if spans is None:
        return None
    timed: list[Word] = []
    for index, word in enumerate(words):
        mine = [span for span, (_, owner) in zip(spans, chars) if owner == index]
        if not mine:
            return None
        probability = float(np.mean([span.probability for span in mine]))
        timed.append(Word(word, round(mine[0].start * frame_s, 3), round(mine[-1].end * frame_s, 3),
                          round(probability, 3)))
    return tuple(timed)


def with_token_probabilities(text: str, words: Sequence[Word],
                             token_spans: Sequence[tuple[int, int, float]]) -> tuple[Word, ...]:
    """Combine each word's CTC confidence with the LLM's probabilities of the tokens that spell it.

    The rule: a word's confidence is the geometric mean of its CTC confidence (the mean posterior
    of its aligned characters, :func:`align_words`) and the mean probability of the LLM tokens whose
    characters overlap the word's: ``sqrt(ctc * mean(token probabilities))``. Either model doubting a
    word lowers it; a token spanning two words counts for both. A word no token overlaps (text the
    LLM did not produce: a forced prefix) keeps its CTC confidence.

    Args:
        text: the final's text; ``words`` are its space-separated words, in order.
        words: the CTC-timed words of ``text``.
        token_spans: ``(start, end, probability)`` per LLM token: its characters ``text[start:end]``.
    """
    combined: list[Word] = []
    position = 0
    for word in words:
        start = text.find(word.word, position)
        if start < 0:  # not this text's words: nothing to combine
            return tuple(words)
        end = start + len(word.word)
        position = end
        probs = [p for a, b, p in token_spans if a < end and b > start and b > a]
        if probs and word.confidence is not None:
            score = float(np.sqrt(word.confidence * float(np.mean(probs))))
            combined.append(Word(word.word, word.start, word.end, round(score, 3)))
        else:
            combined.append(word)
    return tuple(combined)
