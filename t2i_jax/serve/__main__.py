"""`python -m t2i_jax.serve [--model M] [--host 127.0.0.1] [--port 7860]`: the page and the A1111 API.

Loads the default model once, compiles the common shapes (reported), then serves. SIGTERM (or the
first Ctrl-C) drains: requests already accepted finish, new ones get 503, then the process exits;
a second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence

from t2i_jax.sample import BUNDLED_MODEL, BUNDLED_MODEL_NAME, DefaultsHelpFormatter, quiet_console
from t2i_jax.serve.a1111 import DEFAULT_SAMPLER, SAMPLERS, Limits, Request, sampler_for

log = logging.getLogger("t2i_jax.serve")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The server's flags; `--help` shows every default."""
    p = argparse.ArgumentParser(prog="python -m t2i_jax.serve", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="a model to serve (diffusers folder, hub id or single file), repeatable; the first is the "
                        "default, the others load on first use; NAME is what /sdapi/v1/options and "
                        "override_settings.sd_model_checkpoint call it (default: the folder name); default: the "
                        f"bundled shapes model ({BUNDLED_MODEL_NAME}, 32 px) as 'shapes'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free one, printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every API route (the page asks for it)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="steps per request at most")
    p.add_argument("--max-size", type=int, default=Limits.max_size, help="width and height at most, pixels")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="batch_size x n_iter at most")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests accepted and not finished at most; more get 429 with Retry-After")
    p.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20, help="request body at most")
    p.add_argument("--batch-sizes", default="1,2,4,8",
                   help="compiled device batch sizes: a batch is padded to the smallest that holds it")
    p.add_argument("--gather-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for compatible ones")
    p.add_argument("--preview-every", type=int, default=4, help="a decoded preview every N model evaluations")
    p.add_argument("--warm-steps", default="20", help="steps counts to compile at start-up, comma-separated; "
                                                      "'' for none")
    p.add_argument("--warm-sampler", default=DEFAULT_SAMPLER,
                   help=f"sampler compiled at start-up: {', '.join(SAMPLERS)}")
    p.add_argument("--warm-size", type=int, default=None, help="width = height compiled at start-up "
                                                              "(default: the model's native size)")
    p.add_argument("--devices", type=int, default=None, help="devices to split a batch over (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="compute dtype (default: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="on SIGTERM, seconds to let accepted requests finish before refusing the rest with 503")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def model_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(name, source) per --model; the bundled model as 'shapes' without one. Names must be unique."""
    from pathlib import Path

    if not specs:
        return [("shapes", str(BUNDLED_MODEL))]
    out = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            name = Path(spec.rstrip("/")).name or spec
        if not name or not source:
            raise ValueError(f"--model {spec!r}: write PATH or NAME=PATH")
        if name in dict(out):
            raise ValueError(f"--model {spec!r}: the name {name!r} is taken; give one NAME=PATH")
        out.append((name, source))
    return out


def batch_sizes(text: str, ndev: int) -> list[int]:
    """--batch-sizes as ints, each a positive multiple of the device count."""
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: write integers separated by commas, e.g. 1,2,4,8") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch-sizes {text!r}: give at least one size >= 1")
    bad = [b for b in sizes if b % ndev]
    if bad:
        raise ValueError(f"--batch-sizes {bad} do not divide over {ndev} devices; use multiples of {ndev}, "
                         f"or --devices 1")
    return sizes


def build_service(args: argparse.Namespace):
    """Loads the default model, builds the batcher and compiles the start-up shapes; returns the Service."""
    import jax
    import jax.numpy as jnp

    from t2i_jax import pipeline
    from t2i_jax.convert.load import load_components
    from t2i_jax.serve.app import Service
    from t2i_jax.serve.batcher import Batcher, Model

    specs = model_specs(args.model)
    devices = jax.devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise ValueError(f"--devices {args.devices}: this machine has {len(devices)}; pass 1 to {len(devices)}")
        devices = devices[:args.devices]
    mesh = pipeline.make_mesh(devices=devices)
    sizes = batch_sizes(args.batch_sizes, len(devices))
    platform = devices[0].platform
    dtype_name = args.dtype or ("fp32" if platform == "cpu" else "bf16")
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[dtype_name]
    warm_steps = [int(s) for s in args.warm_steps.split(",") if s.strip()]
    _, warm_sampler, warm_options = sampler_for(args.warm_sampler)

    def make_sampler(source: str):
        pipe = load_components(BUNDLED_MODEL if source == str(BUNDLED_MODEL) else source)
        return pipeline.Sampler(pipe, mesh=mesh, dtype=dtype)

    limits = Limits(max_steps=args.max_steps, max_size=args.max_size, max_images=args.max_images,
                    max_body_bytes=int(args.max_body_mb * 2**20))
    batcher = Batcher([Model(n, s) for n, s in specs], make_sampler=make_sampler, batch_sizes=sizes,
                      gather_s=args.gather_ms / 1000, max_queue=args.max_queue, preview_every=args.preview_every)
    default = specs[0][0]
    m = batcher.call(lambda: batcher.model(default)).result()
    log.info("model %s: %d px, %s, loaded in %.1f s; batches %s over %d %s device(s)", default, m.native,
             dtype_name, m.load_seconds, sizes, len(devices), platform)
    size = args.warm_size or m.native
    total = 0.0
    for steps in warm_steps:
        req = Request(model=default, prompt="", negative_prompt="", seeds=[0], steps=steps, cfg_scale=7.0,
                      sampler_name=args.warm_sampler, sampler=warm_sampler, scheduler_options=warm_options,
                      width=size, height=size)
        dt = batcher.call(lambda r=req: batcher.warm(r)).result()
        total += dt
        log.info("compiled %s, %d steps, %dx%d, batch sizes %s in %.1f s", args.warm_sampler, steps, size, size,
                 sizes, dt)
    if warm_steps:
        log.info("start-up compile: %.1f s in all", total)
    return Service(batcher=batcher, limits=limits, default_model=default, api_key=args.api_key,
                   default_steps=warm_steps[0] if warm_steps else 20)


def make_server(service, host: str, port: int, *, drain_timeout: float = 300.0, log_level: str = "info",
                bound: list | None = None):
    """The uvicorn server over `service`'s app whose exit signal drains (see the module docstring): its
    `handle_exit` is what SIGTERM and SIGINT call."""
    import uvicorn

    from t2i_jax.serve.app import create_app

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if self.draining:  # a second signal: uvicorn's own stop, at once
                self.force_exit = True
                return super().handle_exit(sig, frame)
            self.draining = True
            log.warning("signal %s: draining (%d request(s) in the queue); new requests get 503", sig,
                        service.batcher.queue_length())
            service.batcher.drain()
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self):
            if not service.batcher.wait_idle(drain_timeout):
                n = service.batcher.refuse_queued(f"the server shut down before it ran (--drain-timeout "
                                                  f"{drain_timeout:g} s)")
                log.warning("drain timeout: %d queued request(s) refused with 503", n)
            time.sleep(0.3)  # the last handlers send their answers
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            actual = self.servers[0].sockets[0].getsockname()[1] if self.servers else port  # --port 0: the OS's
            if bound is not None:
                bound.append(actual)
            print(f"serving on http://{host}:{actual}/ (the page), API under /sdapi/v1", file=sys.stderr, flush=True)

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(5, int(drain_timeout)), access_log=False)
    return DrainingServer(config)


def serve(service, host: str, port: int, *, drain_timeout: float = 300.0, log_level: str = "info") -> None:
    """Runs the app on uvicorn until SIGTERM/SIGINT has drained it, then stops the device thread."""
    server = make_server(service, host, port, drain_timeout=drain_timeout, log_level=log_level)
    try:
        server.run()
    finally:
        service.batcher.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 after a drained shutdown, 2 on a bad flag."""
    quiet_console()
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(message)s",
                        stream=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from other machines%s", args.host,
                    "" if args.api_key else "; consider --api-key")
    try:
        model_specs(args.model)
        for name, value in (("--max-steps", args.max_steps), ("--max-size", args.max_size),
                            ("--max-images", args.max_images), ("--max-queue", args.max_queue),
                            ("--preview-every", args.preview_every)):
            if value < 1:
                raise ValueError(f"{name} {value} must be >= 1")
        sampler_for(args.warm_sampler)
        service = build_service(args)
    except Exception as e:  # noqa: BLE001 - a usage error is one line, not a traceback
        if not isinstance(e, (ValueError, FileNotFoundError)) and type(e).__name__ != "ApiError":
            raise
        print(f"error: {getattr(e, 'detail', e)}", file=sys.stderr)
        return 2
    serve(service, args.host, args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
