"""Run N processes of one command on this machine, joined by jax.distributed (coordinator on 127.0.0.1).

    python launch/local_multiprocess.py -n 2 -- python -m t2i_jax.train --config configs/shapes_ldm.py --workdir runs/mp
    python launch/local_multiprocess.py -n 2 --devices-per-process 4 --cpu -- python -m t2i_jax.train ...

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (bound to loopback
only), JAX_NUM_PROCESSES, JAX_PROCESS_ID, which `t2i_jax.parallel.
initialize_distributed` (the trainer's `--distributed=auto`) reads. On GPUs,
process i sees its own `--gpus-per-process` devices (CUDA_VISIBLE_DEVICES);
with `--cpu` each process gets `--devices-per-process` CPU devices and gloo
collectives (what the tests use to check multi-process training on one CPU
machine). Output of process i is prefixed "[i]". Exits with the first
non-zero return code; if one process fails, the others are stopped.
`--idle-timeout S` stops them all (status 124) when none has printed a line for S
seconds: a hang, told apart from a slow run on a loaded machine by progress,
not by the wall clock.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, *, cpu: bool, devices_per_process: int, gpus_per_process: int,
                base: dict | None = None) -> dict:
    """The environment of process i of n."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
        # Replace (not append to) any device-count flag inherited from the parent.
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    elif gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * gpus_per_process + k) for k in range(gpus_per_process))
    return env


def _pump(i: int, stream, out, last: list) -> None:
    for line in iter(stream.readline, b""):
        last[0] = time.monotonic()
        out.write(f"[{i}] ".encode() + line)
        out.flush()


def launch(cmd: list[str], n: int, *, cpu: bool = False, devices_per_process: int = 1, gpus_per_process: int = 0,
           timeout: float | None = None, idle_timeout: float | None = None, cwd: str | None = None,
           env: dict | None = None) -> int:
    """Runs `cmd` as n processes; returns 0 or the first failing return code (124 when `timeout`
    seconds passed, or `idle_timeout` seconds without a line of output from any process)."""
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=process_env(i, n, port, cpu=cpu, devices_per_process=devices_per_process,
                                              gpus_per_process=gpus_per_process, base=env))
             for i in range(n)]
    last = [time.monotonic()]  # when any process last printed a line
    pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout.buffer, last), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    deadline = None if timeout is None else time.time() + timeout
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            idle = idle_timeout is not None and time.monotonic() - last[0] > idle_timeout
            if failed or idle or (deadline is not None and time.time() > deadline):
                rc = failed[0] if failed else 124
                if not failed:
                    why = f"no output for {idle_timeout:g} s" if idle else f"{timeout:g} s passed"
                    print(f"local_multiprocess: stopping all processes ({why})", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    return rc or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [-n N] [--cpu] [--devices-per-process K] -- COMMAND ...")
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="CPU devices with gloo collectives (tests, laptops)")
    p.add_argument("--devices-per-process", type=int, default=1, help="with --cpu: fake CPU devices each")
    p.add_argument("--gpus-per-process", type=int, default=0, help="GPUs: CUDA_VISIBLE_DEVICES per process")
    p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="stop all processes when none has printed a line for this many seconds")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command after --")
    return launch(cmd, args.num_processes, cpu=args.cpu, devices_per_process=args.devices_per_process,
                  gpus_per_process=args.gpus_per_process, timeout=args.timeout,
                  idle_timeout=args.idle_timeout)


if __name__ == "__main__":
    sys.exit(main())
