"""``granite-stream bench replay``: the accuracy pass replayed synchronously, exactly and fast.

The real-time accuracy pass (``granite-stream bench --accuracy-streams 1``) measures the service
as a client sees it, but what it measures moves from run to run: when a partial reaches the engine
depends on the machine's load, so which hypotheses the stabilizer sees does too. The replay plays
the same stream (the same clips, pauses and send rate: :func:`benchmarks.loadgen.plan_split` with
one stream) through the real session and engine joined by the public loopback
(:class:`stream_server.server.loopback.Loopback`): every frame is handed to the session in order,
and every inference request it makes is decoded before the next frame, so partials run at their
full cadence with no queueing. The outcome depends only on the code and the audio: every
stabilizer change can be measured exactly, in minutes rather than real time. It says nothing about
latency (no clock runs), and it is the idle server's behaviour (no partial waits or is refreshed).

Reported per set: the streaming finals' WER against the references, the engine's offline decode of
each whole clip (the same as the bench's ``--offline engine``), their ratio, the offline words the
finals drop per cause (:data:`benchmarks.scoring.DROP_CAUSES`), stable-text revisions, and the
share of the final's words that were already stable at the utterance's last partial (what a user
saw early).

Identical requests decode to identical text, so decodes are cached by request for the run (the
free decodes of the drop count reuse the finals', and every plan reuses the offline decodes).
``--plans K`` replays K stream plans (seeds ``--seed`` … ``--seed + K - 1``) and pools them
(:func:`pool_plans`): one plan's figure depends on where its pauses put each clip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from granite_stream_testing.datasets import Clip



def _cached_engine(engine):
    """``engine`` with its decodes cached by request content (audio, kind, prefix, context, ...).
    Its ``stats()`` counts each answer as the decode that made it did (a cached answer's retries
    count again), so the drop count's repetition-guard reading and the printed retries hold."""
    from stream_server.engines.base import Engine

    class Cached(Engine):
        def __init__(self) -> None:
            self.capabilities = engine.capabilities
            self.model_path = engine.model_path
            self.cache: dict = {}
            self.decodes = 0
            self.counts: dict[str, int] = {}
            self.seconds = 0.0

        @staticmethod
        def _key(r) -> tuple:
            return (r.kind, hashlib.blake2b(r.audio.tobytes(), digest_size=16).digest(), r.prefix, r.context,
                    r.language, r.task, r.target_language, tuple(r.keywords), r.partial_mode)

        def transcribe_batch(self, requests, on_result=None):
            out = []
            for r in requests:
                key = self._key(r)
                if key not in self.cache:
                    began = time.perf_counter()
                    before = engine.stats()
                    result = engine.transcribe_batch([r])[0]
                    after = engine.stats()
                    self.cache[key] = (result, {k: v - before.get(k, 0) for k, v in after.items()})
                    self.seconds += time.perf_counter() - began
                    self.decodes += 1
                result, counted = self.cache[key]
                for name, n in counted.items():
                    self.counts[name] = self.counts.get(name, 0) + n
                out.append(result)
            return out

        def stats(self) -> dict:
            return dict(self.counts)

        def bind_thread(self) -> None:
            engine.bind_thread()

        def close(self) -> None:
            engine.close()

    return Cached()


def replay_stream(engine, plan, partials: bool = True, partial_interval: float | None = None,
                  frame_ms: float = 40.0, early_final_ms: float | None = None):
    """Play ``plan`` (a :class:`benchmarks.loadgen.StreamPlan`) through a fresh session and
    ``engine`` joined by the loopback, as the load generator's client would send it (``start``,
    ``pcm_s16le`` frames of ``frame_ms``, ``stop``). The session has ``serve``'s settings
    (``early_final_ms``: its early finals, default the server's).

    Returns:
        A :class:`benchmarks.loadgen.StreamLog` whose clock is the audio clock: each event is
        logged at the audio time of the frame that produced it (so it scores as any pass does;
        its latencies are not meaningful).
    """
    import numpy as np

    from stream_server.core.events import Audio, AudioFormat, ConfigChange, Start, Stop
    from stream_server.core.session import Session, SessionSettings
    from stream_server.server.loopback import Loopback

    from .loadgen import StreamLog, _frames

    settings = SessionSettings() if early_final_ms is None else SessionSettings(early_final_s=early_final_ms / 1000.0)
    session = Session(f"replay-{plan.index}", engine.capabilities, settings)  # serve's defaults, as the bench's server
    loop = Loopback(session, engine)
    options = ConfigChange(language=plan.language, partials=partials, partial_interval=partial_interval)
    slog = StreamLog(plan, "granite")
    pcm = (np.clip(plan.audio, -1.0, 32767 / 32768) * 32768.0).astype("<i2")
    slog.messages += [(0.0, e.to_wire()) for e in loop.send(Start(AudioFormat("pcm_s16le", plan.sample_rate, 1),
                                                                  options))]
    ends = []
    for a, b in _frames(plan, frame_ms):
        t = b / plan.sample_rate
        slog.messages += [(t, e.to_wire()) for e in loop.send(Audio(pcm[a:b].tobytes()))]
        ends.append(b)
    slog.messages += [(plan.duration, e.to_wire()) for e in loop.send(Stop())]
    slog.frame_end_samples = np.asarray(ends, np.int64)
    slog.frame_sent_at = slog.frame_end_samples / plan.sample_rate
    return slog


def stable_share(slog) -> tuple[int, int]:
    """``(words stable at the last partial, words of the finals)`` over a stream's utterances."""
    from . import scoring

    stable = total = 0
    for traces in scoring.utterance_traces(slog).values():
        for t in traces:
            n = len(t.final.split())
            stable += min(len(t.stable.split()), n)
            total += n
    return stable, total


def replay_set(engine, name: str, clips: Sequence[Clip], args, seed: int | None = None) -> dict:
    """One set, one stream plan (``seed``, else ``args.seed``): offline decode, the replay, its score
    and its drop count."""
    from granite_stream_testing.textnorm import wer_cer

    from . import loadgen, scoring
    from .common import count_drops
    from .offline import transcribe_engine

    language = clips[0].language
    offline_texts, _ = transcribe_engine(engine, clips)
    offline = wer_cer(zip((c.text for c in clips), offline_texts), language)
    [plan] = loadgen.plan_split(clips, 1, None if args.send_rate == "native" else int(args.send_rate),
                                args.pause, args.seed if seed is None else seed)
    slog = replay_stream(engine, plan, partials=args.partials, partial_interval=args.partial_interval,
                         frame_ms=args.frame_ms)
    result = scoring.score(slog)
    summary = scoring.summarize([result], language)
    drops = count_drops(engine, [slog], dict(zip((c.id for c in clips), offline_texts)))
    stable, words = stable_share(slog)
    return {
        "clips": len(clips), "wer": summary["wer"], "offline_wer": offline["wer"],
        "ratio": round(summary["wer"] / offline["wer"], 3) if offline["wer"] else None,
        "dropped_words": drops, "stable_revisions": summary["stable_revisions"], "partials": result.partials,
        "stable_at_last_partial": round(stable / words, 3) if words else None,
        "clips_detail": [{**c.to_json(), "offline": o} for c, o in zip(result.clips, offline_texts)],
    }


def pool_plans(per_plan: dict[int, dict]) -> dict:
    """Several plans' results of one set as one: the mean WER (every plan has the same clips, so
    the same reference words), its ratio to the offline WER, and the drops and revisions summed;
    ``plans`` keeps each plan's own result by seed.

    Why several plans: where a clip falls in the stream (the pauses before it) moves its VAD span
    by a frame or two, and tiny.en's greedy text with it; one plan's ratio moves by several words
    from seed to seed, more than the gap it is read against."""
    runs = list(per_plan.values())
    first = runs[0]
    wer = sum(r["wer"] for r in runs) / len(runs)
    drops = {key: sum(r["dropped_words"][key] for r in runs) for key in ("offline_words", "dropped")}
    for key in ("by_cause", "right_by_cause", "stable_ledger"):
        drops[key] = {cause: sum(r["dropped_words"][key][cause] for r in runs) for cause in first["dropped_words"][key]}
    shares = [r["stable_at_last_partial"] for r in runs if r["stable_at_last_partial"] is not None]
    return {
        "clips": first["clips"], "wer": wer, "offline_wer": first["offline_wer"],
        "ratio": round(wer / first["offline_wer"], 3) if first["offline_wer"] else None,
        "dropped_words": drops, "stable_revisions": sum(r["stable_revisions"] for r in runs),
        "partials": sum(r["partials"] for r in runs),
        "stable_at_last_partial": round(sum(shares) / len(shares), 3) if shares else None,
        "plans": per_plan,
    }


def format_table(results: dict) -> str:
    from .scoring import DROP_CAUSES

    head = ["set", "streaming WER", "offline WER", "ratio", "dropped", *DROP_CAUSES, "stable saved/lost",
            "stable share", "revisions"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, r: dict) -> str:
        d = r["dropped_words"]
        return "| " + " | ".join([
            label, f"{100 * r['wer']:.2f} %", f"{100 * r['offline_wer']:.2f} %", str(r["ratio"]),
            # n/r: r of the n dropped words were right in the offline decode (against the reference)
            f"{d['dropped']}/{sum(d['right_by_cause'].values())} ({d['offline_words']})",
            *(f"{d['by_cause'][c]}/{d['right_by_cause'][c]}" for c in DROP_CAUSES),
            f"{d['stable_ledger']['saved']}/{d['stable_ledger']['lost']}",
            str(r["stable_at_last_partial"]), str(r["stable_revisions"])]) + " |"

    for name, r in results.items():
        plans = r.get("plans") or {}
        rows += [row(f"{name}, seed {seed}", p) for seed, p in plans.items()]
        rows.append(row(f"{name}, {len(plans)} plans" if plans else name, r))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    from .common import add_clip_options, add_engine_options, add_send_options

    p = argparse.ArgumentParser(
        prog="granite-stream bench replay",
        description="Replay the one-stream accuracy pass synchronously through the real session and engine "
                    "(no sockets, no clock; every request decoded at once): streaming vs offline WER and dropped "
                    "words per cause, deterministic.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_clip_options(p)
    add_send_options(p)
    p.add_argument("--partials", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for partials (stable words, reconcile) or finals only")
    p.add_argument("--split", choices=("dev", "eval"), default="dev",
                   help="the clips' split: eval is the held-out half (Asterisk sets only), for checking a change "
                        "that was tuned on dev")
    p.add_argument("--plans", type=int, default=1,
                   help="replay this many stream plans (seeds --seed, --seed+1, ...) and pool them: one plan's "
                        "WER moves by several words with where the pauses put each clip")
    add_engine_options(p)
    p.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    return p


def main(argv: list[str] | None = None) -> int:
    from granite_stream_testing import datasets

    from .common import offline_engine

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plans < 1:
        parser.error("--plans must be at least 1")
    args.engine_option, args.max_batch = [], 1
    sets: dict[str, list[Clip]] = {}
    for name in args.sets:
        try:
            sets[name] = datasets.load_set(name, args.split, progress=False)[: args.limit or None]
        except ValueError as e:  # an unknown set, or a split the set does not have
            parser.error(str(e))
    engine = _cached_engine(offline_engine(args))
    results: dict = {}
    try:
        for name, clips in sets.items():
            per_plan = {}
            for seed in range(args.seed, args.seed + args.plans):
                began = time.perf_counter()
                per_plan[seed] = replay_set(engine, name, clips, args, seed)
                print(f"replay: {name}, seed {seed}: {len(clips)} clips, WER {100 * per_plan[seed]['wer']:.2f} % "
                      f"(offline {100 * per_plan[seed]['offline_wer']:.2f} %), {time.perf_counter() - began:.0f} s, "
                      f"{engine.decodes} decodes so far, engine counts {engine.stats()}", file=sys.stderr)
            results[name] = per_plan[args.seed] if args.plans == 1 else pool_plans(per_plan)
    finally:
        engine.close()
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


__all__ = ["replay_stream", "replay_set", "pool_plans", "stable_share", "format_table", "main"]
