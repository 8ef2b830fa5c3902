"""What Granite's word timing adds to a final's compute, on the GPU (issue #19: at most 5 %).

Builds the full-size granite-4.0-1b-speech architecture with random bf16 weights on the GPU
(:func:`benchmarks.granite_gpu_bench.build_full`; ``--tiny``: the tiny CPU model, a smoke run) and
times ``transcribe_batch`` of finals with the engine's ``word_timestamps`` on and off, alternated
(on, off, on, off, … so that drift hits both alike), best and median of ``--repeats`` each, for
every ``--seconds`` length and ``--batch`` size. The engine is :class:`WordTimingEngine`: the
server's GPU configuration (padded encoder batching, graphs decode), decodes forced to
``--tokens`` tokens, and a final text of ``--chars-per-second`` CTC characters in words of 2–9
letters. Why the text is replaced: random weights decode random bytes, few of them characters the
CTC head has, so the alignment would have almost nothing to do; real speech gives about 15
characters a second. That text is not what the CTC argmax path emits, so every timed final runs
the full Viterbi (the worst case: a final that is the CTC draft takes the shortcut).

Also reported: how long the first ``ctc_align.warm()`` of the process took (the numba compile, or
its load from the disk cache), and the alignment alone (``align_words`` on the engine's own
posteriors of each length, best of ``--repeats``, CPU).

    python -m benchmarks.granite_word_timing_gpu --out docs/word_timing_gpu.json
    python -m benchmarks.granite_word_timing_gpu --tiny --seconds 2 --repeats 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np
import torch

from benchmarks.granite_gpu_bench import build_full, build_tiny, clip, sync
from granite_stream_testing.forced_granite import ForcedLengthGraniteEngine
from stream_server.engines.granite import ctc_align
from stream_server.engines.granite.engine import ENCODER_FRAME_S
from stream_server.engines.granite.options import GraniteOptions
from stream_server.inference.types import SAMPLE_RATE, InferenceRequest


def realistic_text(seconds: float, chars_per_second: float, seed: int) -> str:
    """Words of 2–9 lowercase letters, single spaces, about ``seconds * chars_per_second`` characters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: list[str] = []
    length = 0
    while length < seconds * chars_per_second:
        word = "".join(rng.choice(letters, int(rng.integers(2, 10))))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


class WordTimingEngine(ForcedLengthGraniteEngine):
    """Bench-only: each decoded final's text is replaced by :func:`realistic_text` of its audio's
    length (in the :meth:`on_decoded` hook, before the result and its word timing are made)."""

    chars_per_second = 15.0

    def on_decoded(self, work, token_ids: list[int]) -> None:
        super().on_decoded(work, token_ids)
        if work.req.kind == "final":
            seconds = len(work.req.audio) / SAMPLE_RATE
            work.text = realistic_text(seconds, self.chars_per_second, seed=int(seconds * 1000) + work.index)


def finals(seconds: float, batch: int) -> list[InferenceRequest]:
    return [InferenceRequest("bench", i, "final", clip(seconds, i + 1), language="en") for i in range(batch)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seconds", default="5,10,30", help="utterance lengths (comma-separated)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    ap.add_argument("--tokens", type=int, default=30, help="forced decode length of every final")
    ap.add_argument("--chars-per-second", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls each with timing on and off")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each shape first (graph captures)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info: dict = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": sys.version.split()[0],
        "model": "tiny" if args.tiny else "granite-4.0-1b-speech architecture, random bf16 weights",
        "tokens": args.tokens,
        "chars_per_second": args.chars_per_second,
    }
    results: dict = {"info": info, "rows": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    began = time.perf_counter()
    ctc_align.warm()
    info["aligner_warm_s"] = round(time.perf_counter() - began, 3)

    if args.tiny:
        model, tokenizer = build_tiny(device)
    else:
        model, tokenizer = build_full(device, torch.bfloat16 if device == "cuda" else torch.float32)
    batches = [int(b) for b in args.batch.split(",")]
    gpu = device == "cuda"
    options = GraniteOptions(
        max_batch=max(batches), speculative=False, word_timestamps=True, warm_decode_seconds=(),
        encoder_batching="padded" if gpu else "exact", decode_backend="graphs" if gpu else "auto")
    engine = WordTimingEngine(model=model, tokenizer=tokenizer, model_label="bench", options=options,
                              force_new_tokens=args.tokens)
    engine.chars_per_second = args.chars_per_second
    began = time.perf_counter()
    try:  # no graph captures here: each timed shape captures in its untimed calls
        engine.warmup(graph_seconds=0.0)
    except Exception as exc:  # noqa: BLE001 - the timings below do not need it; say so in the results
        info["engine_warmup_error"] = f"{type(exc).__name__}: {exc}"
    info["engine_warmup_s"] = round(time.perf_counter() - began, 3)
    print(json.dumps(info), flush=True)

    header = (f"{'audio s':>7} {'batch':>5} {'chars':>6} {'words':>6} {'off best ms':>12} {'on best ms':>11} "
              f"{'cost best':>10} {'off med ms':>11} {'on med ms':>10} {'cost med':>9} {'align ms':>9}")
    print(f"card: {info['card']}; final compute, word timing off vs on, {args.repeats} alternated calls each")
    print(header, flush=True)
    for seconds in (float(s) for s in args.seconds.split(",")):
        for batch in batches:
            requests = finals(seconds, batch)

            def call(timed: bool) -> float:
                engine.word_timestamps = timed
                sync(device)
                t0 = time.perf_counter()
                engine.transcribe_batch(requests)
                sync(device)
                return time.perf_counter() - t0

            for _ in range(args.warmup):
                call(True), call(False)
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(args.repeats):
                for timed in ((True, False) if i % 2 == 0 else (False, True)):
                    times[timed].append(call(timed))
            engine.word_timestamps = True
            result = engine.transcribe_batch(requests[:1])[0]
            words = result.words or ()
            # The alignment alone (CPU), on this length's posteriors as the engine computes them. The
            # random model's CTC head has no vocabulary: class i is chr(i), the engine's default.
            with torch.inference_mode():
                works = engine.prepare(requests[:1])
                engine.encode(works)
                hidden = works[0].encoded()[: works[0].n_frames]
                log_probs = torch.log_softmax(engine.ctc_logits(hidden[None]), dim=-1)[0].cpu().numpy()
            classes = log_probs.shape[1]
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ctc_align.align_words(result.text, log_probs, lambda c: ord(c) if ord(c) < classes else None,
                                      ENCODER_FRAME_S, engine.ctc_blank_id)
                samples.append(time.perf_counter() - t0)
            align_ms = 1e3 * min(samples)
            off, on = 1e3 * min(times[False]), 1e3 * min(times[True])
            off_med, on_med = 1e3 * statistics.median(times[False]), 1e3 * statistics.median(times[True])
            row: dict = {
                "seconds": seconds, "batch": batch, "chars": len(result.text), "words": len(words),
                "off_best_ms": round(off, 2), "on_best_ms": round(on, 2), "cost_best": round(on / off - 1, 4),
                "off_median_ms": round(off_med, 2), "on_median_ms": round(on_med, 2),
                "cost_median": round(on_med / off_med - 1, 4), "align_words_ms": round(align_ms, 3),
                "off_ms": [round(1e3 * t, 2) for t in times[False]], "on_ms": [round(1e3 * t, 2) for t in times[True]],
            }
            results["rows"].append(row)
            save()
            print(f"{seconds:7.1f} {batch:5d} {row['chars']:6d} {row['words']:6d} {off:12.1f} {on:11.1f} "
                  f"{100 * row['cost_best']:+9.1f}% {off_med:11.1f} {on_med:10.1f} {100 * row['cost_median']:+8.1f}% "
                  f"{align_ms:9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
