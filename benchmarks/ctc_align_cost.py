"""CPU cost of Granite's word alignment (``stream_server/engines/granite/ctc_align.py``).

Granite's CTC head: 20 ms frames, 348 classes. For each utterance length, synthetic float32
posteriors (as the engine's) with about 15 characters a second, a space every sixth, whose
frame-wise argmax path misses some characters (so the greedy shortcut does not apply and the full
Viterbi runs). Timed in the same run: the numpy Viterbi that the compiled one replaced (the
baseline, kept here), the compiled ``best_path``, the whole ``align_words`` (Viterbi and the
characters' and words' spans) and ``best_path`` on the argmax path's own text (a final that is the
CTC draft: the shortcut), and a batch of ``--batch`` such finals aligned one by one against
``align_words_many`` (threads). Prints the best of ``--repeats`` in milliseconds, and how long
``ctc_align.warm()`` took (a compile, or a load from numba's disk cache; ``NUMBA_CACHE_DIR`` set to
an empty directory forces the compile).

    python -m benchmarks.ctc_align_cost [--seconds 5,10,30] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stream_server.engines.granite.ctc_align import AlignerThreads, align_words, align_words_many, best_path, warm

FRAME_S = 0.02
CLASSES = 348


def numpy_best_path(log_probs: np.ndarray, targets, blank: int = 0) -> tuple[np.ndarray, float] | None:
    """The numpy Viterbi the compiled one replaced (the baseline): four in-place numpy calls a frame
    into one preallocated score table, the backtrack recomputing the path's choices from it."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    frames = log_probs.shape[0]
    labels = np.asarray(targets, dtype=np.int64)
    extended = np.full(2 * len(labels) + 1, blank, dtype=np.int64)
    extended[1::2] = labels
    states = len(extended)
    emit = log_probs[:, extended]
    jump_ok = np.full(states, -np.inf)
    jump_ok[3::2][labels[1:] != labels[:-1]] = 0.0
    width = states + 2
    table = np.full((frames, width), -np.inf)
    table[0, 2: 2 + min(2, states)] = emit[0, : min(2, states)]
    jump = np.empty(states)
    for t in range(1, frames):
        previous, current = table[t - 1], table[t, 2:]
        np.maximum(previous[2:], previous[1:-1], out=current)
        np.add(previous[:-2], jump_ok, out=jump)
        np.maximum(current, jump, out=current)
        current += emit[t]
    score = table[-1, 2:]
    last = states - 1 if states == 1 or score[-1] >= score[-2] else states - 2
    if not np.isfinite(score[last]):
        return None
    flat = table.reshape(-1).data
    can_jump = (jump_ok == 0.0).tolist()
    path = [0] * frames
    state = last
    for t in range(frames - 1, 0, -1):
        path[t] = state
        cell = (t - 1) * width + state + 2
        best, move = flat[cell], 0
        if flat[cell - 1] > best:
            best, move = flat[cell - 1], 1
        if can_jump[state] and flat[cell - 2] > best:
            move = 2
        state -= move
    path[0] = state
    return np.asarray(path, dtype=np.int64), float(score[last])


def posteriors(seconds: float, rng: np.random.Generator, chars_per_s: float = 15.0) -> tuple[np.ndarray, list[int]]:
    """Log posteriors and the labels they were made from (class 1 is the space: every sixth)."""
    frames, length = int(seconds / FRAME_S), int(seconds * chars_per_s)
    targets = rng.integers(2, CLASSES, length)
    targets[5:-1:6] = 1
    logits = rng.normal(0.0, 1.0, (frames, CLASSES)).astype(np.float32)
    logits[:, 0] += 3.0  # blank most frames
    where = np.sort(rng.choice(frames, length, replace=False))
    logits[where, targets] += 6.0
    logits[where[::7], 0] += 8.0  # a blank wins over every 7th character: the greedy path misses it
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), targets.tolist()


def text_of(labels: list[int]) -> str:
    """A text whose characters are ``labels`` under :func:`label_of` (one CJK character a class)."""
    return "".join(" " if label == 1 else chr(0x4E00 + label) for label in labels)


def label_of(char: str) -> int:
    return 1 if char == " " else ord(char) - 0x4E00


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="5,10,30", help="utterance lengths (comma-separated)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8, help="finals in the batch columns")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    warm()
    print(f"ctc_align.warm(): {1e3 * (time.perf_counter() - began):.0f} ms (compile or disk-cache load)")
    rng = np.random.default_rng(0)
    print(f"{'audio s':>8} {'frames':>7} {'chars':>6} {'words':>6} {'numpy ms':>9} {'viterbi ms':>11} "
          f"{'align_words ms':>15} {'draft ms':>9} {'batch 1-by-1 ms':>16} {'batch threads ms':>17}  same path")
    threads = AlignerThreads()  # the batch columns' aligner threads, as an engine owns them
    try:
        for seconds in (float(s) for s in args.seconds.split(",")):
            log_probs, targets = posteriors(seconds, rng)
            text = text_of(targets)
            ours = best_path(log_probs, targets, 0, greedy_first=False)
            reference = numpy_best_path(log_probs, targets)
            assert ours is not None and reference is not None
            same = bool(np.array_equal(ours[0], reference[0])) and ours[1] == reference[1]
            words = align_words(text, log_probs, label_of, FRAME_S)
            assert words is not None and " ".join(w.word for w in words) == text
            # The text the argmax path emits: a final that is the CTC draft, aligned by the shortcut.
            argmax = log_probs.argmax(axis=1)
            emitted = argmax[np.concatenate(([True], argmax[1:] != argmax[:-1]))]
            draft = emitted[emitted != 0].tolist()
            batch = [(text, log_probs.copy()) for _ in range(args.batch)]
            assert align_words_many(batch, label_of, FRAME_S, threads=threads) == [words] * args.batch
            print(f"{seconds:8.1f} {len(log_probs):7d} {len(targets):6d} {len(words):6d} "
                  f"{best_ms(lambda: numpy_best_path(log_probs, targets), args.repeats):9.2f} "
                  f"{best_ms(lambda: best_path(log_probs, targets, 0, greedy_first=False), args.repeats):11.2f} "
                  f"{best_ms(lambda: align_words(text, log_probs, label_of, FRAME_S), args.repeats):15.2f} "
                  f"{best_ms(lambda: best_path(log_probs, draft, 0), args.repeats):9.2f} "
                  f"{best_ms(lambda: [align_words(t, p, label_of, FRAME_S) for t, p in batch], args.repeats):16.2f} "
                  f"{best_ms(lambda: align_words_many(batch, label_of, FRAME_S, threads=threads), args.repeats):17.2f}"
                  f"  {same}")
    finally:
        threads.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
