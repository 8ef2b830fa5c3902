"""Terminal table and PNG plots from a ``results.json`` written by ``granite-stream bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .scoring import as_float

SECONDARY_BOUNDS = (1.5, 2.0, 3.0, 5.0, 10.0)
"""Further p95-final bounds (s) the sweep's levels are read against (``sustained_at_bounds``)."""

WER_RATIO_TARGET = 1.05
"""Streaming finals' WER over the engine's offline WER of the same clips, on every set (issue #16;
the first benchmark's target was 1.03)."""


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _s(x) -> str:
    if x is None:
        return "—"
    v = as_float(x)
    return "inf" if v == float("inf") else f"{v:.2f}"


def _ledger_cell(drops: dict) -> str:
    ledger = drops.get("stable_ledger")
    return "—" if ledger is None else f"{ledger['saved']}/{ledger['lost']}"


def _dropped_cell(drops: dict, cause: str | None) -> str:
    """A dropped-word count (all causes when ``cause`` is None), as ``n/r`` where ``r`` of the ``n``
    were right in the offline decode (when the count knows)."""
    n = drops["dropped"] if cause is None else drops["by_cause"].get(cause, 0)
    right = drops.get("right_by_cause")
    if right is None:
        return str(n)
    return f"{n}/{sum(right.values()) if cause is None else right.get(cause, 0)}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def tables(results: dict) -> str:
    out: list[str] = []
    m = results.get("machine", {})
    out.append(f"machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_gb')} GiB RAM"
               + (f", GPU {m['gpu']}" if m.get("gpu") else ""))
    server = results.get("server", {})
    if server:
        out.append(f"server: {server.get('mode')} {server.get('engine', {}).get('model', '') if isinstance(server.get('engine'), dict) else ''} {server.get('url', '')}")
    rows = []
    for name, entry in results.get("sets", {}).items():
        if entry.get("skipped"):
            rows.append([name, str(entry["clips"]), "skipped", "", "", "", "", "", "", ""])
            continue
        st = entry.get("streaming") or {}
        off = entry.get("offline") or {}
        ratio = entry.get("wer_ratio") or {}
        fl = st.get("final_latency") or {}
        rows.append([
            name, str(entry["clips"]), _pct(st.get("wer")), _pct((off.get("engine") or {}).get("wer")),
            _pct((off.get("faster_whisper") or {}).get("wer")),
            _s(ratio.get("engine")) + " / " + _s(ratio.get("faster_whisper")),
            _s(fl.get("p50")) + " / " + _s(fl.get("p95")),
            _s((st.get("first_partial_latency") or {}).get("p50")),
            _s((st.get("partial_lag") or {}).get("p95")),
            str(st.get("stable_revisions", "—")),
        ])
    out.append("")
    config = results.get("config", {})
    out.append(f"accuracy (streaming: every clip once per stream plan, over {config.get('accuracy_streams', '?')} "
               f"concurrent real-time streams, {config.get('accuracy_plans', 1)} plan(s) pooled; offline: whole clips)")
    out.append(_table(["set", "clips", "stream WER", "offline WER (engine)", "offline WER (faster-whisper)",
                       "ratio eng/fw", "final p50/p95 s", "1st partial p50 s", "partial lag p95 s", "revisions"],
                      rows))
    per_plan = []
    for name, entry in results.get("sets", {}).items():
        plans = (entry.get("streaming") or {}).get("plans") or {}
        offline_wer = ((entry.get("offline") or {}).get("engine") or {}).get("wer")
        if len(plans) > 1:
            per_plan.append(f"  {name}: " + ", ".join(
                f"{seed}: {_pct(wer)}" + (f" ({wer / offline_wer:.3f})" if offline_wer else "")
                for seed, wer in plans.items()))
    if per_plan:
        out.append("stream WER per plan (seed: WER (ratio to the engine's offline WER)); the table pools them")
        out.extend(per_plan)
    drops = {name: e["dropped_words"] for name, e in results.get("sets", {}).items() if e.get("dropped_words")}
    if drops:
        from .scoring import DROP_CAUSES

        out.append("")
        out.append("words of the offline decode dropped or changed by the streaming finals, per cause "
                   "(docs/benchmarks.md)")
        out.append("(a cell 'n/r': n dropped, r of them right in the offline decode, against the reference; "
                   "stable saved/lost: reference words the stable words kept that the final's own decode "
                   "missed / missed that it had)")
        out.append(_table(["set", "offline words", "dropped"] + list(DROP_CAUSES) + ["stable saved/lost"],
                          [[name, str(d["offline_words"]), _dropped_cell(d, None)]
                           + [_dropped_cell(d, c) for c in DROP_CAUSES] + [_ledger_cell(d)]
                           for name, d in drops.items()]))
    sweep = results.get("sweep")
    if sweep:
        out.append("")
        out.append(f"capacity sweep on {sweep['set']} ({sweep['level_seconds']:.0f} s of speech per stream, "
                   f"bound p95 final latency <= {sweep['bound_s']} s)")
        rows = []
        for system in sweep["systems"].values():
            if system.get("error"):
                rows.append([system["label"], "—", "not run: " + system["error"], "", "", "", "", "", "", ""])
                continue
            for lvl in system["levels"]:
                fl = lvl["final_latency"]
                res = lvl.get("server_resources") or {}
                rows.append([
                    system["label"], str(lvl["streams"]), f"{_s(fl['p50'])} / {_s(fl['p95'])}",
                    _s((lvl.get("partial_lag") or {}).get("p95")), _s(lvl.get("lag_growth_s")),
                    _pct(lvl.get("wer")) + " / " + _pct(lvl.get("stream_wer")),
                    f"{res.get('cpu_percent', '—')}", f"{res.get('rss_peak_mb', '—')}",
                    f"{(lvl.get('machine_load') or {}).get('other_cpu_percent', '—')}",
                    ("OK" if lvl["sustained"] else "FAIL") + f" ({lvl['verdict']})"
                    + (" [contended]" if lvl.get("contended") else ""),
                ])
        out.append(_table(["system", "streams", "final p50/p95 s", "lag p95 s", "lag growth s",
                           "WER clip/stream", "server CPU %", "RSS MB", "other procs CPU %", "verdict"], rows))
        for system in sweep["systems"].values():
            if not system.get("error"):
                out.append(f"{system['label']}: sustained {system['sustained_streams']} streams")
        bounds = [s.get("sustained_at_bounds") for s in sweep["systems"].values() if s.get("sustained_at_bounds")]
        if bounds:
            keys = list(bounds[0])
            out.append("")
            out.append("streams sustained (p95 final latency within the bound, every smaller tested level too)")
            out.append(_table(["system"] + [f"<= {k} s" for k in keys],
                              [[s["label"]] + [str(s["sustained_at_bounds"].get(k, "—")) for k in keys]
                               for s in sweep["systems"].values() if s.get("sustained_at_bounds")]))
    targets = results.get("targets")
    if targets:
        out.append("")
        out.append("targets: " + ", ".join(f"{k}={v}" for k, v in targets.items()))
    return "\n".join(out)


def draw_plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    sweep = results.get("sweep")
    if sweep and any(s.get("levels") for s in sweep["systems"].values()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        styles = {"p50": "--", "p95": "-"}
        colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red"])
        for key, system in sweep["systems"].items():
            levels = system.get("levels") or []
            if not levels:
                continue
            color = next(colors)
            x = [lvl["streams"] for lvl in levels]
            for q, style in styles.items():
                y = [min(as_float(lvl["final_latency"][q]), 120.0) for lvl in levels]
                ax.plot(x, y, style, color=color, marker="o" if q == "p95" else ".",
                        label=f"{system['label']} final {q}")
        ax.axhline(sweep["bound_s"], color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], sweep["bound_s"], f" bound {sweep['bound_s']} s", va="bottom", fontsize=8)
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        all_x = sorted({lvl["streams"] for s in sweep["systems"].values() for lvl in s.get("levels") or []})
        ax.set_xticks(all_x, [str(v) for v in all_x])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent real-time streams")
        ax.set_ylabel("final latency (s, log)")
        ax.set_title(f"Final latency vs concurrent streams ({sweep['set']})")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out_dir / "latency_vs_streams.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    names = [n for n, e in results.get("sets", {}).items() if e.get("streaming")]
    if names:
        series = [("streaming", lambda e: (e.get("streaming") or {}).get("wer")),
                  ("offline engine", lambda e: ((e.get("offline") or {}).get("engine") or {}).get("wer")),
                  ("offline faster-whisper", lambda e: ((e.get("offline") or {}).get("faster_whisper") or {}).get("wer")),
                  ("offline faster-whisper greedy",
                   lambda e: ((e.get("offline") or {}).get("faster_whisper_greedy") or {}).get("wer"))]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / len(series)
        for i, (label, get) in enumerate(series):
            values = [get(results["sets"][n]) for n in names]
            xs = [j + i * width for j in range(len(names))]
            ys = [100 * v if v is not None else 0 for v in values]
            bars = ax.bar(xs, ys, width, label=label)
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{100 * v:.1f}",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel("WER (%)")
        ax.set_title("Streaming vs offline WER (same clips, same normalizer)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "wer_streaming_vs_offline.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def render(results: dict, out_dir: Path, plots: bool = True) -> None:
    """Print the tables; draw the PNG plots into ``out_dir``."""
    print(tables(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        plots = False
    if plots:
        for path in draw_plots(results, Path(out_dir)):
            print(f"plot: {path}", file=sys.stderr)


def add_comparisons(results: dict) -> None:
    """Add ratios and target checks to ``results`` (in place), computed once so the table, the plots and
    the docs agree; ``bench`` calls it after a run, ``bench report`` on a stored results.json."""
    for name, entry in results["sets"].items():
        streaming = entry.get("streaming")
        offline = entry.get("offline") or {}
        if streaming and streaming.get("wer") is not None:
            entry["wer_ratio"] = {
                mode: (round(streaming["wer"] / r["wer"], 4) if r.get("wer") else None)
                for mode, r in offline.items()
            }
    sweep = results.get("sweep")
    targets = {}
    if sweep:
        # The same levels read against other bounds: the largest tested count whose level and every
        # smaller tested level kept p95 final latency within the bound (">=" when the last level passed).
        for system in sweep["systems"].values():
            levels = [lvl for lvl in system.get("levels") or [] if "final_latency" in lvl]
            table = {}
            for bound in SECONDARY_BOUNDS:
                best, capped = 0, False
                for lvl in sorted(levels, key=lambda x: x["streams"]):
                    p95 = as_float(lvl["final_latency"]["p95"])
                    if lvl.get("stream_failures") or not p95 <= bound:
                        break
                    best = lvl["streams"]
                else:
                    capped = bool(levels)
                table[str(bound)] = f">={best}" if capped and best else best
            system["sustained_at_bounds"] = table
        ours = sweep["systems"].get("granite-stream", {})
        peer = sweep["systems"].get("whisperlive", {})
        targets["sustained_streams"] = ours.get("sustained_streams")
        targets["streams_target_met"] = (ours.get("sustained_streams") or 0) >= 4
        if peer and peer.get("sustained_streams") is not None:
            theirs = peer["sustained_streams"]
            targets["whisperlive_sustained_streams"] = theirs
            targets["vs_whisperlive"] = (round(ours.get("sustained_streams", 0) / theirs, 2) if theirs else "inf")
            targets["vs_whisperlive_target_met"] = (ours.get("sustained_streams") or 0) >= 2 * theirs and \
                (ours.get("sustained_streams") or 0) > 0
    ratios = [e["wer_ratio"].get("engine") for e in results["sets"].values()
              if e.get("wer_ratio") and e["wer_ratio"].get("engine") is not None]
    if ratios:
        targets["wer_ratio_vs_engine_offline_max"] = max(ratios)
        targets["wer_ratio_target"] = WER_RATIO_TARGET
        targets["wer_ratio_target_met"] = max(ratios) <= WER_RATIO_TARGET
    drops = [e["dropped_words"] for e in results["sets"].values() if e.get("dropped_words")]
    if drops:
        streaming_path = sum(d["by_cause"]["stable"] + d["by_cause"]["splice"] for d in drops)
        targets["dropped_words"] = sum(d["dropped"] for d in drops)
        targets["dropped_words_stable_or_splice"] = streaming_path
        if all("right_by_cause" in d for d in drops):
            # The target counts words the speaker said: a "dropped" word the offline decode had
            # wrong (its "start" where the streaming final says "star") is no loss.
            lost = sum(d["right_by_cause"]["stable"] + d["right_by_cause"]["splice"] for d in drops)
            targets["dropped_right_words_stable_or_splice"] = lost
            # Beside it, what the stable words saved as well as lost against the reference (not a target).
            if all("stable_ledger" in d for d in drops):
                targets["stable_words_saved_lost"] = [sum(d["stable_ledger"][side] for d in drops)
                                                      for side in ("saved", "lost")]
            targets["dropped_words_stable_or_splice_target_met"] = lost == 0
        else:
            targets["dropped_words_stable_or_splice_target_met"] = streaming_path == 0
    revisions = [e["streaming"]["stable_revisions"] for e in results["sets"].values() if e.get("streaming")]
    if sweep:
        revisions += [lvl["stable_revisions"] for lvl in sweep["systems"].get("granite-stream", {}).get("levels", [])]
    if revisions:
        targets["stable_revisions"] = sum(revisions)
        targets["stable_revisions_target_met"] = sum(revisions) == 0
    results["targets"] = targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-stream bench report",
                                     description="Print the tables and redraw the plots of a results.json")
    parser.add_argument("results", type=Path)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    add_comparisons(results)  # ratios, targets and bound tables from the stored levels
    render(results, args.results.parent, plots=not args.no_plots)
    return 0
