"""`--profile DIR`: a profiler trace of a few calls of each mode, and what the
accelerator spent its time on.

The trace is `jax.profiler.trace`'s (open it in Perfetto, or in TensorBoard /
XProf with the profile plugin). `summarize` reads the Chrome-trace copy that
the profiler writes beside the XSpace (`*.trace.json.gz`) and adds up, over
the device lanes (processes named "/device:...", one per accelerator), the
time of each kernel or XLA op. It reports the top ones and how busy the
device was between the first and last event: a busy fraction well under 1
means the device waits on the host (dispatch, Python, transfers). On CPU,
XLA runs on host threads and the trace holds no device lanes, so the summary
says so and holds only the files.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax


def capture(call: Callable[[], Any], sync: Callable[[Any], Any], iters: int, log_dir: str | Path,
            top: int = 15) -> dict:
    """Runs `call` `iters` times (each `sync`ed) inside a profiler trace
    written under `log_dir`; returns where it went and `summarize` of it."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.rglob("*.trace.json.gz"))
    with jax.profiler.trace(str(log_dir)):
        for i in range(iters):
            with jax.profiler.TraceAnnotation(f"bench_iter_{i}"):
                sync(call())
    new = sorted(set(log_dir.rglob("*.trace.json.gz")) - before)
    out: dict = {"log_dir": str(log_dir), "iters": iters,
                 "files": sorted(str(p) for p in log_dir.rglob("*") if p.is_file())}
    if not new:
        out["summary"] = {"note": "the profiler wrote no Chrome trace (*.trace.json.gz)"}
        return out
    out["trace"] = str(new[-1])
    out["summary"] = summarize(new[-1], iters=iters, top=top)
    return out


def _load(path: str | Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _pick_lane(threads: dict) -> tuple[str, set] | None:
    """Which lines of a device's process to add up, so that no time counts
    twice: the profiler's derived "XLA Ops" line where there is one (one
    event per HLO op, on GPU and TPU), else the GPU's "Stream ..." lines (one
    event per kernel), else every line (None)."""
    for label, match in (("XLA Ops", lambda n: n == "XLA Ops"), ("streams", lambda n: n.startswith("Stream"))):
        tids = {t for t, n in threads.items() if match(n)}
        if tids:
            return label, tids
    return None


def summarize(trace: str | Path | dict, *, iters: int = 1, top: int = 15) -> dict:
    """Device time per op and device busy fraction from a Chrome trace.

    Ops are named by the event's `hlo_op` argument where the profiler gives
    one (the XLA instruction a kernel belongs to), else by the event name
    (the kernel). Times are per profiled iteration, for the first device.
    """
    data = trace if isinstance(trace, dict) else _load(trace)
    events = data.get("traceEvents", [])
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = sorted(pid for pid, n in names.items() if n.startswith("/device:"))
    if not devices:
        return {"device": None, "note": "no device lanes in the trace (XLA:CPU runs on host threads)",
                "processes": sorted(names.values())}
    pid = devices[0]
    threads = {e.get("tid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") == pid}
    lane = _pick_lane(threads)
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid and "dur" in e
             and (lane is None or e.get("tid") in lane[1])]
    if not spans:
        return {"device": names[pid], "note": "the device lane holds no timed events"}
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in spans:
        args = e.get("args") or {}
        key = args.get("hlo_op") or e.get("name", "?")
        per_op[key][0] += float(e["dur"])
        per_op[key][1] += 1
    busy = _union_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in spans])
    first = min(float(e["ts"]) for e in spans)
    last = max(float(e["ts"]) + float(e["dur"]) for e in spans)
    kernel_total = sum(v[0] for v in per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    return {
        "device": names[pid],
        "device_lanes": len(devices),
        "lines": lane[0] if lane else "all",
        "events": len(spans),
        "span_ms_per_iter": (last - first) / 1e3 / iters,
        "busy_ms_per_iter": busy / 1e3 / iters,
        "busy_fraction": busy / (last - first) if last > first else None,
        "top": [{"op": k, "ms_per_iter": v[0] / 1e3 / iters, "calls_per_iter": v[1] / iters,
                 "share": v[0] / kernel_total if kernel_total else None} for k, v in ranked[:top]],
    }


def format_summary(mode: str, impl: str, prof: dict, top: int = 10) -> list[str]:
    """Lines for the text report."""
    s = prof.get("summary", {})
    head = f"profile {mode}/{impl}: {prof.get('trace') or prof['log_dir']}"
    if not s.get("top"):
        return [head, f"  {s.get('note', 'no summary')}"]
    lines = [head, f"  device {s['device']}: busy {s['busy_ms_per_iter']:.2f} of {s['span_ms_per_iter']:.2f} "
                   f"ms per iteration ({s['busy_fraction']:.1%})"]
    for row in s["top"][:top]:
        lines.append(f"  {row['share']:6.1%} {row['ms_per_iter']:9.3f} ms {row['calls_per_iter']:7.1f}x  "
                     f"{row['op'][:90]}")
    return lines
