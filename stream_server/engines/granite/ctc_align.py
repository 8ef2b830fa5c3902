"""CTC forced alignment (Viterbi) and word timings from it: numpy and one numba kernel, no model.

Granite's encoder has a character CTC head whose posteriors the engine computes for every
utterance anyway (CTC partials, speculative drafts). Aligning a final's characters to those
posteriors gives word times at no second model pass: the best CTC path that emits exactly the
final's characters (blanks and repeats allowed, as CTC defines), found by Viterbi over the usual
extended label sequence ``blank, c1, blank, c2, …, cL, blank``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numba
import numpy as np

from stream_server.inference.types import Word


def _jit(function: Callable) -> Callable:
    """``numba.njit`` without the GIL, its machine code cached on disk (in ``$NUMBA_CACHE_DIR`` when
    set, else next to this module, else numba's user-wide cache dir) so that only the first process
    of an install compiles; where no location is writable (a read-only install without a writable
    home) it compiles in memory at :func:`warm` instead (about a second)."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba: "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(function)


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

    Ties between equally likely predecessors go to staying on the state, then to a step from the
    previous state, then to a jump over a blank; between the two possible end states, to the final
    blank.

    Returns:
        ``(states, log_score)``: for every frame its state in ``blank, t1, blank, t2, …, blank``
        (odd states are ``targets[state // 2]``), and the path's summed log posterior (float64
        arithmetic); ``None`` when no path fits (too few frames: a label repeated back to back needs
        a blank between).
    """
    log_probs = np.asarray(log_probs)
    if log_probs.dtype not in (np.float32, np.float64):
        log_probs = log_probs.astype(np.float64)
    log_probs = np.ascontiguousarray(log_probs)
    labels = np.asarray(targets, dtype=np.int64)
    if log_probs.shape[0] == 0:
        return None if len(labels) else (np.zeros(0, dtype=np.int64), 0.0)
    greedy = _greedy_path(log_probs, labels, blank) if greedy_first else None
    if greedy is not None:
        return greedy
    extended = np.full(2 * len(labels) + 1, blank, dtype=np.int64)
    extended[1::2] = labels
    # A jump from s-2 to s is allowed into a label that differs from the label two states back.
    jump_ok = np.full(len(extended), -np.inf)
    jump_ok[3::2][labels[1:] != labels[:-1]] = 0.0
    path = np.empty(log_probs.shape[0], dtype=np.int64)
    score = _viterbi(log_probs, extended, jump_ok, path)
    if not np.isfinite(score):
        return None
    return path, float(score)


@_jit
def _viterbi(log_probs, extended, jump_ok, path):
    """The compiled forward pass and backtrack of :func:`best_path`: fills ``path`` and returns the
    path's score, ``-inf`` when no path fits (``path`` is then undefined).

    ``jump_ok[s]`` is 0 where state ``s`` may be entered from ``s - 2`` and ``-inf`` elsewhere:
    added to the jump's score, it rules the jump out without a branch, leaving the value unchanged.

    Why compiled: the recursion is sequential in frames, so numpy can vectorise only over states
    and pays several calls per frame, which made it the largest part of a long final's alignment;
    here a frame is two tight loops (the frame's emissions gathered, then the states). Two ``-inf``
    cells before state 0 stand for "no state s-1 / s-2". Back-pointers are one byte per frame and
    state (1.4 MB at 30 s). Cost: docs/benchmarks.md ("Word timings and confidence on finals").
    """
    frames = log_probs.shape[0]
    states = extended.shape[0]
    minus_inf = -np.inf
    previous = np.full(states + 2, minus_inf)  # state s at s + 2
    current = np.full(states + 2, minus_inf)
    emit = np.empty(states)
    back = np.empty((frames, states), dtype=np.int8)  # row 0 is never read
    for s in range(min(2, states)):
        previous[s + 2] = np.float64(log_probs[0, extended[s]])
    for t in range(1, frames):
        row = log_probs[t]
        for s in range(states):
            emit[s] = row[extended[s]]
        moves = back[t]
        for s in range(states):
            best = previous[s + 2]  # stay
            move = 0
            step = previous[s + 1]
            if step > best:
                best = step
                move = 1
            jump = previous[s] + jump_ok[s]
            if jump > best:
                best = jump
                move = 2
            current[s + 2] = best + emit[s]
            moves[s] = move
        previous, current = current, previous
    # The path ends on the last label or on the blank after it.
    last = states - 1
    if states > 1 and previous[states + 1] < previous[states]:
        last = states - 2
    score = previous[last + 2]
    if score == minus_inf:
        return score
    state = last
    for t in range(frames - 1, 0, -1):
        path[t] = state
        state -= back[t, state]
    path[0] = state
    return score


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
    return states.astype(np.int64), float(log_probs[np.arange(len(best)), best].astype(np.float64).sum())


def warm() -> None:
    """Compile (or load from the disk cache) the Viterbi kernel for the posteriors' two dtypes, so
    that the first final aligned does not pay for it. Engines call it when they load."""
    for dtype in (np.float32, np.float64):
        log_probs = np.log(np.full((3, 3), 1 / 3, dtype=dtype))
        best_path(log_probs, [1, 2], greedy_first=False)


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
    found = _spans(log_probs, targets, blank)
    if found is None:
        return None
    starts, ends, probabilities = found
    return [CharSpan(a, b, p) for a, b, p in zip(starts.tolist(), ends.tolist(), probabilities.tolist())]


def _spans(log_probs: np.ndarray, targets: Sequence[int],
           blank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`forced_align` as three arrays (start frames, end frames, mean posteriors), without a
    Python object per character: a 30 s final has about 450."""
    labels = np.asarray(targets, dtype=np.int64)
    if len(labels) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    found = best_path(log_probs, targets, blank)
    if found is None:
        return None
    path, _ = found
    # The path's states never decrease and visit every odd state (a jump skips only a blank), so
    # each label's frames are one run of the frames on odd states, in label order.
    on_label = np.flatnonzero(path & 1)
    label_index = path[on_label] >> 1
    runs = np.arange(len(labels))
    first = np.searchsorted(label_index, runs, side="left")
    count = np.searchsorted(label_index, runs, side="right") - first
    posterior = np.exp(np.asarray(log_probs)[on_label, labels[label_index]].astype(np.float64))
    probabilities = np.add.reduceat(posterior, first) / count
    return on_label[first], on_label[first + count - 1] + 1, probabilities


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
    found = _spans(log_probs, [label for label, _ in chars], blank)
    if found is None:
        return None
    starts, ends, probabilities = found
    owners = np.asarray([owner for _, owner in chars], dtype=np.int64)
    mine = owners >= 0  # the spaces' spans belong to no word
    owners, starts, ends, probabilities = owners[mine], starts[mine], ends[mine], probabilities[mine]
    # Characters come in word order: each word's characters are one run of ``owners``.
    indices = np.arange(len(words))
    first = np.searchsorted(owners, indices, side="left")
    count = np.searchsorted(owners, indices, side="right") - first
    if not count.all():
        return None
    last = first + count - 1
    means = np.add.reduceat(probabilities, first) / count
    return tuple(Word(word, round(start * frame_s, 3), round(end * frame_s, 3), round(probability, 3))
                 for word, start, end, probability
                 in zip(words, starts[first].tolist(), ends[last].tolist(), means.tolist()))


#: Frames × characters over a batch of finals from which :func:`align_words_many` uses threads.
THREADED_CELLS = 1_000_000
#: Frames × characters from which one final's alignment is worth a thread of its own while its
#: caller has other work (:func:`align_words_soon`): an eighth of :data:`THREADED_CELLS`, about
#: 13 s of speech.
ALIGN_SOON_CELLS = THREADED_CELLS // 8

_T = TypeVar("_T")


class AlignerThreads:
    """The threads that align words for one owner (the Granite engine): at most 8, and no more
    than the CPUs, started on first use. The owner releases them with :meth:`close`, which waits
    for the alignments already started; a use after it starts new threads."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], _T]) -> Future[_T]:
        """Run ``job`` on one of the threads."""
        return self._started().submit(job)

    def map(self, job: Callable[[_T], object], items: Sequence[_T]) -> list:
        """``job`` of each of ``items`` on the threads, the results in order."""
        return list(self._started().map(job, items))

    def close(self) -> None:
        """Stop the threads once the jobs already submitted are done."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _started(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="ctc-align")
            return self._executor



def align_words_many(
    finals: Sequence[tuple[str, np.ndarray]],
    label_of: Callable[[str], int | None],
    frame_s: float,
    blank: int = 0,
    *,
    threads: AlignerThreads,
) -> list[tuple[Word, ...] | None]:
    """:func:`align_words` of several finals (``(text, log_probs)`` each), in order.

    When their Viterbi tables are large together (over :data:`THREADED_CELLS` frames × characters:
    about 13 s of speech in each of 8 finals, or two finals of 30 s), they align on ``threads``:
    the Viterbi, the bulk of a long final's alignment, runs without the GIL, so the batch costs
    about its longest alignment plus the Python parts of the others, not the sum. Below that,
    threads cost more than they save (8 finals of 10 s on 2 cores; docs/benchmarks.md), and the
    finals align one by one on the caller's thread.
    """
    cells = sum(len(log_probs) * len(text) for text, log_probs in finals)
    if len(finals) <= 1 or cells < THREADED_CELLS:
        return [align_words(text, log_probs, label_of, frame_s, blank) for text, log_probs in finals]
    return threads.map(lambda final: align_words(final[0], final[1], label_of, frame_s, blank), finals)


def align_words_soon(
    text: str,
    log_probs: np.ndarray,
    label_of: Callable[[str], int | None],
    frame_s: float,
    blank: int = 0,
    ready: Callable[[], object] | None = None,
    *,
    threads: AlignerThreads,
) -> Future[tuple[Word, ...] | None]:
    """:func:`align_words` started now on ``threads``, for a caller with other work to do meanwhile
    (Granite: a final whose text is known before the batch's LLM decode).

    ``ready``, when given, is called first on the pool's thread and must return once ``log_probs``
    holds its values (a CUDA event's ``synchronize``: the posteriors' copy to the host), so that the
    caller does not wait for it. The future's result (or exception) is what :func:`align_words`
    returns (or raises).
    """
    def job() -> tuple[Word, ...] | None:
        if ready is not None:
            ready()
        return align_words(text, log_probs, label_of, frame_s, blank)

    return threads.submit(job)


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
