"""CLI: `python -m t2i_jax.bench --model sd15 --modes unet,sample,train --json out.json`.

SDXL: `--model sdxl --modes unet,sample --compare diffusers` (1024x1024, Euler, both text encoders,
pooled text and time ids; diffusers runs StableDiffusionXLPipeline); `--model tiny-sdxl` is its toy size.

Ahead of time for a TPU topology, on any machine with libtpu (`pip install -e ".[tpu-aot]"`):
`--aot tpu:v5e:4x4 --what sample,train_ldm,train_clip` compiles and reports per-chip memory, FLOPs,
bytes, roofline bounds and collectives; `--plan tpu:v5e:16x16 --batch 2048` finds the smallest FSDP
degree and remat policy whose LDM train step fits the chip.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from t2i_jax.bench import core
from t2i_jax.bench import profile as profile_lib
from t2i_jax.files import atomic_write
from t2i_jax.sample import DefaultsHelpFormatter


def _positive_int(name: str):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < 1:
            raise argparse.ArgumentTypeError(f"{name} {v!r} must be a positive integer")
        return n
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_jax.bench", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"named config: {', '.join(sorted(core.MODELS))}")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 8 (default: native, 512 for sd15, 768 for sd21, "
                        "1024 for sdxl)")
    p.add_argument("--steps", type=_positive_int("steps"), default=50, help="sampler steps")
    p.add_argument("--batch-size", "--batch", type=_positive_int("batch size"), default=None,
                   help="global batch, split over all devices (default: one per device)")
    p.add_argument("--devices", type=_positive_int("devices"), default=None,
                   help="use the first N devices (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="compute dtype (default: bf16 on GPU/TPU, fp32 on CPU); params stay fp32")
    p.add_argument("--modes", default=None,
                   help="comma-separated: unet, sample, train (the LDM trainer's step on cached latents), "
                        "train_stream (the same on images and token ids) (default: all; unet,sample for SDXL)")
    p.add_argument("--attention", choices=list(core.ATTENTION), default="auto",
                   help="attention implementation: auto (cuDNN flash attention on NVIDIA GPUs for the head sizes "
                        "and dtypes it supports, XLA elsewhere), xla, or cudnn (everywhere; needs bf16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    p.add_argument("--iters", type=_positive_int("iters"), default=10, help="timed calls per mode")
    p.add_argument("--scheduler", default=None,
                   help="sampler for the sample mode (default: the model's pipeline's, pndm for SD, euler for SDXL)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale; 1 turns guidance off")
    p.add_argument("--unet-cfg", action="store_true", help="unet mode: run 2x the batch, as CFG sampling does")
    p.add_argument("--remat", action="store_true", help="train mode: rematerialise U-Net blocks")
    p.add_argument("--compare", choices=["diffusers"], default=None,
                   help="also run the same work in PyTorch diffusers and report ours/theirs")
    p.add_argument("--torch-compile", action="store_true", help="with --compare: torch.compile the U-Net")
    p.add_argument("--torch-dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="with --compare: torch dtype (default: ours on CUDA, fp32 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for utilisation (default: datasheet table by device kind)")
    p.add_argument("--no-measure-peak", action="store_true", help="skip the dense matmul ceiling measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random params and inputs")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace --profile-iters more calls of each mode with jax.profiler into DIR/MODE "
                        "and report the device's top ops and busy fraction")
    p.add_argument("--profile-iters", type=_positive_int("profile iters"), default=3,
                   help="calls traced per mode with --profile")
    p.add_argument("--json", default=None, help="write every figure to this JSON file (atomically)")
    g = p.add_argument_group("TPU, ahead of time (needs libtpu; no TPU needed)")
    g.add_argument("--aot", default=None, metavar="TOPOLOGY",
                   help="compile for this TPU topology instead of timing here, e.g. tpu:v5e:4x4, tpu:v6e:2x2, "
                        "tpu:v5p:2x2x1; --model, --resolution, --batch, --steps, --scheduler apply")
    g.add_argument("--plan", default=None, metavar="TOPOLOGY",
                   help="memory planner: the smallest FSDP degree, and at it the largest micro-batch per chip "
                        "(train.grad_accum), remat policy and attention (chunked or XLA), whose LDM train step "
                        "at --batch fits a chip of this topology, found by compiling a few candidates")
    g.add_argument("--what", default=None,
                   help="with --aot, comma-separated: sample (denoise+decode loop), train_ldm (the LDM trainer's "
                        "step, cached latents), train_clip (CLIP's contrastive step); default: all three "
                        "(SDXL models: sample,train_ldm)")
    g.add_argument("--fsdp", type=_positive_int("fsdp"), default=None,
                   help="with --aot: FSDP degree of the train steps (default: the config's mesh.fsdp)")
    return p


def aot_main(args: argparse.Namespace, argv: list[str]) -> dict:
    """--aot / --plan: compile for a TPU topology; prints the table, writes --json."""
    from t2i_jax.bench import aot
    from t2i_jax.bench import plan as plan_lib

    topology = args.plan or args.aot
    s = aot.AotSettings(topology=topology, model=args.model, resolution=args.resolution, batch=args.batch_size,
                        what=(tuple(w.strip() for w in args.what.split(",") if w.strip()) if args.what is not None
                              else aot.default_what(args.model)), steps=args.steps,
                        scheduler=args.scheduler, guidance_scale=args.guidance_scale, fsdp=args.fsdp,
                        remat=True if args.remat else None)
    started = time.time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report = plan_lib.plan(s, log) if args.plan else aot.run(s, log)
    report = {"command": "python -m t2i_jax.bench " + shlex.join(argv), "argv": argv,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "versions": versions(),
              "host": platform.node(), "cpu_count": os.cpu_count(), "wall_s": time.time() - started, **report}
    print(plan_lib.table(report) if args.plan else aot.table(report), flush=True)
    if args.json:
        write_json(args.json, report)
    return report


def settings_from_args(args: argparse.Namespace) -> core.BenchSettings:
    """Parsed flags -> BenchSettings (validated later, against the device count)."""
    if args.modes is None:
        spec = core.MODELS.get(args.model)
        modes = core.SDXL_MODES if spec is not None and spec.is_sdxl else core.MODES
    else:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    return core.BenchSettings(
        model=args.model, resolution=args.resolution, steps=args.steps, batch_size=args.batch_size,
        num_devices=args.devices, dtype=args.dtype, modes=modes,
        attention=args.attention, warmup=args.warmup, iters=args.iters, scheduler=args.scheduler,
        guidance_scale=args.guidance_scale, unet_cfg=args.unet_cfg, remat=args.remat, compare=args.compare,
        torch_compile=args.torch_compile, torch_dtype=args.torch_dtype, peak_tflops=args.peak_tflops,
        measure_peak=not args.no_measure_peak, seed=args.seed, profile=args.profile,
        profile_iters=args.profile_iters)


def versions() -> dict:
    """Versions of everything that shapes the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu",
                "torch", "diffusers", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes `data` so that a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def table(report: dict) -> str:
    """The figures as a fixed-width text table."""
    r = report["resolved"]
    d = report["device"]
    lines = [
        f"model {r['model']}  {r['resolution']}px (latent {r['latent']})  batch {r['batch_size']} "
        f"({r['per_device_batch']}/device)  {r['dtype']}  steps {report['settings']['steps']}  "
        f"{d['device_count']} x {d['device_kind']}",
        f"peak/device: datasheet {_fmt(d['peak_tflops_per_device'], '.1f')} TFLOP/s ({d['peak_source'] or 'unknown'}), "
        f"measured matmul {_fmt(d['measured_matmul_tflops_per_device'], '.2f')} TFLOP/s",
        "",
        f"{'mode':12} {'impl':10} {'items/s':>9} {'/device':>9} {'ms/iter':>9} {'ms/step':>8} {'GFLOP/item':>11} "
        f"{'TFLOP/s/dev':>11} {'util':>6} {'util(mm)':>8} {'compile s':>9} {'peak GiB':>8}",
    ]
    for mode, res in report["results"].items():
        for impl in ("ours", "diffusers"):
            f = res.get(impl)
            if f is None:
                continue
            lines.append(
                f"{mode:12} {impl:10} {_fmt(f['items_per_s'], '9.3f')} {_fmt(f['items_per_s_per_device'], '9.3f')} "
                f"{_fmt(f['ms_per_iter'], '9.2f')} {_fmt(f.get('ms_per_unet_step'), '8.2f')} "
                f"{_fmt(f['flops_per_item'], '11.3f', 1e-9)} {_fmt(f['tflops_per_device'], '11.4f')} "
                f"{_fmt(f['utilisation'], '6.1%')} {_fmt(f['utilisation_of_measured_peak'], '8.1%')} "
                f"{_fmt(f.get('compile_s'), '9.2f')} {_fmt(f.get('peak_bytes_in_use'), '8.2f', 2.0 ** -30)}")
        if "ratio_ours_over_diffusers_per_device" in res:
            ratio = res["ratio_ours_over_diffusers_per_device"]
            lines.append(f"{mode:12} ours/diffusers items/s per device: {ratio:.3f}x "
                         f"(from medians {res['ratio_ours_over_diffusers_per_device_median']:.3f}x, "
                         f"minima {res['ratio_ours_over_diffusers_per_device_min']:.3f}x)")
    plan = report.get("attention")
    if plan:
        lines.append("attention: " + "; ".join(
            f"{part} " + ", ".join(f"d={d}:{row['impl']}" for d, row in rows.items())
            for part, rows in plan.items() if part != "vae"))
    for mode, res in report["results"].items():
        prof = res["ours"].get("profile")
        if prof:
            lines += profile_lib.format_summary(mode, "ours", prof)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags, runs the benchmark, prints the table, writes --json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.aot and args.plan:
        p.error("--aot and --plan are separate runs; give one of them")
    if args.aot or args.plan:
        return aot_main(args, argv)
    settings = settings_from_args(args)
    started = time.time()
    report = core.run(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    report = {
        "command": "python -m t2i_jax.bench " + shlex.join(argv),
        "argv": argv,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "wall_s": None,
        **report,
    }
    report["wall_s"] = time.time() - started
    print(table(report), flush=True)
    if args.json:
        write_json(args.json, report)
    return report
