"""Load test of the server: `python -m t2i_jax.serve.load [--clients 32] [--requests 2] [--steps 20]`.

Starts two servers on free loopback ports (bundled model unless --model), one batching across
requests (--batch-sizes 1,2,4,8) and one serving a request at a time (--batch-sizes 1), sends the
same requests to each in alternating rounds (C concurrent clients x R requests, each its own prompt
and seed), checks every one succeeded with its own seed (none lost, none duplicated), and prints
throughput, the ratio, and p50/p95 latency as one JSON line. `--sigterm` then starts one more server, sends
SIGTERM in the middle of the load and reports how each request ended (200, 503, or refused after
the process exited): nothing may hang.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def start_server(extra: Sequence[str], *, timeout: float = 600.0, env: dict | None = None):
    """`python -m t2i_jax.serve --port 0 EXTRA` in a subprocess; (process, base URL, stderr lines queue)
    once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "t2i_jax.serve", "--port", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    log = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError("the server exited before serving:\n" + "".join(log[-30:]))
        log.append(line)
        m = re.search(r"serving on (http://\S+?)/ ", line)
        if m:
            return proc, m.group(1), lines, log
    proc.kill()
    raise RuntimeError("the server did not start in time:\n" + "".join(log[-30:]))


def request_body(client: int, k: int, steps: int, seed_base: int = 1000, tag: str = "") -> dict:
    """The k-th request of a client: its own prompt, seed and task id (`tag`: the round's, in the id)."""
    n = client * 100 + k
    shapes = ("red circle", "blue square", "green triangle", "yellow star")
    return {"prompt": f"a {shapes[n % 4]} number {n}", "seed": seed_base + n, "steps": steps,
            "sampler_name": "Euler a", "cfg_scale": 7, "force_task_id": f"load{tag}-{client}-{k}"}


def run_load(url: str, clients: int, requests: int, steps: int, *, timeout: float = 600.0,
             during=None, tag: str = "") -> list[dict]:
    """C clients x R requests, each client sending its next request when the last one is answered. One
    record per request: status, latency, and whether the answer carried the request's own seed and task.
    `during(records)`: called from another thread while the load runs (the SIGTERM check)."""
    import httpx

    records: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=timeout) as h:
            for k in range(requests):
                body = request_body(c, k, steps, tag=tag)
                t0 = time.perf_counter()
                rec = {"client": c, "k": k, "task": body["force_task_id"], "seed": body["seed"]}
                try:
                    r = h.post("/sdapi/v1/txt2img", json=body)
                    rec["status"] = r.status_code
                    if r.status_code == 200:
                        info = json.loads(r.json()["info"])
                        rec["ok"] = (info["all_seeds"] == [body["seed"]] and info["task_id"] == body["force_task_id"]
                                     and len(r.json()["images"]) == 1)
                        rec["batches"] = info.get("device_batches")
                    else:
                        rec["detail"] = r.json().get("detail")
                except httpx.ConnectError:
                    rec["status"] = "refused"
                except httpx.TimeoutException:
                    rec["status"] = "timeout"
                except httpx.HTTPError as e:  # the connection dropped mid-answer
                    rec["status"] = f"error: {type(e).__name__}"
                rec["latency"] = time.perf_counter() - t0
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        threading.Thread(target=during, args=(records,), daemon=True).start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r in records:
        r["wall"] = wall
    return records


def summary(records: list[dict]) -> dict:
    """Counts, throughput and latency percentiles of a load run."""
    import numpy as np

    ok = [r for r in records if r.get("status") == 200 and r.get("ok")]
    lat = np.array([r["latency"] for r in ok]) if ok else np.zeros(1)
    wall = records[0]["wall"] if records else 0.0
    sizes = [b[0] for r in ok for b in (r.get("batches") or [])]
    return {"requests": len(records), "ok": len(ok), "unique_tasks": len({r["task"] for r in ok}),
            "wall_s": round(wall, 2), "images_per_s": round(len(ok) / wall, 3) if wall else 0.0,
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "mean_device_batch": round(float(np.mean(sizes)), 2) if sizes else None}


def compare(clients: int, requests: int, steps: int, extra: Sequence[str] = (), rounds: int = 2) -> dict:
    """The same load against a batching server and a one-at-a-time server, both running, in alternating
    rounds (batched, one at a time, batched, ...) so a change in the machine's load falls on both; the
    summary of each server's rounds together, each round's images/s, and the ratio."""
    servers = {}
    try:
        for name, sizes in (("batched", "1,2,4,8"), ("one_at_a_time", "1")):
            proc, url, _, _ = start_server(["--batch-sizes", sizes, "--warm-steps", str(steps), "--devices", "1",
                                            "--max-queue", str(max(64, clients * 2)), *extra])
            servers[name] = (proc, url)
            # Warm: the first calls of each program pay their set-up.
            run_load(url, min(clients, 4), 1, steps, tag="warm")
        records = {name: [] for name in servers}
        per_round = {name: [] for name in servers}
        for round_no in range(rounds):
            for name, (_, url) in servers.items():
                recs = run_load(url, clients, requests, steps, tag=f"r{round_no}")
                per_round[name].append(summary(recs)["images_per_s"])
                records[name].append(recs)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(timeout=120)
    out = {}
    for name, runs in records.items():
        flat = [r for recs in runs for r in recs]
        wall = sum(recs[0]["wall"] for recs in runs)
        for r in flat:
            r["wall"] = wall
        out[name] = {**summary(flat), "rounds_images_per_s": per_round[name]}
    out["ratio"] = round(out["batched"]["images_per_s"] / out["one_at_a_time"]["images_per_s"], 2)
    return out


def sigterm_during_load(clients: int, requests: int, steps: int, extra: Sequence[str] = (),
                        env: dict | None = None) -> dict:
    """SIGTERM once the first answer is in; every request must end 200, 503 or refused (after the exit),
    and the process must exit 0."""
    proc, url, _, _ = start_server(["--batch-sizes", "4", "--warm-steps", str(steps), "--devices", "1", *extra],
                                   env=env)
    sent = {}

    def during(records):
        while not records:
            time.sleep(0.01)
        sent["at"] = time.perf_counter()
        proc.send_signal(signal.SIGTERM)

    try:
        records = run_load(url, clients, requests, steps, timeout=300, during=during)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    ends = {}
    for r in records:
        ends[str(r["status"])] = ends.get(str(r["status"]), 0) + 1
    return {"requests": len(records), "ends": ends, "exit_code": code,
            "ok_and_own": all(r.get("ok") for r in records if r["status"] == 200),
            "503_details": sorted({r.get("detail") for r in records if r["status"] == 503})}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the comparison (and the SIGTERM run) as JSON lines."""
    p = argparse.ArgumentParser(prog="python -m t2i_jax.serve.load", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    p.add_argument("--sigterm", action="store_true", help="also SIGTERM a server during the load")
    p.add_argument("server_args", nargs="*", help="more flags for the servers (after --)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    out = compare(args.clients, args.requests, args.steps, args.server_args, rounds=args.rounds)
    print(json.dumps(out))
    if args.sigterm:
        print(json.dumps({"sigterm": sigterm_during_load(args.clients, args.requests, args.steps, args.server_args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
