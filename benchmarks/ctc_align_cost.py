"""CPU cost of Granite's word alignment (the Viterbi in ``stream_server/engines/ctc_align.py``).

Granite's CTC head: 20 ms frames, 348 classes. For each utterance length, synthetic posteriors with
about 15 characters a second whose frame-wise argmax path misses some characters (so the greedy
shortcut does not apply and the full Viterbi runs), timed against the first, per-frame-allocating
loop (the baseline, kept here) in the same run. Prints the best of ``--repeats`` in milliseconds.

    python -m benchmarks.ctc_align_cost [--seconds 10,30] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stream_server.engines.granite.ctc_align import best_path

FRAME_S = 0.02
CLASSES = 348


def baseline_best_path(log_probs: np.ndarray, targets, blank: int = 0) -> tuple[np.ndarray, float] | None:
    """The first implementation: new arrays (concatenate, stack, fancy index) every frame."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    frames = log_probs.shape[0]
    labels = np.asarray(targets, dtype=np.int64)
    extended = np.full(2 * len(labels) + 1, blank, dtype=np.int64)
    extended[1::2] = labels
    states = len(extended)
    skip = np.zeros(states, dtype=bool)
    skip[3::2] = labels[1:] != labels[:-1]
    score = np.full(states, -np.inf)
    score[: min(2, states)] = log_probs[0, extended[: min(2, states)]]
    back = np.zeros((frames, states), dtype=np.int8)
    columns = np.arange(states)
    for t in range(1, frames):
        step = np.concatenate(([-np.inf], score[:-1]))
        jump = np.where(skip, np.concatenate(([-np.inf, -np.inf], score[:-2])), -np.inf)
        candidates = np.stack([score, step, jump])
        choice = np.argmax(candidates, axis=0)
        score = candidates[choice, columns] + log_probs[t, extended]
        back[t] = choice
    last = states - 1 if states == 1 or score[-1] >= score[-2] else states - 2
    if not np.isfinite(score[last]):
        return None
    path = np.empty(frames, dtype=np.int64)
    state = last
    for t in range(frames - 1, -1, -1):
        path[t] = state
        state -= int(back[t, state])
    return path, float(score[last])


def posteriors(seconds: float, rng: np.random.Generator, chars_per_s: float = 15.0) -> tuple[np.ndarray, list[int]]:
    frames, length = int(seconds / FRAME_S), int(seconds * chars_per_s)
    targets = rng.integers(1, CLASSES, length)
    logits = rng.normal(0.0, 1.0, (frames, CLASSES)).astype(np.float32)
    logits[:, 0] += 3.0  # blank most frames
    where = np.sort(rng.choice(frames, length, replace=False))
    logits[where, targets] += 6.0
    logits[where[::7], 0] += 8.0  # a blank wins over every 7th character: the greedy path misses it
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), targets.tolist()


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
    parser.add_argument("--seconds", default="10,30", help="utterance lengths (comma-separated)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'audio s':>8} {'frames':>7} {'chars':>6} {'baseline ms':>12} {'viterbi ms':>11} {'draft ms':>10}  same path")
    for seconds in (float(s) for s in args.seconds.split(",")):
        log_probs, targets = posteriors(seconds, rng)
        ours = best_path(log_probs, targets, 0, greedy_first=False)
        reference = baseline_best_path(log_probs, targets)
        assert ours is not None and reference is not None
        same = bool(np.array_equal(ours[0], reference[0]))
        # The text the argmax path emits: a final that is the CTC draft, aligned by the shortcut.
        argmax = log_probs.argmax(axis=1)
        emitted = argmax[np.concatenate(([True], argmax[1:] != argmax[:-1]))]
        draft = emitted[emitted != 0].tolist()
        print(f"{seconds:8.1f} {len(log_probs):7d} {len(targets):6d} "
              f"{best_ms(lambda: baseline_best_path(log_probs, targets), args.repeats):12.2f} "
              f"{best_ms(lambda: best_path(log_probs, targets, 0, greedy_first=False), args.repeats):11.2f} "
              f"{best_ms(lambda: best_path(log_probs, draft, 0), args.repeats):10.2f}"
              f"  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
