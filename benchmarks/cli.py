"""``granite-stream bench``: accuracy, latency and capacity benchmarks (see docs/benchmarks.md).

Subcommands::

    granite-stream bench [run] [options]      # the benchmark (default subcommand)
    granite-stream bench report RESULTS.json  # re-print the table and redraw the plots
    granite-stream bench install-peers        # install WhisperLive 0.10.0 for --peers whisperlive
    granite-stream bench diarization [opts]   # speaker labels on single-channel conversations (docs/diarization.md)
    granite-stream bench replay [opts]        # the accuracy pass replayed synchronously: exact, in minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from granite_stream_testing import datasets
from granite_stream_testing.datasets import Clip

from .common import (BUILTIN_SETS, add_clip_options, add_engine_options, add_send_options, count_drops, csv_list,
                     engine_options, offline_engine)

log = logging.getLogger("granite_stream.bench")

SCHEMA = "granite-stream-bench/1"


def _levels(value: str) -> list[int]:
    levels = sorted({int(v) for v in csv_list(value)})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers, e.g. 1,2,4,8")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="granite-stream bench",
        description="Replay real speech through the streaming server as N concurrent real-time WebSocket clients; "
                    "measure final/partial latency, stable-text revisions, WER/CER against offline decoding of the "
                    "same clips, capacity (streams sustained under a latency bound), and the same for WhisperLive.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Other subcommands: `granite-stream bench report RESULTS.json` re-renders the table and plots; "
               "`granite-stream bench install-peers` installs WhisperLive 0.10.0 for --peers whisperlive.",
    )
    data = p.add_argument_group("data")
    add_clip_options(data)
    data.add_argument("--manifest", type=Path, action="append", default=[],
                      help="a JSON Lines manifest of your own clips (granite_stream_testing.datasets format); repeatable")

    server = p.add_argument_group("server under test")
    server.add_argument("--url", default=None,
                        help="benchmark a running server at this ws:// URL instead of starting one")
    server.add_argument("--server", choices=("inprocess", "subprocess"), default="subprocess",
                        help="subprocess: `granite-stream serve` in a child process, with serve's defaults (CPU/RSS of "
                             "the server alone); inprocess: engine and server on the load generator's event loop, "
                             "with the same defaults")
    add_engine_options(server)
    server.add_argument("--max-batch", type=int, default=None, help="serve --max-batch (default: serve's)")
    server.add_argument("--early-final-ms", type=float, default=None,
                        help="serve --early-final-ms: decode at this much pause (0: only at the VAD's end of speech; "
                             "default: serve's)")
    server.add_argument("--partial-refresh", default=None, choices=("on", "off"),
                        help="serve --partial-refresh: refresh partials still waiting in its queue (default: serve's)")
    server.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="what-if runs: WhisperEngine constructor override, e.g. final_window_s=10 "
                             "(implies --server inprocess); repeatable")

    load = p.add_argument_group("load generator")
    load.add_argument("--speed", type=float, default=1.0, help="replay at this multiple of real time")
    add_send_options(load)
    load.add_argument("--no-partials", action="store_true", help="ask the server for finals only")

    stages = p.add_argument_group("stages")
    stages.add_argument("--accuracy-streams", type=int, default=4,
                        help="the accuracy pass deals every clip of a set over this many concurrent streams")
    stages.add_argument("--accuracy-plans", type=int, default=3,
                        help="repeat the accuracy pass with this many stream plans (seeds --seed, --seed+1, ...) and "
                             "pool them: where one plan's pauses put a clip moves tiny.en's greedy text, so one "
                             "plan's WER ratio moves by about 0.05 from seed to seed")
    stages.add_argument("--no-accuracy", action="store_true", help="skip the accuracy pass")
    stages.add_argument("--no-offline", action="store_true", help="skip the offline references")
    stages.add_argument("--offline", type=csv_list, default=["engine", "faster_whisper", "faster_whisper_greedy"],
                        help="offline references to compute")
    stages.add_argument("--no-sweep", action="store_true", help="skip the capacity sweep")
    stages.add_argument("--no-drops", action="store_true",
                        help="skip counting the words the streaming finals drop against the offline decode "
                             "(per cause; needs the accuracy pass and the engine offline reference)")

    sweep = p.add_argument_group("capacity sweep")
    sweep.add_argument("--sweep-set", default=None, help="set whose clips the sweep plays (default: the first set)")
    sweep.add_argument("--levels", type=_levels, default=[1, 2, 4, 8, 16, 32],
                       help="concurrent stream counts to try, in order, until one fails")
    sweep.add_argument("--keep-going", action="store_true",
                       help="run every level even after one fails (for the latency-vs-streams curve)")
    sweep.add_argument("--refine", action="store_true",
                       help="after the first failing level, bisect between it and the last passing one")
    sweep.add_argument("--level-seconds", type=float, default=60.0, help="seconds of speech per stream per level")
    sweep.add_argument("--bound", type=float, default=1.5, help="p95 final-latency bound in seconds")
    sweep.add_argument("--max-lag-growth", type=float, default=0.5,
                       help="a level fails if median final latency grows by more than this over the run (s)")
    sweep.add_argument("--profile", action="store_true",
                       help="sample the server process with py-spy during every sweep level (in-process: the whole benchmark "
                            "process); "
                            "summaries go into the JSON, raw stacks next to it")
    sweep.add_argument("--contention-threshold", type=float, default=25.0,
                       help="a level during which other processes used more CPU than this (%% of one core) "
                            "is flagged as contended and measured again")
    sweep.add_argument("--contention-retries", type=int, default=1, help="how often to re-measure a contended level")
    sweep.add_argument("--peers", type=csv_list, default=[], help="peers to sweep side by side: whisperlive")
    sweep.add_argument("--peer-drain", type=float, default=15.0,
                       help="WhisperLive: seconds of trailing silence allowed for its last segment to complete")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None,
                     help="results folder (default bench-results/<timestamp>); results.json and PNG plots go there")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--log-level", default="WARNING")
    return p


# ---- data ---------------------------------------------------------------------------------------


def load_clips(args) -> dict[str, list[Clip]]:
    sets: dict[str, list[Clip]] = {}
    for name in args.sets:
        if name not in BUILTIN_SETS:
            raise SystemExit(f"granite-stream bench: unknown set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
        sets[name] = datasets.load_set(name, "dev", progress=False)
    for path in args.manifest:
        for clip in datasets.read_manifest(path):
            sets.setdefault(clip.set, []).append(clip)
    if args.limit:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    return {k: v for k, v in sets.items() if v}


def _send_rate(args) -> int | None:
    return None if args.send_rate == "native" else int(args.send_rate)


# ---- stages -------------------------------------------------------------------------------------


def run_offline_stage(args, sets: dict[str, list[Clip]], languages: Sequence[str]) -> dict:

    from .offline import run_offline
    from granite_stream_testing.textnorm import wer_cer

    from stream_server.engines.whisper import available_cpus

    engine = offline_engine(args)
    model_path = str(engine.model_path or "")
    modes = list(args.offline)
    if not model_path:
        modes = [m for m in modes if m == "engine"]  # faster-whisper needs a CTranslate2 Whisper directory
    out: dict = {}
    try:
        for name, clips in sets.items():
            if clips[0].language not in languages:
                continue
            _progress(f"offline: {name} ({len(clips)} clips) with {', '.join(modes)}")
            # faster-whisper's references: the engine's threads (serve's 0 is one per core).
            results = run_offline(engine, model_path, clips, modes, args.cpu_threads or available_cpus())
            out[name] = {}
            for mode, r in results.items():
                scored = wer_cer(zip((c.text for c in clips), r["texts"]), clips[0].language)
                out[name][mode] = {**scored, "seconds": r["seconds"], "rtf": r["rtf"],
                                   "texts": dict(zip((c.id for c in clips), r["texts"]))}
    finally:
        engine.close()
    return out


async def run_pass(url: str, plans, protocol: str, args, log_name: str | None = None, keep_logs: list | None = None,
                   **kwargs) -> tuple[list, dict]:
    from . import loadgen, scoring

    logs = await loadgen.run_streams(url, plans, protocol, speed=args.speed, frame_ms=args.frame_ms, **kwargs)
    if keep_logs is not None:
        keep_logs.extend(logs)
    if log_name:
        loadgen.save_logs(logs, args.out / f"{log_name}.json.gz")
    results = [scoring.score(slog) for slog in logs]
    return results, scoring.summarize(results, plans[0].language if plans else "en")


def _protocol_kwargs(protocol: str, args) -> dict:
    if protocol == "granite":
        extra = {} if args.partial_interval is None else {"partial_interval": args.partial_interval}
        return {"partials": not args.no_partials, "extra_start": extra}
    from .peers import default_model_path

    return {"model": default_model_path(), "drain_s": args.peer_drain}


async def accuracy_stage(url: str, args, sets: dict[str, list[Clip]], languages: Sequence[str],
                         logs: dict[str, list] | None = None) -> dict:
    """Every clip of each set once per plan, over ``--accuracy-streams`` real-time streams, for
    ``--accuracy-plans`` plans (seeds ``--seed`` onwards) pooled into one summary: the WER over
    every plan's clips (each plan has the same reference words, so it is the plans' mean WER),
    latencies over every final, revisions summed; ``plans`` keeps each plan's WER by seed. ``logs``
    (if given) receives each set's stream logs of every plan."""
    from . import loadgen, scoring

    out = {}
    for name, clips in sets.items():
        if clips[0].language not in languages:
            continue
        pooled: list = []
        per_plan: dict[int, float] = {}
        for seed in range(args.seed, args.seed + args.accuracy_plans):
            plans = loadgen.plan_split(clips, args.accuracy_streams, _send_rate(args), args.pause, seed)
            longest = max(p.duration for p in plans) / args.speed
            _progress(f"accuracy: {name}, plan {seed}: {len(clips)} clips over {len(plans)} streams, ~{longest:.0f} s")
            suffix = "" if args.accuracy_plans == 1 else f"-seed{seed}"
            results, summary = await run_pass(url, plans, "granite", args, log_name=f"logs-accuracy-{name}{suffix}",
                                              keep_logs=None if logs is None else logs.setdefault(name, []),
                                              **_protocol_kwargs("granite", args))
            pooled += results
            per_plan[seed] = summary["wer"]
            _progress(f"accuracy: {name}, plan {seed}: WER {_pct(summary['wer'])}, p95 final latency "
                      f"{summary['final_latency']['p95']} s, revisions {summary['stable_revisions']}")
        summary = scoring.summarize(pooled, clips[0].language)
        summary["plans"] = per_plan
        summary["clips_detail"] = [c.to_json() for r in pooled for c in r.clips]
        out[name] = summary
    return out


def drops_stage(args, logs: dict[str, list], results: dict) -> None:
    """Words of the offline decode that the streaming finals drop or change, per cause
    (:func:`count_drops`), into ``results["sets"][name]["dropped_words"]``."""
    wanted = {name: (results["sets"][name].get("offline") or {}).get("engine", {}).get("texts")
              for name in logs}
    wanted = {name: texts for name, texts in wanted.items() if texts}
    if not wanted:
        return
    engine = offline_engine(args)
    try:
        for name, offline in wanted.items():
            _progress(f"dropped words: {name}: decoding each final's audio alone")
            summary = count_drops(engine, logs[name], offline)
            results["sets"][name]["dropped_words"] = summary
            _progress(f"dropped words: {name}: {summary['dropped']} of {summary['offline_words']} offline words: "
                      + ", ".join(f"{c} {n}" for c, n in summary["by_cause"].items()))
    finally:
        engine.close()


def level_verdict(summary: dict, args) -> tuple[bool, str]:
    from .scoring import as_float

    p95 = as_float(summary["final_latency"]["p95"])
    growth = summary.get("lag_growth_s")
    if summary["stream_failures"]:
        return False, f"{len(summary['stream_failures'])} stream(s) failed: {summary['stream_failures'][0]}"
    if not p95 <= args.bound:
        return False, f"p95 final latency {p95:.2f} s > {args.bound} s"
    if growth is not None and as_float(growth) > args.max_lag_growth:
        return False, f"final latency grew by {as_float(growth):.2f} s over the run"
    return True, f"p95 final latency {p95:.2f} s <= {args.bound} s"


async def sweep_stage(url: str, pid: int | None, protocol: str, label: str, args, clips: list[Clip]) -> dict:
    from . import loadgen, profiling
    from .servers import ResourceMonitor, SystemMonitor

    rate = _send_rate(args) if protocol == "granite" else 16_000
    levels_done: dict[int, dict] = {}
    metrics = profiling.metrics_url(url) if protocol == "granite" else None

    async def run_level(n: int) -> dict:
        """One level; re-run (up to --contention-retries times) while other processes took CPU meanwhile."""
        best: dict | None = None
        for attempt in range(1 + max(0, args.contention_retries)):
            summary = await measure_level(n)
            if pid is not None and not _alive(pid):
                summary["verdict"] += " (the server process died during the level)"
                best = summary
                break
            other = summary["machine_load"].get("other_cpu_percent")
            summary["attempt"] = attempt + 1
            if best is None or (other or 0) < (best["machine_load"].get("other_cpu_percent") or 0):
                best = summary
            if other is None or other <= args.contention_threshold:
                break
            _progress(f"sweep {label}: {n} streams: other processes used {other}% CPU meanwhile; measuring again")
        assert best is not None  # the loop runs at least once
        best["contended"] = (best["machine_load"].get("other_cpu_percent") or 0) > args.contention_threshold
        levels_done[n] = best
        return best

    async def measure_level(n: int) -> dict:
        plans = loadgen.plan_budget(clips, n, args.level_seconds, rate, args.pause, args.seed)
        monitor = ResourceMonitor(pid) if pid else contextlib.nullcontext()
        client = ResourceMonitor(_own_pid())
        raw = args.out / f"profile-{protocol}-{n}.raw"
        spy = profiling.pyspy(pid, raw) if args.profile and pid is not None else contextlib.nullcontext()
        loop = asyncio.get_running_loop()  # scrape off the loop: an in-process server answers on this loop
        before = await loop.run_in_executor(None, profiling.scrape, metrics) if metrics else {}
        with SystemMonitor() as machine, monitor as mon, client, spy as spied:
            _results, summary = await run_pass(url, plans, protocol, args, log_name=f"logs-{protocol}-{n}",
                                               **_protocol_kwargs(protocol, args))
        if metrics:
            after = await loop.run_in_executor(None, profiling.scrape, metrics)
            summary["engine_metrics"] = profiling.metrics_delta(before, after)
        if spied is not None and Path(spied).is_file():
            prof = profiling.summarize_raw(spied)
            summary["profile"] = {"raw": spied.name, "samples": prof["samples"], "self": prof["self"][:15],
                                  "inclusive": prof["inclusive"][:20]}
            (args.out / f"profile-{protocol}-{n}.txt").write_text(profiling.format_summary(prof, 25))
        ok, why = level_verdict(summary, args)
        summary["sustained"] = ok
        summary["verdict"] = why
        summary["server_resources"] = mon.summary() if mon is not None else None
        summary["loadgen_resources"] = client.summary()
        own = [client.cpu_seconds] + ([mon.cpu_seconds] if mon is not None and pid != _own_pid() else [])
        summary["machine_load"] = machine.summary(*own)
        fl = summary["final_latency"]
        _progress(f"sweep {label}: {n:>3} streams: p50 {fl['p50']} p95 {fl['p95']} s, WER {_pct(summary['wer'])}, "
                  f"server CPU {summary['server_resources'] and summary['server_resources']['cpu_percent']}%, "
                  f"other processes {summary['machine_load']['other_cpu_percent']}% "
                  f"-> {'OK' if ok else 'FAIL'} ({why})")
        return summary

    last_ok, first_fail = 0, None
    for n in args.levels:
        if pid is not None and not _alive(pid):
            _progress(f"sweep {label}: the server process {pid} is gone; stopping the sweep")
            break
        summary = await run_level(n)
        if summary["sustained"]:
            if first_fail is None:
                last_ok = n
        else:
            first_fail = first_fail or n
            if not args.keep_going:
                break
    if args.refine and first_fail is not None and first_fail - last_ok > 1 and first_fail > last_ok:
        lo, hi = last_ok, first_fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if (await run_level(mid))["sustained"]:
                lo = mid
            else:
                hi = mid
        last_ok = lo
    levels = [levels_done[n] | {"streams": n} for n in sorted(levels_done)]
    return {"label": label, "protocol": protocol, "levels": levels, "sustained_streams": last_ok,
            "first_failing_level": first_fail}


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_pid() -> int:
    import os

    return os.getpid()


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- orchestration ------------------------------------------------------------------------------


async def _with_server(args, body):
    """Run ``body(url, pid, info)`` against the server under test."""
    from . import servers

    if args.url:
        return await body(args.url, None, {"mode": "external", "url": args.url})
    # Faster than real time on purpose: the server's real-time throttle would measure itself.
    realtime_factor = 0 if args.speed > 1 else None
    if args.server == "inprocess" or args.engine_option:
        async with servers.granite_inprocess(args.engine, args.model, args.cpu_threads, args.max_batch,
                                             args.device, engine_options(args), args.early_final_ms,
                                             args.partial_refresh, realtime_factor) as handle:
            return await body(handle.url, handle.pid, handle.info)
    with servers.granite_subprocess(args.engine, args.model, args.cpu_threads, args.max_batch, args.device,
                                    log_path=args.out / "server.log", early_final_ms=args.early_final_ms,
                                    partial_refresh=args.partial_refresh, realtime_factor=realtime_factor) as handle:
        return await body(handle.url, handle.pid, handle.info)


def _engine_languages(args) -> tuple[list[str], str]:
    """Languages the engine under test recognises, without loading it twice when possible."""
    if args.engine == "granite":
        return ["en", "es", "fr", "de", "pt", "ja"], "granite"
    model = args.model or "tiny.en"
    if model.endswith(".en") or model in ("tiny.en",):
        return ["en"], model
    return ["en", "es", "fr", "de", "it", "pt"], model


async def run(args) -> dict:
    from .servers import machine_info

    sets = load_clips(args)
    if not sets:
        raise SystemExit("granite-stream bench: no clips selected")
    languages, model_label = _engine_languages(args)
    skipped = {name: f"engine model {model_label} does not recognise {clips[0].language!r}; use --model base"
               for name, clips in sets.items() if clips[0].language not in languages}
    for name, why in skipped.items():
        _progress(f"skipping {name}: {why}")
    results: dict = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "sets": {name: {"clips": len(clips), "language": clips[0].language,
                        "audio_seconds": round(sum(datasets.audio_duration(c) for c in clips), 1),
                        "skipped": skipped.get(name)} for name, clips in sets.items()},
    }
    if not args.no_offline and not args.url:
        offline = run_offline_stage(args, sets, languages)
        for name, r in offline.items():
            results["sets"][name]["offline"] = r
        save_results(results, args.out)

    sweep_name = args.sweep_set or next((n for n in sets if n not in skipped), None)

    accuracy_logs: dict[str, list] = {}

    async def body(url: str, pid: int | None, info: dict):
        results["server"] = {"url": url, **info}
        if not args.no_accuracy:
            streaming = await accuracy_stage(url, args, sets, languages, accuracy_logs)
            for name, summary in streaming.items():
                results["sets"][name]["streaming"] = summary
            save_results(results, args.out)
        if not args.no_sweep and sweep_name:
            results["sweep"] = {"set": sweep_name, "bound_s": args.bound, "level_seconds": args.level_seconds,
                                "pause_s": list(args.pause), "systems": {}}
            results["sweep"]["systems"]["granite-stream"] = await sweep_stage(
                url, pid, "granite", "granite-stream", args, sets[sweep_name])
            save_results(results, args.out)

    await _with_server(args, body)
    if not args.no_drops and accuracy_logs and not args.url:
        drops_stage(args, accuracy_logs, results)
        save_results(results, args.out)

    if not args.no_sweep and sweep_name and "whisperlive" in args.peers:
        results.setdefault("sweep", {"set": sweep_name, "bound_s": args.bound, "level_seconds": args.level_seconds,
                                     "systems": {}})
        results["sweep"]["systems"]["whisperlive"] = await whisperlive_stage(args, sets[sweep_name])
    from .report import add_comparisons

    add_comparisons(results)
    return results


async def whisperlive_stage(args, clips: list[Clip]) -> dict:
    from . import peers
    from .loadgen import plan_budget, run_streams

    problem = peers.whisperlive_available()
    if problem:
        _progress(f"whisperlive: not run: {problem}")
        return {"label": "WhisperLive", "error": problem, "levels": [], "sustained_streams": None}
    max_clients = max(args.levels) + 1
    with peers.whisperlive_server(max_clients=max_clients, log_path=args.out / "whisperlive.log") as handle:
        # WhisperLive loads its model when the first client connects: warm it up outside the measurement.
        warm = plan_budget(clips[:1], 1, 1.0, 16_000, (0.5, 0.5))
        await run_streams(handle.url, warm, "whisperlive", speed=4.0, model=peers.default_model_path(), drain_s=0.0)
        out = await sweep_stage(handle.url, handle.pid, "whisperlive", "WhisperLive", args, clips)
        out["server"] = handle.info
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install-peers"]:
        from .peers import install_peers

        return install_peers()
    if argv[:1] == ["diarization"]:
        from .diarization import main as diarization_main

        return diarization_main(argv[1:])
    if argv[:1] == ["report"]:
        from .report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["replay"]:
        from .replay import main as replay_main

        return replay_main(argv[1:])
    if argv[:1] == ["word-timing"]:
        from .word_timing import main as word_timing_main

        return word_timing_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not 20 <= args.frame_ms <= 100:
        print("granite-stream bench: --frame-ms must be within 20–100", file=sys.stderr)
        return 2
    if args.accuracy_plans < 1:
        print("granite-stream bench: --accuracy-plans must be at least 1", file=sys.stderr)
        return 2
    if args.speed <= 0:
        print("granite-stream bench: --speed must be positive", file=sys.stderr)
        return 2
    unknown = set(args.peers) - {"whisperlive"}
    if unknown:
        print(f"granite-stream bench: unknown peer(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    args.out = args.out or Path("bench-results") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    results = asyncio.run(run(args))
    path = save_results(results, args.out)
    from .report import render

    render(results, args.out, plots=not args.no_plots)
    print(f"results: {path}", file=sys.stderr)
    return 0


def save_results(results: dict, out: Path) -> Path:
    """Write (or rewrite, after each stage) ``results.json``; an interrupted run keeps what it measured."""
    from .report import add_comparisons

    add_comparisons(results)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else None
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
