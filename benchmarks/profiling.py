"""Sampling profiles of a server process during a benchmark level (py-spy), and /metrics deltas.

``py-spy record --idle --format raw`` writes collapsed stacks (``frame;frame;… count``) of every
thread at every sample. A native call such as CTranslate2's ``encode`` is charged to the Python
line that made it — with ``--idle`` even while the calling thread sleeps on CTranslate2's own
worker threads, which py-spy would otherwise count as idle and drop. Samples whose innermost
frame is a wait (``select``, ``Condition.wait``, ``sleep``, lock ``acquire``) are then removed as
idle, and the rest is grouped by innermost frame (self) and by every frame on the stack
(inclusive), as shares of busy samples.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_path() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.is_file() else shutil.which("py-spy")


@contextlib.contextmanager
def pyspy(pid: int, raw_path: Path, rate: int = 50):
    """Record ``pid`` while the block runs; yields the output path (or None without py-spy)."""
    exe = pyspy_path()
    if exe is None:
        yield None
        return
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw_path), "--rate", str(rate),
           "--threads", "--idle", "--nonblocking"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield raw_path
    finally:
        import signal

        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file}{':' + m.group('line') if m.group('line') else ''})"


def _function(frame: str) -> str:
    """Frame without its line number, for inclusive totals."""
    return re.sub(r":\d+\)$", ")", _short(frame))


_IDLE_LEAVES = re.compile(r"^(?:[\w<>]+\.)*(select|poll|epoll|wait|_wait_for_tstate_lock|sleep|acquire|accept|"
                          r"recv|recv_into|join) \(|^_worker \(concurrent/futures/thread\.py"
                          r"|^Assembler\.get_next_frame \(websockets/sync/")


def summarize_raw(raw_path: Path, top: int = 25) -> dict:
    """Self and inclusive shares of busy samples by frame, and busy samples per thread."""
    self_counts: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    idle = 0
    for line in Path(raw_path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = None
        if frames and (frames[0].startswith("thread ") or frames[0].startswith("process ")):
            thread = frames[0]
            frames = frames[1:]
        if not frames:
            continue
        if _IDLE_LEAVES.match(frames[-1].strip()):
            idle += n
            continue
        if thread:
            threads[thread] += n
        total += n
        self_counts[_short(frames[-1])] += n
        for func in {_function(f) for f in frames}:
            inclusive[func] += n

    def share(counter):
        return [{"frame": k, "share": round(v / total, 4), "samples": v} for k, v in counter.most_common(top)]

    return {"samples": total, "idle_samples": idle, "self": share(self_counts), "inclusive": share(inclusive),
            "threads": {k: v for k, v in threads.most_common()}}


def format_summary(summary: dict, top: int = 15) -> str:
    lines = [f"{summary['samples']} busy samples ({summary.get('idle_samples', 0)} idle samples left out)"]
    lines.append("self (innermost frame):")
    lines += [f"  {e['share'] * 100:5.1f}%  {e['frame']}" for e in summary["self"][:top]]
    lines.append("inclusive (on the stack):")
    lines += [f"  {e['share'] * 100:5.1f}%  {e['frame']}" for e in summary["inclusive"][:top]]
    return "\n".join(lines)


# ---- /metrics ----------------------------------------------------------------------------------


def metrics_url(ws_url: str) -> str:
    http = "http" + ws_url[2:] if ws_url.startswith("ws") else ws_url
    base = http.split("/v1/", 1)[0]
    return base.rstrip("/") + "/metrics"


def scrape(url: str) -> dict[str, float]:
    """Flat ``{sample name{labels}: value}`` from a Prometheus text endpoint ({} when unreachable)."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except Exception:  # noqa: BLE001
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            le = sample.labels.get("le")
            key = sample.name + (f"{{{labels}}}" if labels else "") + (f"[le={le}]" if le else "")
            out[key] = sample.value
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """Engine-side facts for one level: batches, mean batch size, engine busy time, per-kind inference time."""
    if not after:
        return {}

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = d("granite_stream_batch_size_count")
    out: dict[str, object] = {
        "batches": int(batches),
        "mean_batch_size": round(d("granite_stream_batch_size_sum") / batches, 2) if batches else None,
        "engine_busy_seconds": round(d("granite_stream_engine_seconds_sum"), 2),
        "finals": int(d("granite_stream_finals_total")),
        "partials": int(d("granite_stream_partials_total")),
    }
    for kind in ("final", "partial"):
        n = d(f"granite_stream_inference_seconds_count{{kind={kind}}}")
        s = d(f"granite_stream_inference_seconds_sum{{kind={kind}}}")
        out[f"{kind}_requests"] = int(n)
        out[f"{kind}_submit_to_result_mean_s"] = round(s / n, 3) if n else None
    errors = {k.split("code=", 1)[1].rstrip("}"): int(d(k)) for k in after if k.startswith("granite_stream_errors_total{")}
    out["errors_by_code"] = {k: v for k, v in errors.items() if v}
    return out
