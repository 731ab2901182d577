"""One GPU check: parity, attention numerics, speed and training throughput in one table.

`python -m t2i_jax.bench.gpu_check` (or `bash scripts/gpu_check.sh`) on a fresh
NVIDIA GPU machine with jax[cuda], torch, diffusers, transformers and this
package; `--json PATH` and `--markdown PATH` write the same rows (the markdown
with date, device and versions, ready for BENCHMARKS.md). `--smoke` runs every
section with tiny configs, on a CPU too (the test does).

Sections (`--sections parity,attention,speed,train,sdxl`; the targets are
worked out from the speed and train rows):

parity     Full-size SD1.5 U-Net (64x64 latents, batch 2), SD VAE decoder
           (64x64 latents -> 512 px) and encoder (512 px), CLIP ViT-L/14 text
           encoder (2 x 77 ids): random weights (torch init, 1-D params
           perturbed, one seed), moved into ours with the converters the slow
           tests use, ours against diffusers/transformers on the same device.
           fp32 rows: TF32 off on both sides (jax default matmul precision
           "highest"; torch allow_tf32 = False for matmuls and cuDNN);
           rel err = ||ours - ref|| / ||ref||, ref = torch fp32.
           bf16 rows: ours in bf16 compute (fp32 params, attention "auto")
           against the same fp32 reference; the torch model cast to bf16 is
           shown beside it as the yardstick.
attention  `layers.dot_product_attention` with implementation "cudnn" vs
           "xla", bf16, at every head size and sequence length SD1.5 runs at
           512 px (40/80/160 x 4096/1024/256/64 self, 77 cross) and CLIP's
           causal 64 x 77; rel err, each against fp32, times, and where
           "auto" sends each head size. Skipped (not failed) with no GPU.
speed      SD1.5 at 512x512, 50 PNDM steps, CFG 7.5, through `bench.core`:
           U-Net it/s at batch 1 (one CFG step: the U-Net at 2 rows) and
           images/s of the whole `pipeline.Sampler` call over a batch sweep
           (stops at OOM, when images/s stops rising, or at the time
           budget), ours (bf16) vs diffusers (fp16, SDPA) in the same run:
           diffusers at batch 1 and at ours' best batch (like for like
           there; its model builds at the batches between would cost the
           sweep a batch), utilisation = achieved FLOP/s over the dense
           matmul measured in the same run (the bench's
           `utilisation_of_measured_peak`).
train      The bench's `train` mode at 512 px (64x64 latents), ours vs
           diffusers at every batch, same figures.
sdxl       SDXL base at 1024x1024, 30 Euler steps, CFG 7.5 (both text
           encoders, time ids), through `bench.core` (`--model sdxl`):
           images/s per GPU at batch 1 and over a batch sweep (1,4,8, the
           speed section's stops), ours (bf16) vs diffusers'
           StableDiffusionXLPipeline (fp16, SDPA; its VAE upcast to fp32 as
           diffusers does) at batch 1 and at ours' best batch, and the
           anchor: MLPerf Inference's TensorRT SDXL at 2.03 images/s per
           H100 (20 steps), beside ours' best scaled to 20 steps (x 30/20:
           the U-Net is nearly all of the time).
targets    U-Net it/s at batch 1 >= 100, images/s at the best batch >= 6,
           training >= 150 samples/s per GPU, ours/diffusers >= 1.5x for each
           of the three; the gap to each.

Thresholds (`PARITY_LIMITS`, `ATTENTION_LIMIT`):
  fp32  1e-4 for every model: what the slow CPU tests hold; measured on a CPU
        at full size 1e-6 to 3e-6.
  bf16  2x the error of the torch model cast to bf16 on the same inputs (what
        PyTorch itself loses in bf16, measured in the same run), kept within
        [1e-2, 5e-2]; 5e-2 when that yardstick did not run. bf16 keeps 8 bits
        of mantissa (2^-9 = 2e-3 per rounding) and these depths pile up about
        ten roundings' worth: measured on a CPU at full size, ours/torch-bf16
        U-Net 1.4e-2/1.4e-2, VAE decoder 2.9e-2/2.8e-2 (growing with the image
        size), encoder 1.3e-2/1.4e-2, text 1.0e-2/1.0e-2. A transfer, layout or
        dtype bug gives O(1), or a multiple of the yardstick.
  attention  cuDNN vs XLA 1e-2 (two bf16 roundings of the same softmax).

Exit status: 0, or 1 when a parity row is over its threshold or did not run,
or an attention row's cuDNN/XLA difference is over its threshold; 2 when no
GPU is visible (without --smoke) or the flags are wrong.

Robustness: each section runs in a child process of its own (not with
--smoke, which has no GPU state to isolate; `--isolate`/`--no-isolate`
choose), so a crash, hang or OOM ends that section only, and its rows so far
are kept; within a section each row catches its own errors and is printed as
FAILED with a one-line reason. jax is told not to preallocate GPU memory
(XLA_PYTHON_CLIENT_PREALLOCATE=false): torch shares the device in the same
process. In each speed/train step diffusers runs first and returns its cached
memory before ours runs, because jax's allocator keeps what it once took.

Time: `--budget-s` (600) covers the whole run. Parity and attention always
run whole (with hard limits of 360 and 150 s); then each sweep gets a share
of what is left, weighted speed 3, train 2, sdxl 2 against the sweeps still
to come (speed 3/7, train 2/4 of what speed left, sdxl the rest; with the
sdxl section off, speed 60% and train the rest). A sweep always runs its first
batch, and starts a further one only if its estimate (builds and compiles as
measured, timed calls scaled by the batch) ends inside its share; what it
cannot fit is printed as skipped with the estimate. Raise --budget-s for a
longer sweep; `--compile-cache DIR` makes a rerun compile less.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SECTIONS = ("parity", "attention", "speed", "train", "sdxl")

# ||ours - ref|| / ||ref|| ceilings (see the module docstring for why).
# fp32: one number for every model. bf16: `factor` x the torch bf16
# yardstick's error measured in the same run, kept within [floor, cap]; `cap`
# alone when the yardstick did not run.
PARITY_LIMITS = {
    "fp32": 1e-4,
    "bf16": {"factor": 2.0, "floor": 1e-2, "cap": 5e-2},
}
ATTENTION_LIMIT = 1e-2  # cuDNN vs XLA, bf16 inputs and outputs

# The targets, per GPU.
TARGETS = {
    "unet_its_b1": 100.0,  # U-Net it/s at batch 1 (one CFG step)
    "images_per_s_best": 6.0,  # images/s at the best batch
    "train_samples_per_s": 150.0,  # U-Net training samples/s at 512 px
    "ratio": 1.5,  # ours/diffusers
}

# The MLPerf Inference (v4.x/v5.0, offline) TensorRT SDXL figure per H100 SXM:
# 1024x1024, 20 Euler steps; what the sdxl section's images/s is set beside.
SDXL_ANCHOR = {"images_per_s": 2.03, "steps": 20, "name": "MLPerf TensorRT SDXL", "device": "H100"}

DEFAULT_BUDGET_S = 600.0
# Shares of the time left that each sweep section gets, against those that
# still follow it (speed 60% of what is left when train follows, as before
# SDXL; the sdxl sweep compiles a 2.6 B U-Net per batch).
_SWEEP_WEIGHTS = {"speed": 3.0, "train": 2.0, "sdxl": 2.0}
# Time limits for the children that have no sweep to cut short.
_HARD_LIMIT_S = {"parity": 360.0, "attention": 150.0}

# Exit statuses.
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
# A section's child says "no GPU" with this (2 is argparse's usage error).
_CHILD_NO_GPU = 3


class NoGPU(RuntimeError):
    """jax sees no GPU and this is not a --smoke run."""


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclasses.dataclass
class CheckConfig:
    """One gpu_check run. None means "the default for --smoke or not" (`filled`)."""

    smoke: bool = False
    sections: tuple[str, ...] = SECTIONS
    seed: int = 0
    steps: int | None = None  # sampler steps: 50, 2 with --smoke
    batches: tuple[int, ...] | None = None  # sampling sweep per GPU: 1,4,8,16,32; 1 with --smoke
    train_batches: tuple[int, ...] | None = None  # per GPU: 16,32; 2 with --smoke
    sdxl_steps: int | None = None  # SDXL sampler steps: 30, 2 with --smoke
    sdxl_batches: tuple[int, ...] | None = None  # SDXL sampling sweep per GPU: 1,4,8; 1 with --smoke
    torch_dtype: str = "fp16"  # diffusers' dtype in the speed/train sections (fp32 on a CPU)
    torch_compile: bool = False
    budget_s: float = DEFAULT_BUDGET_S  # the sweeps stop starting runs that would end past this
    # Each section in a child process (None: yes, except with --smoke, where
    # there is no GPU state to isolate and the children's start-up would
    # double the run).
    isolate: bool | None = None
    compile_cache: str | None = None  # jax persistent compilation cache folder (faster reruns)
    parity_latent: int | None = None  # latent side of the parity inputs: 64 (512 px), 16 with --smoke
    allow_cpu: bool = False  # full-size configs even where jax sees no GPU (slow: for checking the check)
    # Set by the driver for each child: epoch seconds after which a sweep
    # starts nothing new.
    deadline: float | None = None

    def filled(self) -> CheckConfig:
        """The config with every None default resolved for smoke or full runs."""
        s = self.smoke
        return dataclasses.replace(
            self,
            steps=self.steps or (2 if s else 50),
            batches=tuple(self.batches or ((1,) if s else (1, 4, 8, 16, 32))),
            train_batches=tuple(self.train_batches or ((2,) if s else (16, 32))),
            sdxl_steps=self.sdxl_steps or (2 if s else 30),
            sdxl_batches=tuple(self.sdxl_batches or ((1,) if s else (1, 4, 8))),
            parity_latent=self.parity_latent or (16 if s else 64),
            isolate=(not s) if self.isolate is None else self.isolate,
        )

    @property
    def model(self) -> str:
        """The bench model of the speed and train sections."""
        return "tiny" if self.smoke else "sd15"

    @property
    def sdxl_model(self) -> str:
        """The bench model of the sdxl section."""
        return "tiny-sdxl" if self.smoke else "sdxl"

    def to_json(self) -> dict:
        """JSON-able form (tuples as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CheckConfig:
        """Inverse of `to_json`."""
        d = dict(d)
        for k in ("sections", "batches", "train_batches", "sdxl_batches"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def _iters(cfg: CheckConfig, modes: Sequence[str]) -> tuple[int, int]:
    """(warmup, iters) of one bench run: enough for a steady figure on a GPU
    within the budget (a 50-step sampling call takes about a second, a U-Net
    call or train step milliseconds); the least that still times something
    in smoke runs."""
    if cfg.smoke:
        return 1, 2
    if "sample" in modes:
        return (2, 5) if "unet" in modes else (1, 3)
    return {"unet": (5, 30), "train": (2, 5)}[modes[0]]


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


def row(section: str, check: str, *, value: float | None = None, unit: str = "", status: str = "ok",
        vs_ref: str = "", util: float | None = None, limit: str = "", gap: str = "", note: str = "",
        **data) -> dict:
    """One table row. status: "pass"/"FAIL" (a threshold), "met"/"MISSED" (a
    target), "ok" (a figure), "FAILED" (did not run: `note` says why),
    "skipped" (not applicable here: `note` says why). `data` holds the
    figures behind the row for the JSON."""
    return {"section": section, "check": check, "value": value, "unit": unit, "vs_ref": vs_ref, "util": util,
            "limit": limit, "gap": gap, "status": status, "note": note, "data": data}


def failed(section: str, check: str, reason: str, **data) -> dict:
    """A row that did not run."""
    return row(section, check, status="FAILED", note=reason, **data)


def one_line(e: BaseException, limit: int = 220) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    s = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    if isinstance(e, ImportError) and getattr(e, "name", None):
        s += f" (install {e.name}, or carry its wheel: see scripts/gpu_check.sh)"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def is_oom(text: str) -> bool:
    """Whether an error message is an out-of-memory (XLA or torch)."""
    t = text.lower()
    return "resource_exhausted" in t or "out of memory" in t or "outofmemory" in t


def _limit_status(err: float, limit: float) -> str:
    return "pass" if math.isfinite(err) and err <= limit else "FAIL"


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when shapes differ or ref is 0)."""
    import numpy as np

    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return math.inf
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom else math.inf


class Log:
    """Progress lines on stderr, with seconds since the section began."""

    def __init__(self, section: str):
        self.section, self.t0 = section, time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[gpu_check {self.section} {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def prepare_environment(cfg: CheckConfig) -> None:
    """Sets what must be set before jax starts its backend: no preallocation
    (torch shares the GPU in the same process) and the compilation cache."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if cfg.compile_cache:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cfg.compile_cache)


def device_info() -> dict:
    """What jax and torch see: platform, device kind, count, compute
    capability, torch's device name, CUDA and cuDNN versions."""
    import jax

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "compute_capability": getattr(dev, "compute_capability", None)}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["torch_device_name"] = torch.cuda.get_device_name(0)
            info["torch_cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # torch is optional for the attention section
        info["torch_error"] = one_line(e)
    return info


def require_gpu(cfg: CheckConfig) -> dict:
    """`device_info()`, or NoGPU when jax sees no GPU outside a smoke run."""
    info = device_info()
    if info["platform"] != "gpu" and not (cfg.smoke or cfg.allow_cpu):
        raise NoGPU(f"jax sees no GPU (platform {info['platform']!r}, device {info['device_kind']!r}); "
                    "install jax[cuda13] or jax[cuda12] on a GPU machine, or pass --smoke for the tiny CPU run")
    return info


def nvidia_smi() -> str | None:
    """`name, driver, memory` of GPU 0 as nvidia-smi reports them, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _torch_device(torch):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _free_torch() -> None:
    """Drops torch's cached blocks so jax can take that memory."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # torch absent or broken: nothing of it to free
        pass


@contextlib.contextmanager
def strict_fp32():
    """fp32 as IEEE fp32 on both sides while inside: jax's default matmul
    precision "highest" (convolutions and dots, at trace time), and torch's
    `allow_tf32 = False` for matmuls and cuDNN. torch's legacy flags are
    used because they keep both readings (legacy and `fp32_precision`)
    consistent; where something already set the new-API flags, so that the
    legacy reading raises, the new API is used for all three knobs."""
    import jax
    import torch

    b = torch.backends
    try:
        saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        legacy = True
    except RuntimeError:
        knobs = [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
        saved = tuple(k.fp32_precision for k in knobs)
        legacy = False
    if legacy:
        b.cuda.matmul.allow_tf32 = False
        b.cudnn.allow_tf32 = False
    else:
        for k in knobs:
            k.fp32_precision = "ieee"
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        if legacy:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved
        else:
            for k, v in zip(knobs, saved):
                k.fp32_precision = v


# --------------------------------------------------------------------------
# Section 1: parity
# --------------------------------------------------------------------------


def _perturb_1d(torch, model, seed: int) -> None:
    """Moves every 1-D param (norm scales and shifts, biases) off its init
    value, so that a scale/bias mixed up in the transfer shows. Weight
    matrices keep their init: noise on them would blow activations up over
    the full-size depths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))


def _state(model) -> dict:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _np(t):
    return t.detach().float().cpu().numpy()


def _nchw(x):
    import numpy as np

    return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _nhwc(t):
    import jax.numpy as jnp

    return jnp.asarray(_np(t).transpose(0, 2, 3, 1))


@dataclasses.dataclass
class _Part:
    """One output of one model, compared at fp32 and bf16."""

    check: str  # row label
    torch_call: Callable  # (torch model, dtype) -> torch output tensor
    jax_call: Callable  # (module, params) -> numpy output in the torch layout


def _parity_model(section: str, title: str, build_torch: Callable, build_ours: Callable,
                  parts: Sequence[_Part], emit, log) -> None:
    """Builds the torch model (fp32, on the device), its fp32 strict reference
    outputs, moves its weights into ours, runs ours at fp32 (strict) and bf16
    and the torch model cast to bf16, and emits two rows per part. A failure
    fails the rows that depend on it: the model build all of them, one
    output its own two."""
    import jax
    import torch

    def attempt(fn):
        try:
            return fn()
        except Exception as e:
            return _Failure(one_line(e))

    t0 = time.perf_counter()
    try:
        fp32_model = build_torch()
        with strict_fp32(), torch.inference_mode():
            refs = [attempt(lambda p=p: _np(p.torch_call(fp32_model, torch.float32))) for p in parts]
        log(f"{title}: torch fp32 reference ({time.perf_counter() - t0:.1f}s)")
        make_module, params = build_ours(_state(fp32_model))
        params = jax.device_put(params)
    except Exception as e:
        for p in parts:
            for dt in ("fp32", "bf16"):
                emit(failed(section, f"{p.check} {dt}", one_line(e), dtype=dt))
        return

    ours = {}
    for dt in ("fp32", "bf16"):
        module = attempt(lambda dt=dt: make_module(dt))
        with strict_fp32() if dt == "fp32" else contextlib.nullcontext():
            ours[dt] = [module if isinstance(module, _Failure)
                        else attempt(lambda p=p, m=module: p.jax_call(m, params)) for p in parts]
        log(f"{title}: ours {dt} ({time.perf_counter() - t0:.1f}s)")

    # In place (nn.Module.to): the fp32 weights are in `params` by now.
    bf16_model = attempt(lambda: fp32_model.to(torch.bfloat16))
    with torch.inference_mode():
        torch_bf16 = [bf16_model if isinstance(bf16_model, _Failure)
                      else attempt(lambda p=p: _np(p.torch_call(bf16_model, torch.bfloat16))) for p in parts]
    fp32_model = bf16_model = None  # let _free_torch return their memory
    _free_torch()

    for i, p in enumerate(parts):
        ref, yard_out = refs[i], torch_bf16[i]
        for dt in ("fp32", "bf16"):
            check = f"{p.check} {dt}"
            yard = None
            if dt == "bf16" and not isinstance(yard_out, _Failure) and not isinstance(ref, _Failure):
                yard = rel_err(yard_out, ref)
            limit = parity_limit(dt, yard)
            out = ours[dt][i]
            why = ref.reason if isinstance(ref, _Failure) else (f"ours: {out.reason}" if isinstance(out, _Failure)
                                                                  else None)
            if why:
                if isinstance(ref, _Failure):
                    why = f"torch reference: {why}"
                emit(failed(section, check, why, limit=f"<= {limit:.1e}", threshold=limit, dtype=dt))
                continue
            err = rel_err(out, ref)
            if dt == "fp32":
                note = "vs torch fp32; TF32 off on both sides"
            elif yard is None:
                note = f"vs torch fp32; torch bf16 yardstick FAILED: {yard_out.reason}"
            else:
                note = (f"vs torch fp32; torch bf16 {yard:.2e} (limit {PARITY_LIMITS['bf16']['factor']:g}x it); "
                        f"ours vs torch bf16 {rel_err(out, yard_out):.1e}")
            emit(row(section, check, value=err, unit="rel err", limit=f"<= {limit:.1e}",
                     status=_limit_status(err, limit), note=note, threshold=limit, dtype=dt,
                     torch_bf16_rel_err=yard, shape=list(ref.shape)))


@dataclasses.dataclass(frozen=True)
class _Failure:
    """What a step that raised left: its one-line reason."""

    reason: str


def parity_limit(dtype: str, yardstick: float | None = None) -> float:
    """The rel err ceiling of a parity row: `PARITY_LIMITS["fp32"]`, or for
    bf16 the factor times the torch bf16 `yardstick` within [floor, cap]
    (`cap` when there is no yardstick)."""
    if dtype == "fp32":
        return PARITY_LIMITS["fp32"]
    b = PARITY_LIMITS["bf16"]
    if yardstick is None or not math.isfinite(yardstick):
        return b["cap"]
    return min(b["cap"], max(b["floor"], b["factor"] * yardstick))


def section_parity(cfg: CheckConfig, emit, log) -> dict:
    """Section 1: ours vs diffusers/transformers at fp32 and bf16, full-size
    SD1.5 parts (tiny ones with --smoke), random weights, same device."""
    info = require_gpu(cfg)
    emit_env(emit, info)
    import jax.numpy as jnp
    import numpy as np

    try:
        import diffusers
        import torch
        import transformers
    except ImportError as e:
        for check in ("U-Net", "VAE decode", "VAE encode", "CLIP text"):
            for dt in ("fp32", "bf16"):
                emit(failed("parity", f"{check} {dt}", one_line(e)))
        return info

    from t2i_jax.convert import clip as clip_conv
    from t2i_jax.convert import core as conv

    # diffusers warns on every `.to(bfloat16)` of a model built without
    # from_pretrained; the bf16 cast is the point here.
    diffusers.utils.logging.set_verbosity_error()
    from t2i_jax.models import clip as clip_lib
    from t2i_jax.models import unet as unet_lib
    from t2i_jax.models import vae as vae_lib

    dev = _torch_device(torch)
    seed = cfg.seed
    lat = cfg.parity_latent
    dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16}

    def torch_model(factory):
        torch.manual_seed(seed)
        with torch.device(dev):
            m = factory()
        m = m.to(dev).eval()
        _perturb_1d(torch, m, seed + 100)
        return m

    def to_dev(t, dtype):
        return t.to(dev, dtype) if t.is_floating_point() else t.to(dev)

    def jitted(fn):
        # jit per call site: the fp32 trace must happen inside strict_fp32.
        import jax

        return lambda *a: np.asarray(jax.jit(fn)(*a), np.float32)

    # -- U-Net ---------------------------------------------------------------
    uname = "tiny" if cfg.smoke else "sd15"
    ucfg = unet_lib.UNetConfig.named(uname)
    raw = {k: v for k, v in ucfg.to_diffusers().items() if not k.startswith("_")}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, ucfg.in_channels, lat, lat, generator=g)
    ctx = torch.randn(2, 77, ucfg.cross_attention_dim, generator=g)
    t = torch.tensor([500, 20])

    def unet_ours(state):
        def make(dt):
            return unet_lib.UNet2DConditionModel(ucfg, dtype=dtypes[dt], attention_impl="auto")
        expected = _shapes(make("fp32"), unet_lib.dummy_inputs(ucfg))
        return make, conv.load_params(state, expected, source=f"diffusers {uname} U-Net")[0]

    jx, jt, jc = _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    _parity_model("parity", f"U-Net {uname}", lambda: torch_model(lambda: diffusers.UNet2DConditionModel(**raw)),
                  unet_ours, [_Part(
                      f"U-Net {uname} ({lat}x{lat} latents, batch 2)",
                      lambda m, dt: m(to_dev(x, dt), to_dev(t, dt), encoder_hidden_states=to_dev(ctx, dt)).sample,
                      lambda mod, p: _nchw(jitted(lambda p, a, b, c: mod.apply({"params": p}, a, b, c))(p, jx, jt, jc)),
                  )], emit, log)

    # -- VAE -------------------------------------------------------------------
    vname = "tiny" if cfg.smoke else "sd"
    vcfg = vae_lib.VAEConfig.named(vname)
    vraw = {k: v for k, v in vcfg.to_diffusers().items() if not k.startswith("_")}
    px = lat * vcfg.downsample_factor
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(1, vcfg.latent_channels, lat, lat, generator=g)
    img = torch.rand(1, vcfg.in_channels, px, px, generator=g) * 2 - 1
    jz, jimg = _nhwc(z), _nhwc(img)

    def vae_ours(state):
        def make(dt):
            return vae_lib.AutoencoderKL(vcfg, dtype=dtypes[dt])
        expected = _shapes(make("fp32"), (jnp.zeros((1, 8, 8, vcfg.in_channels)),))
        return make, conv.load_params(state, expected, source=f"diffusers {vname} VAE")[0]

    _parity_model("parity", f"VAE {vname}", lambda: torch_model(lambda: diffusers.AutoencoderKL(**vraw)), vae_ours, [
        _Part(f"VAE {vname} decode ({lat}x{lat} -> {px} px)",
              lambda m, dt: m.decode(to_dev(z, dt)).sample,
              lambda mod, p: _nchw(jitted(lambda p, a: mod.apply({"params": p}, a, method="decode"))(p, jz))),
        _Part(f"VAE {vname} encode mean ({px} px)",
              lambda m, dt: m.encode(to_dev(img, dt)).latent_dist.mean,
              lambda mod, p: _nchw(jitted(lambda p, a: mod.apply({"params": p}, a, method="encode").mean)(p, jimg))),
    ], emit, log)

    # -- CLIP text encoder --------------------------------------------------------
    tname = "tiny" if cfg.smoke else "vit-l-14"
    tcfg = clip_lib.named_config(tname).text
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, tcfg.vocab_size - 2, (2, tcfg.max_position_embeddings))
    eos = tcfg.vocab_size - 1
    ids[:, 0] = tcfg.vocab_size - 2
    ids[0, 9:], ids[1, 40:] = eos, eos  # end token then padding with it, as SD1's tokenizer pads
    tids = torch.tensor(ids)
    jids = jnp.asarray(ids)

    def text_ours(state):
        def make(dt):
            return clip_lib.CLIPTextModel(tcfg, dtype=dtypes[dt], attention_impl="auto")
        state = clip_conv.canonical_state(state, "CLIPTextModel")
        expected = clip_conv.expected_shapes(make("fp32"))
        return make, conv.load_params(state, expected, source=f"transformers {tname} CLIPTextModel",
                                      ignore=[r"position_ids$"])[0]

    hf = transformers.CLIPTextConfig(**tcfg.to_hf())
    _parity_model("parity", f"CLIP {tname}", lambda: torch_model(lambda: transformers.CLIPTextModel(hf)), text_ours, [
        _Part(f"CLIP {tname} text last_hidden_state (2 x {ids.shape[1]} ids)",
              lambda m, dt: m(input_ids=tids.to(dev)).last_hidden_state,
              lambda mod, p: jitted(lambda p, a: mod.apply({"params": p}, a).last_hidden_state)(p, jids)),
    ], emit, log)
    return info


def _shapes(module, dummy) -> dict:
    import jax

    return jax.eval_shape(module.init, jax.random.key(0), *dummy)["params"]


# --------------------------------------------------------------------------
# Section 2: attention
# --------------------------------------------------------------------------


def attention_cases(latent: int = 64) -> list[dict]:
    """Every (head size, heads, query length, key length, causal) SD1.5 runs
    at `latent` x `latent` latents (512 px: 64), from its configs: self- and
    cross-attention (77 text tokens) at each attention level and in the mid
    block, and CLIP ViT-L/14's causal self-attention over 77 tokens."""
    from t2i_jax.models import clip as clip_lib
    from t2i_jax.models import unet as unet_lib

    ucfg = unet_lib.UNetConfig.named("sd15")
    tcfg = clip_lib.named_config("vit-l-14").text
    text_len = tcfg.max_position_embeddings
    cases = []

    def case(where, head_dim, heads, q, kv, causal=False):
        cases.append({"where": where, "head_dim": head_dim, "heads": heads, "q": q, "kv": kv, "causal": causal})

    levels = list(zip(ucfg.block_out_channels, ucfg.per_block("attention_head_dim"), ucfg.down_block_types))
    for i, (ch, heads, kind) in enumerate(levels):
        if kind.startswith("CrossAttn"):
            side = latent >> i
            case(f"U-Net {side}x{side}", ch // heads, heads, side * side, side * side)
            case(f"U-Net {side}x{side} cross", ch // heads, heads, side * side, text_len)
    ch, heads = ucfg.block_out_channels[-1], ucfg.per_block("attention_head_dim")[-1]
    side = latent >> (len(levels) - 1)
    case(f"U-Net mid {side}x{side}", ch // heads, heads, side * side, side * side)
    case(f"U-Net mid {side}x{side} cross", ch // heads, heads, side * side, text_len)
    th = tcfg.num_attention_heads
    case("CLIP text causal", tcfg.hidden_size // th, th, text_len, text_len, causal=True)
    return cases


def auto_plan() -> dict[str, dict]:
    """Where `attention_impl="auto"` sends each SD1.5 head size in bf16 on
    this device, and why not cuDNN where it does not."""
    import jax.numpy as jnp

    from t2i_jax.models import layers

    plan = {}
    for d in sorted({c["head_dim"] for c in attention_cases()}):
        impl = layers.resolve_attention_impl("auto", d, jnp.bfloat16) or "xla"
        plan[str(d)] = {"impl": impl, "why_not_cudnn": layers.why_not_cudnn_here(d, jnp.bfloat16)}
    plan["512"] = {"impl": "xla", "why_not_cudnn": "the VAE's one-head 512-wide attention always runs on XLA"}
    return plan


def _time_ms(fn, *args, iters: int = 20) -> float:
    """Median ms of `iters` calls of a compiled `fn`, each synced."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def section_attention(cfg: CheckConfig, emit, log) -> dict:
    """Section 2: cuDNN vs XLA attention at SD1.5's shapes, bf16; skipped
    rows on a machine without an NVIDIA GPU."""
    info = require_gpu(cfg)
    emit_env(emit, info)
    import jax
    import jax.numpy as jnp

    from t2i_jax.models import layers

    plan = auto_plan()
    # Head sizes that go the same way for the same reason share one entry.
    groups: dict[tuple, list[str]] = {}
    for d, p in plan.items():
        if d != "512":
            groups.setdefault((p["impl"], p["why_not_cudnn"]), []).append(d)
    note = "; ".join(f"{', '.join(ds)}: {impl}" + (f" ({why})" if why else "") for (impl, why), ds in groups.items())
    emit(row("attention", "auto plan (bf16, by head size)", status="ok", note=note + "; VAE 512: xla", plan=plan))
    gpu = info["platform"] == "gpu"
    key = jax.random.key(cfg.seed)
    for i, c in enumerate(attention_cases()):
        check = f"d={c['head_dim']} {c['where']} {c['q']}x{c['kv']} ({c['heads']} heads, batch 2)"
        auto = plan[str(c["head_dim"])]["impl"]
        if not gpu:
            emit(row("attention", check, status="skipped", note=f"no GPU (platform {info['platform']}); auto: {auto}",
                     **c))
            continue
        try:
            width = c["heads"] * c["head_dim"]
            kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
            q = jax.random.normal(kq, (2, c["q"], width), jnp.bfloat16)
            k = jax.random.normal(kk, (2, c["kv"], width), jnp.bfloat16)
            v = jax.random.normal(kv, (2, c["kv"], width), jnp.bfloat16)

            def attend(impl, causal=c["causal"], heads=c["heads"]):
                return jax.jit(lambda q_, k_, v_: layers.dot_product_attention(q_, k_, v_, heads, impl=impl,
                                                                               is_causal=causal))

            with jax.default_matmul_precision("highest"):
                ref = attend("xla")(*(a.astype(jnp.float32) for a in (q, k, v)))
            f_x, f_c = attend("xla"), attend("cudnn")
            out_x = f_x(q, k, v)
            out_c = f_c(q, k, v)
            err = rel_err(out_c.astype(jnp.float32), out_x.astype(jnp.float32))
            err_c, err_x = rel_err(out_c.astype(jnp.float32), ref), rel_err(out_x.astype(jnp.float32), ref)
            ms_c, ms_x = _time_ms(f_c, q, k, v), _time_ms(f_x, q, k, v)
            emit(row("attention", check, value=err, unit="rel err", limit=f"<= {ATTENTION_LIMIT:.0e}",
                     status=_limit_status(err, ATTENTION_LIMIT), vs_ref=f"cudnn {ms_x / ms_c:.2f}x faster",
                     note=f"vs fp32: cudnn {err_c:.1e}, xla {err_x:.1e}; ms cudnn {ms_c:.3f}, xla {ms_x:.3f}; "
                          f"auto: {auto}",
                     cudnn_vs_fp32=err_c, xla_vs_fp32=err_x, ms_cudnn=ms_c, ms_xla=ms_x, auto=auto, **c))
        except Exception as e:
            emit(failed("attention", check, one_line(e), auto=auto, **c))
        log(check)
    return info


# --------------------------------------------------------------------------
# Sections 3 and 4: speed and training, through bench.core
# --------------------------------------------------------------------------


def bench_settings(cfg: CheckConfig, modes: tuple[str, ...], batch_per_device: int, num_devices: int,
                   platform: str, *, model: str | None = None, steps: int | None = None):
    """The `core.BenchSettings` of one bench run: the SD1.5 config (tiny
    with --smoke; or `model` with `steps`) at its native size and default
    sampler, bf16 on a GPU, attention "auto", the unet mode at the CFG batch
    (2 rows per image, as a sampling step runs it), diffusers in
    `cfg.torch_dtype` on a GPU (fp32 on a CPU)."""
    from t2i_jax.bench import core

    warmup, iters = _iters(cfg, modes)
    return core.BenchSettings(
        model=model or cfg.model, steps=steps or cfg.steps, batch_size=batch_per_device * num_devices,
        modes=tuple(modes),
        warmup=warmup, iters=iters, guidance_scale=7.5, unet_cfg=True, seed=cfg.seed, compare=None,
        torch_dtype=cfg.torch_dtype if platform == "gpu" else None, torch_compile=cfg.torch_compile)


def bench_pair(s, log, *, reference: bool = True) -> dict[str, dict]:
    """The bench's modes `s.modes`, diffusers then ours, through the bench's
    own functions: `reference.DiffusersBench(s, r).run(mode, ...)` per mode
    and one `core.run(s)`. Diffusers goes first and hands its cached memory
    back, because jax's allocator keeps what it has taken. Each side's
    failure is kept as a one-line reason and the other side still runs.
    `reference=False`: ours only. Returns {mode: {"ours", "diffusers",
    "ours_error", "diffusers_error", "ratio", "ours_wall_s",
    "diffusers_wall_s"}} (walls: that side's seconds for that mode)."""
    from t2i_jax.bench import core

    out = {m: {"ours": None, "diffusers": None, "ours_error": None, "diffusers_error": None,
               "ours_wall_s": 0.0, "diffusers_wall_s": 0.0} for m in s.modes}
    if reference:
        reference_run(s, s.modes, out, log)
    t0 = time.perf_counter()
    try:
        log(f"{','.join(s.modes)} batch {s.batch_size}: ours ...")
        rep = core.run(s)
        for m in s.modes:
            out[m]["ours"] = rep["results"][m]["ours"]
            out[m]["device"] = rep.get("device")
    except Exception as e:
        for m in s.modes:
            out[m]["ours_error"] = one_line(e)
    wall = time.perf_counter() - t0
    per_mode = sum((res["ours"] or {}).get("wall_s", 0.0) for res in out.values())
    for res in out.values():
        # A mode's own wall (build, compile, calls) plus its share of the
        # run's setup (device peaks, attention plan).
        own = (res["ours"] or {}).get("wall_s", wall)
        res["ours_wall_s"] = own + max(0.0, wall - per_mode) / len(out)
        add_reference_figures(res)
    return out


def reference_run(s, modes: Sequence[str], out: dict[str, dict], log) -> None:
    """diffusers' figures for `modes` into `out[mode]` ("diffusers" or
    "diffusers_error", "diffusers_wall_s", "torch"), then its memory back
    to the device."""
    import jax

    from t2i_jax.bench import core

    ref = None
    try:
        from t2i_jax.bench import reference

        ref = reference.DiffusersBench(s, core.resolve(s, jax.devices()))
        info = ref.info()
        for m in modes:
            log(f"{m} batch {s.batch_size}: diffusers ...")
            t0 = time.perf_counter()
            out[m]["torch"] = info
            try:
                out[m]["diffusers"] = ref.run(m, None, (None, None))
            except Exception as e:
                out[m]["diffusers_error"] = one_line(e)
                _free_torch()  # after an OOM, before the next mode
            out[m]["diffusers_wall_s"] = time.perf_counter() - t0
    except Exception as e:
        for m in modes:
            out[m]["diffusers_error"] = one_line(e)
    finally:
        ref = None
        _free_torch()


def add_reference_figures(res: dict) -> None:
    """diffusers' utilisation from our FLOPs per item and our device peaks
    (it did the same work), and ours/diffusers, where both sides ran."""
    from t2i_jax.bench import core

    ours, theirs = res.get("ours"), res.get("diffusers")
    if ours is None or theirs is None:
        return
    dev = res.get("device") or {}
    peaks = (dev.get("peak_tflops_per_device"), dev.get("measured_matmul_tflops_per_device"))
    theirs.update(core.figures(theirs, theirs["items_per_iter"], 1, ours.get("flops_per_item"), *peaks))
    res["ratio"] = ours["items_per_s_per_device"] / theirs["items_per_s_per_device"]


def _timed_s(f: dict | None) -> float:
    """Seconds of a figures dict's calls (first, warmup and timed ones)."""
    # .get: a mode that reports no call counts still gets an estimate.
    return f["ms_per_iter"] / 1e3 * (f.get("iters", 1) + max(1, f.get("warmup", 1))) if f else 0.0


def predict_s(res: dict, side: str, batch: int, next_batch: int) -> float:
    """Seconds `side` ("ours"/"diffusers") would take for the same mode at
    `next_batch`, from its run `res` at `batch`: its calls scale with the
    batch, the rest (builds, compiles) does not."""
    wall, timed = res.get(f"{side}_wall_s") or 0.0, _timed_s(res.get(side))
    return max(0.0, wall - timed) + timed * next_batch / batch


def _speed_rows(section: str, label: str, res: dict, unit: str, per: Callable[[dict], float], emit,
                torch_dtype: str, *, reference: bool = True, **data) -> None:
    """The rows of one bench result: ours, and diffusers unless
    `reference=False`; `per` turns a figures dict into the row's value."""
    ours, theirs = res["ours"], res["diffusers"]
    if ours is None:
        emit(failed(section, f"{label}: ours", res["ours_error"], side="ours", **data))
    else:
        emit(row(section, f"{label}: ours", value=per(ours), unit=unit, util=ours.get("utilisation_of_measured_peak"),
                 vs_ref=f"{res['ratio']:.2f}x diffusers" if "ratio" in res else "",
                 note=_figures_note(ours), side="ours", figures=ours, **data))
    if not reference:
        return
    name = f"diffusers {(res.get('torch') or {}).get('dtype', torch_dtype)} SDPA"
    if theirs is None:
        emit(failed(section, f"{label}: {name}", res["diffusers_error"], side="diffusers", **data))
    else:
        emit(row(section, f"{label}: {name}", value=per(theirs), unit=unit,
                 util=theirs.get("utilisation_of_measured_peak"), note=_figures_note(theirs), side="diffusers",
                 figures=theirs, **data))


def _figures_note(f: dict) -> str:
    """The figures behind a speed row, in one line."""
    parts = [f"{f['ms_per_iter']:.2f} ms/call"
             + (f" (median {f['ms_per_iter_median']:.2f})" if f.get("ms_per_iter_median") is not None else "")]
    if f.get("ms_per_unet_step") is not None:
        parts.append(f"{f['ms_per_unet_step']:.2f} ms/U-Net step")
    if f.get("tflops_per_device") is not None:
        parts.append(f"{f['tflops_per_device']:.3g} TFLOP/s")
    if f.get("utilisation") is not None:
        parts.append(f"{f['utilisation']:.1%} of datasheet")
    if f.get("peak_bytes_in_use"):
        parts.append(f"peak {f['peak_bytes_in_use'] / 2 ** 30:.1f} GiB")
    return "; ".join(parts)


def _its(f: dict) -> float:
    """U-Net steps per second: one call of the unet mode is one CFG step."""
    return 1e3 / f["ms_per_iter"]


def _per_device(f: dict) -> float:
    return f["items_per_s_per_device"]


def _failed_results(modes: Sequence[str], reason: str) -> dict[str, dict]:
    return {m: {"ours": None, "diffusers": None, "ours_error": reason, "diffusers_error": reason,
                "ours_wall_s": 0.0, "diffusers_wall_s": 0.0} for m in modes}


def _sweep(cfg: CheckConfig, section: str, mode: str, batches: Sequence[int], info: dict, emit, log,
           unit: str, what: str, *, first_extra: Sequence[str] = (), reference_each: bool = True,
           model: str | None = None, steps: int | None = None) -> None:
    """Runs `mode` at each per-GPU batch in turn (the first run also runs
    the modes `first_extra`, whose rows come first). diffusers runs at every
    batch (`reference_each`), or at the first and then once more at ours'
    best batch, which saves its model builds at the batches in between.
    Stops at an OOM of ours, when ours stops rising (under 3% more items/s),
    or when the next run (and the diffusers run it may call for) would end
    past `cfg.deadline`. Ends with a best-batch row per side. `model` and
    `steps` replace the config's (the sdxl section's)."""
    settings = functools.partial(bench_settings, model=model, steps=steps)
    n = info["device_count"]
    runs: dict[int, dict] = {}  # batch -> this mode's result
    prev = None  # (batch, result)
    stop = None

    def left() -> float:
        return math.inf if cfg.deadline is None else cfg.deadline - time.time()

    for i, b in enumerate(batches):
        modes = (*first_extra, mode) if i == 0 else (mode,)
        with_ref = reference_each or i == 0
        label = f"{what} batch {b}"
        if stop is None and prev is not None:
            pb, pres = prev
            need = predict_s(pres, "ours", pb, b)
            # diffusers at this batch: now, or later should it be ours' best.
            rb, rres = (pb, pres) if reference_each else (batches[0], runs[batches[0]])
            if rres.get("diffusers"):
                need += predict_s(rres, "diffusers", rb, b)
            if need > left():
                stop = f"time budget: about {need:.0f} s needed, {max(0.0, left()):.0f} s left"
        if stop:
            emit(row(section, label, status="skipped", note=stop, batch=b, mode=mode))
            continue
        try:
            results = bench_pair(settings(cfg, modes, b, n, info["platform"]), log, reference=with_ref)
        except Exception as e:  # settings rejected: nothing ran
            results = _failed_results(modes, one_line(e))
        if i == 0:
            for m in first_extra:
                _speed_rows(section, _EXTRA_LABELS[m], results[m], _EXTRA_UNITS[m], _EXTRA_VALUES[m], emit,
                            cfg.torch_dtype, metric=f"{m}_b{b}", mode=m, batch=b)
        res = results[mode]
        runs[b] = res
        _speed_rows(section, label, res, unit, _per_device, emit, cfg.torch_dtype, reference=with_ref, batch=b,
                    mode=mode)
        if res["ours"] is None:
            stop = (f"stopped: ours ran out of memory at batch {b}" if is_oom(res["ours_error"] or "")
                    else f"stopped: ours FAILED at batch {b}")
        elif prev is not None and prev[1]["ours"] is not None and \
                res["ours"]["items_per_s_per_device"] < 1.03 * prev[1]["ours"]["items_per_s_per_device"]:
            stop = f"stopped: ours {unit} rose under 3% from batch {prev[0]} to {b}"
        if res["ours"] is not None or prev is None:
            prev = (b, res)

    def best_of(side):
        got = [(b, r[side]) for b, r in runs.items() if r.get(side)]
        return max(got, key=lambda x: x[1]["items_per_s_per_device"]) if got else None

    ob = best_of("ours")
    if not reference_each and ob is not None and runs[ob[0]].get("diffusers") is None and ob[0] != batches[0]:
        # diffusers at ours' best batch, for the like-for-like ratio there.
        b, res = ob[0], runs[ob[0]]
        first = runs[batches[0]]
        need = predict_s(first, "diffusers", batches[0], b) if first.get("diffusers") else 0.0
        label = f"{what} batch {b}"
        if need > left():
            emit(row(section, f"{label}: diffusers", status="skipped", side="diffusers", batch=b, mode=mode,
                     note=f"time budget: about {need:.0f} s needed, {max(0.0, left()):.0f} s left"))
        else:
            try:
                reference_run(settings(cfg, (mode,), b, n, info["platform"]), (mode,), {mode: res}, log)
            except Exception as e:
                res["diffusers_error"] = one_line(e)
            add_reference_figures(res)
            if res.get("diffusers") is None:
                emit(failed(section, f"{label}: diffusers", res.get("diffusers_error") or "did not run",
                            side="diffusers", batch=b, mode=mode))
            else:
                name = f"diffusers {(res.get('torch') or {}).get('dtype', cfg.torch_dtype)} SDPA"
                emit(row(section, f"{label}: {name}", value=res["diffusers"]["items_per_s_per_device"], unit=unit,
                         util=res["diffusers"].get("utilisation_of_measured_peak"),
                         vs_ref=f"ours {res['ratio']:.2f}x" if "ratio" in res else "",
                         note=_figures_note(res["diffusers"]), side="diffusers", figures=res["diffusers"], batch=b,
                         mode=mode))
    tb = best_of("diffusers")
    ratio = ob[1]["items_per_s_per_device"] / tb[1]["items_per_s_per_device"] if ob and tb else None
    for side, bb in (("ours", ob), ("diffusers", tb)):
        check = f"{what} best batch: {side}"
        if bb is None:
            emit(failed(section, check, f"no {side} run succeeded", side=side, best=True, mode=mode))
        else:
            emit(row(section, check, value=bb[1]["items_per_s_per_device"], unit=unit,
                     util=bb[1].get("utilisation_of_measured_peak"),
                     vs_ref=f"{ratio:.2f}x diffusers" if side == "ours" and ratio else "",
                     note=f"batch {bb[0]}", side=side, best=True, batch=bb[0], mode=mode))


# The batch-1 U-Net rows that ride along with the first sampling run.
_EXTRA_LABELS = {"unet": "U-Net it/s batch 1 (one CFG step: 2 rows)"}
_EXTRA_UNITS = {"unet": "it/s"}
_EXTRA_VALUES = {"unet": _its}


def section_speed(cfg: CheckConfig, emit, log) -> dict:
    """Section 3: U-Net it/s at batch 1 and images/s over a batch sweep,
    ours vs diffusers (at batch 1 and at ours' best batch), at SD1.5 512 px,
    50 steps, CFG 7.5."""
    info = require_gpu(cfg)
    emit_env(emit, info)
    batches = tuple(cfg.batches)
    if batches[0] != 1:
        batches = (1, *[b for b in batches if b != 1])  # the U-Net it/s figure is at batch 1
    _sweep(cfg, "speed", "sample", batches, info, emit, log, "img/s",
           f"sample {cfg.steps} steps CFG 7.5, images/s per GPU,", first_extra=("unet",), reference_each=False)
    return info


def section_train(cfg: CheckConfig, emit, log) -> dict:
    """Section 4: the bench's train mode at the model's native size (512 px,
    64x64 latents, for SD1.5), ours vs diffusers at each of
    `cfg.train_batches`."""
    info = require_gpu(cfg)
    emit_env(emit, info)
    px = "" if cfg.smoke else " at 512 px"
    _sweep(cfg, "train", "train", cfg.train_batches, info, emit, log, "samples/s",
           f"U-Net train{px} samples/s per GPU,")
    return info


def section_sdxl(cfg: CheckConfig, emit, log) -> dict:
    """Section 5: SDXL base at 1024x1024 (tiny SDXL with --smoke),
    `cfg.sdxl_steps` Euler steps, CFG 7.5: images/s per GPU at batch 1 and
    the best of `cfg.sdxl_batches`, ours vs diffusers' StableDiffusionXLPipeline
    (at batch 1 and at ours' best batch), then the MLPerf anchor row."""
    info = require_gpu(cfg)
    emit_env(emit, info)
    batches = tuple(cfg.sdxl_batches)
    if batches[0] != 1:
        batches = (1, *[b for b in batches if b != 1])  # batch 1 always: the latency figure
    best = {}

    def keep(r):
        if r["data"].get("best") and r["status"] == "ok":
            best[r["data"]["side"]] = r
        emit(r)

    size = "tiny SDXL" if cfg.smoke else "SDXL 1024x1024"
    _sweep(cfg, "sdxl", "sample", batches, info, keep, log, "img/s",
           f"{size} {cfg.sdxl_steps} steps CFG 7.5, images/s per GPU,", reference_each=False,
           model=cfg.sdxl_model, steps=cfg.sdxl_steps)
    emit(sdxl_anchor_row(best.get("ours"), cfg.sdxl_steps, info))
    return info


def sdxl_anchor_row(ours: dict | None, steps: int, info: dict) -> dict:
    """The MLPerf anchor (`SDXL_ANCHOR`), with ours' best images/s scaled to
    its step count beside it (x steps / anchor steps: the U-Net evaluations
    are nearly all of an SDXL call; the text encoders and the decode make the
    scaled figure a little high)."""
    a = SDXL_ANCHOR
    check = f"anchor: {a['name']}, {a['steps']} steps, images/s per {a['device']}"
    note = "MLPerf Inference offline, 1024x1024, Euler"
    data = {"anchor": a, "side": "anchor"}
    if ours is None:
        return row("sdxl", check, value=a["images_per_s"], unit="img/s", note=note + "; no figure of ours to set "
                   "beside it", **data)
    scaled = ours["value"] * steps / a["steps"]
    device = info.get("torch_device_name") or info.get("device_kind") or "this device"
    return row("sdxl", check, value=a["images_per_s"], unit="img/s",
               vs_ref=f"ours {scaled / a['images_per_s']:.2f}x", util=None,
               note=(f"{note}; ours {ours['value']:.3g} img/s at {steps} steps (batch {ours['data']['batch']}) on "
                     f"{device} -> {scaled:.3g} at {a['steps']}"),
               ours_at_anchor_steps=scaled, **data)


SECTION_FUNCS = {"parity": section_parity, "attention": section_attention, "speed": section_speed,
                 "train": section_train, "sdxl": section_sdxl}


def emit_env(emit, info: dict) -> None:
    """A hidden row carrying what the section's process saw of the device."""
    emit({"section": "_env", "data": info})


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


def _gap(value: float, target: float) -> tuple[str, str]:
    if value >= target:
        return f"+{value / target - 1:.0%}", "met"
    return f"{value / target - 1:.0%} (needs {target / value:.2f}x)" if value > 0 else "no figure", "MISSED"


def target_rows(rows: Sequence[dict]) -> list[dict]:
    """The targets table from the speed and train rows: each target's
    figure, the gap to it, met or MISSED (FAILED when its figure is)."""

    def find(pred):
        for r in rows:
            if r["section"] in ("speed", "train") and pred(r):
                return r
        return None

    def figure(section, side, **match):
        r = find(lambda r: r["section"] == section and r["data"].get("side") == side
                 and all(r["data"].get(k) == v for k, v in match.items()))
        return r if r is not None and r["status"] == "ok" else None

    specs = [
        ("U-Net it/s, batch 1 (CFG step)", "unet_its_b1", "it/s", ("speed", {"metric": "unet_b1"})),
        ("images/s per GPU, best batch", "images_per_s_best", "img/s", ("speed", {"best": True, "mode": "sample"})),
        ("train samples/s per GPU", "train_samples_per_s", "samples/s", ("train", {"best": True})),
    ]
    out = []
    have = {r["section"] for r in rows}
    for check, key, unit, (section, match) in specs:
        if section not in have:
            continue
        ours, theirs = figure(section, "ours", **match), figure(section, "diffusers", **match)
        target = TARGETS[key]
        if ours is None:
            out.append(failed("targets", f"{check} >= {target:g}", "no figure: the run FAILED or was skipped",
                              target=target, key=key))
        else:
            gap, status = _gap(ours["value"], target)
            out.append(row("targets", f"{check} >= {target:g}", value=ours["value"], unit=unit, limit=f">= {target:g}",
                           gap=gap, status=status, note=ours["note"], target=target, key=key))
        rcheck = f"ours/diffusers, {check} >= {TARGETS['ratio']:g}x"
        if ours is None or theirs is None:
            out.append(failed("targets", rcheck, "no figure for " + ("ours" if ours is None else "diffusers"),
                              target=TARGETS["ratio"], key=f"ratio_{key}"))
        else:
            ratio = ours["value"] / theirs["value"]
            gap, status = _gap(ratio, TARGETS["ratio"])
            out.append(row("targets", rcheck, value=ratio, unit="x", limit=f">= {TARGETS['ratio']:g}x", gap=gap,
                           status=status, note=f"{ours['value']:.3g} vs {theirs['value']:.3g} {unit}",
                           target=TARGETS["ratio"], key=f"ratio_{key}"))
    return out


# --------------------------------------------------------------------------
# Running the sections
# --------------------------------------------------------------------------


class _Rows:
    """Collects rows; in a child, also appends each to a JSON-lines file at
    once, so the parent keeps them even if the child dies later."""

    def __init__(self, path: str | None = None):
        self.rows: list[dict] = []
        self.path = path

    def __call__(self, r: dict) -> None:
        self.rows.append(r)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(r, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars and anything else: as a number if it is one, else text.
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def run_section_here(section: str, cfg: CheckConfig) -> list[dict]:
    """Runs one section in this process; an error that escapes the section
    becomes a FAILED row (NoGPU is raised: the whole run stops)."""
    emit = _Rows()
    try:
        SECTION_FUNCS[section](cfg, emit, Log(section))
    except NoGPU:
        raise
    except Exception as e:
        emit(failed(section, f"{section} section", f"stopped: {one_line(e)}"))
    return emit.rows


def run_section_child(section: str, cfg: CheckConfig, timeout_s: float) -> list[dict]:
    """Runs one section in a child process of this module, passing its
    stderr through; a crash, kill or timeout becomes a FAILED row after the
    rows the child had written. NoGPU in the child is raised here."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        cmd = [sys.executable, "-m", "t2i_jax.bench.gpu_check", "--_child", section, "--_rows", str(rows_path),
               "--_config", json.dumps(cfg.to_json())]
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                errors="replace")
        tail: list[str] = []

        def pump():
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                tail.append(line.rstrip())
                del tail[:-40]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=10)
        rows = _read_rows(rows_path)
    if rc == _CHILD_NO_GPU and not timed_out:
        raise NoGPU(next((ln for ln in reversed(tail) if "NoGPU" in ln or "no GPU" in ln),
                         "jax sees no GPU").split("NoGPU: ")[-1])
    if timed_out:
        rows.append(failed(section, f"{section} section",
                           f"timed out after {timeout_s:.0f} s (killed); rows above are what it finished"))
    elif rc != 0:
        last = next((ln for ln in reversed(tail) if ln.strip() and not ln.startswith("[gpu_check")), "")
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        rows.append(failed(section, f"{section} section", f"child process died ({how}): {last[-200:]}"))
    return rows


def _read_rows(path: Path) -> list[dict]:
    """The rows a child wrote; a line cut short by a kill is dropped."""
    rows = []
    if path.exists():
        for ln in path.read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    return rows


def _child_main(section: str, rows_path: str, config: str) -> int:
    """Entry of a section's child process."""
    cfg = CheckConfig.from_json(json.loads(config))
    prepare_environment(cfg)
    emit = _Rows(rows_path)
    try:
        SECTION_FUNCS[section](cfg, emit, Log(section))
    except NoGPU as e:
        print(f"NoGPU: {e}", file=sys.stderr, flush=True)
        return _CHILD_NO_GPU
    except Exception as e:
        emit(failed(section, f"{section} section", f"stopped: {one_line(e)}"))
    return 0


def run_all(cfg: CheckConfig) -> dict:
    """Runs the sections in order under the time budget; returns the report
    (rows of every section plus the targets, environment, versions)."""
    cfg = cfg.filled()
    start = time.time()
    end = start + cfg.budget_s
    rows: list[dict] = []
    env: dict = {}
    section_wall = {}
    for section in SECTIONS:
        if section not in cfg.sections:
            continue
        t0 = time.time()
        left = end - t0
        if section in _HARD_LIMIT_S:
            deadline, limit = None, _HARD_LIMIT_S[section]
        else:
            # A weighted share of what is left among this and the sweeps still to come
            # (speed 60% when only train follows).
            later = [x for x in SECTIONS[SECTIONS.index(section):] if x in cfg.sections and x in _SWEEP_WEIGHTS]
            share = _SWEEP_WEIGHTS[section] / sum(_SWEEP_WEIGHTS[x] for x in later)
            deadline = t0 + max(0.0, left) * share
            limit = max(0.0, deadline - t0) + 240.0  # one run may overrun its estimate
        sub = dataclasses.replace(cfg, deadline=deadline)
        if cfg.isolate:
            got = run_section_child(section, sub, limit)
        else:
            got = run_section_here(section, sub)
        for r in got:
            if r["section"] == "_env":
                env = env or r["data"]
            else:
                rows.append(r)
        section_wall[section] = time.time() - t0
    rows += target_rows(rows)
    return {"rows": rows, "env": env, "config": cfg.to_json(), "section_wall_s": section_wall,
            "wall_s": time.time() - start}


def exit_status(rows: Sequence[dict]) -> int:
    """1 when a parity row failed or did not run, or an attention row is over
    its threshold; else 0."""
    for r in rows:
        if r["section"] == "parity" and r["status"] in ("FAIL", "FAILED"):
            return EXIT_FAILED
        if r["section"] == "attention" and r["status"] == "FAIL":
            return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

_COLUMNS = ("section", "check", "value", "unit", "vs ref", "util(mm)", "limit", "gap", "status", "note")


def _cells(r: dict) -> list[str]:
    v = r["value"]
    if v is None:
        value = "-"
    elif r["unit"] == "rel err":
        value = f"{v:.2e}"
    elif r["unit"] == "x":
        value = f"{v:.2f}"
    else:
        value = f"{v:.4g}"
    util = "-" if r.get("util") is None else f"{r['util']:.1%}"
    return [r["section"], r["check"], value, r["unit"] or "-", r["vs_ref"] or "-", util, r["limit"] or "-",
            r["gap"] or "-", r["status"], r["note"] or ""]


def format_table(report: dict) -> str:
    """The rows as one fixed-width text table (the note column last, unpadded)."""
    cells = [list(_COLUMNS)] + [_cells(r) for r in report["rows"]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c[:-1], widths)) + "  " + c[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def format_markdown(report: dict) -> str:
    """A BENCHMARKS.md section: heading with date and device, the command,
    software versions, settings, and the rows as a markdown table."""
    env, v = report.get("env") or {}, report.get("versions") or {}
    device = env.get("torch_device_name") or env.get("device_kind") or "unknown device"
    when = report["date"].replace("T", " ").replace("+00:00", " UTC")
    soft = ", ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin",
                                             "flax", "optax", "numpy", "torch", "diffusers", "transformers") if k in v)
    extra = []
    if env.get("torch_cuda"):
        extra.append(f"torch CUDA {env['torch_cuda']}")
    if env.get("torch_cudnn"):
        extra.append(f"cuDNN {env['torch_cudnn']}")
    c = report["config"]
    lines = [
        f"### gpu_check — {device} — {when}",
        "",
        "```",
        f"$ {report['command']}",
        f"wall {report['wall_s']:.0f} s, exit status {report['exit_status']}",
        "```",
        "",
        f"Device: {device} ({env.get('device_count', '?')} x jax `{env.get('device_kind', '?')}`, platform "
        f"{env.get('platform', '?')}, compute capability {env.get('compute_capability') or '-'}"
        + (f"; nvidia-smi: {report['nvidia_smi']}" if report.get("nvidia_smi") else "") + ").",
        f"Software: {soft}" + (f" ({', '.join(extra)})" if extra else "") + ".",
        (f"Settings: {'smoke (tiny configs)' if c['smoke'] else 'SD1.5, 512x512'}, {c['steps']} PNDM steps, "
         f"CFG 7.5, sample batches {','.join(map(str, c['batches']))}, train batches "
         f"{','.join(map(str, c['train_batches']))} per GPU, diffusers "
         f"{c['torch_dtype'] if env.get('platform') == 'gpu' else 'fp32 (on a CPU)'} SDPA, budget "
         f"{c['budget_s']:.0f} s, seed {c['seed']}."
         + (f" SDXL: {'tiny' if c['smoke'] else 'base, 1024x1024'}, {c.get('sdxl_steps')} Euler steps, batches "
            f"{','.join(map(str, c.get('sdxl_batches') or ()))} per GPU." if "sdxl" in c["sections"] else "")),
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for r in report["rows"]:
        lines.append("| " + " | ".join(_md_escape(x) for x in _cells(r)) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _int_list(name: str):
    def parse(v: str) -> tuple[int, ...]:
        try:
            out = tuple(int(x) for x in v.split(",") if x.strip())
        except ValueError:
            out = ()
        if not out or any(b < 1 for b in out):
            raise argparse.ArgumentTypeError(f"{name} {v!r} must be comma-separated positive integers, e.g. 1,4,8")
        return out
    return parse


def _sections(v: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in v.split(",") if x.strip())
    bad = [x for x in out if x not in SECTIONS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"sections {v!r}: choose from {','.join(SECTIONS)}")
    return out


def parser() -> argparse.ArgumentParser:
    """The command-line flags (each help line says its default)."""
    b16 = PARITY_LIMITS["bf16"]
    p = argparse.ArgumentParser(
        prog="python -m t2i_jax.bench.gpu_check",
        description="Parity, attention numerics, speed and training throughput on one GPU, in one table "
                    "(bash scripts/gpu_check.sh runs it after checking for a GPU and installing carried wheels).",
        epilog=(f"Thresholds: parity fp32 <= {PARITY_LIMITS['fp32']:.0e} (every model); bf16 <= {b16['factor']:g}x "
                f"the torch bf16 cast's own error in the same run, within [{b16['floor']:.0e}, {b16['cap']:.0e}]; "
                f"cuDNN vs XLA attention <= {ATTENTION_LIMIT:.0e}. Targets: U-Net it/s at batch 1 >= "
                f"{TARGETS['unet_its_b1']:g}, images/s best batch >= {TARGETS['images_per_s_best']:g}, training >= "
                f"{TARGETS['train_samples_per_s']:g} samples/s per GPU, ours/diffusers >= {TARGETS['ratio']:g}x. "
                "Exit status 1 when a parity row (or an attention threshold) fails, 2 without a GPU or with bad "
                "flags."))
    p.add_argument("--smoke", action="store_true",
                   help="tiny configs, 2 steps, batch 1 (train 2): every section in well under a minute, on a CPU "
                        "too (default: off)")
    p.add_argument("--sections", type=_sections, default=SECTIONS, metavar="LIST",
                   help=f"comma-separated, from {','.join(SECTIONS)} (default: all)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the report (every row and figure) here (default: none)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="write the table as a BENCHMARKS.md section (date, device, versions) here (default: none)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                   help="seconds for the whole run: the speed/train sweeps start no run that would end later "
                        f"(default: {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--batches", type=_int_list("batches"), default=None, metavar="LIST",
                   help="sampling batches per GPU, tried in order; batch 1 always runs first, for the U-Net it/s "
                        "(default: 1,4,8,16,32; 1 with --smoke)")
    p.add_argument("--train-batches", type=_int_list("train batches"), default=None, metavar="LIST",
                   help="training batches per GPU (default: 16,32; 2 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 50; 2 with --smoke)")
    p.add_argument("--sdxl-batches", type=_int_list("sdxl batches"), default=None, metavar="LIST",
                   help="SDXL sampling batches per GPU, tried in order after batch 1 (default: 1,4,8; 1 with --smoke)")
    p.add_argument("--sdxl-steps", type=int, default=None,
                   help="SDXL sampler (Euler) steps (default: 30; 2 with --smoke)")
    p.add_argument("--torch-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="diffusers' dtype in the speed and train sections; fp32 on a CPU (default: fp16)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile diffusers' U-Net (default: off)")
    p.add_argument("--seed", type=int, default=0, help="one seed for every random weight and input (default: 0)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="run each section in a child process of its own (default, except with --smoke)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="run every section in this process (default with --smoke)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="jax persistent compilation cache folder, so that a rerun compiles less (default: none)")
    p.add_argument("--parity-latent", type=int, default=None, metavar="N",
                   help="latent side of the parity inputs (default: 64, i.e. 512 px; 16 with --smoke)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the full-size configs even where jax sees no GPU; slow, for checking the check itself "
                        "(default: off)")
    # The child-process protocol (internal).
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_rows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    """Parsed flags -> CheckConfig; ValueError names a bad flag and its value."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be a positive integer, e.g. 50")
    if args.sdxl_steps is not None and args.sdxl_steps < 1:
        raise ValueError(f"--sdxl-steps {args.sdxl_steps} must be a positive integer, e.g. 30")
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s {args.budget_s:g} must be positive, e.g. {DEFAULT_BUDGET_S:.0f}")
    if args.parity_latent is not None and (args.parity_latent < 8 or args.parity_latent % 8):
        raise ValueError(f"--parity-latent {args.parity_latent} must be a multiple of 8 (the U-Net halves it "
                         "3 times), e.g. 64")
    return CheckConfig(smoke=args.smoke, sections=tuple(args.sections), seed=args.seed, steps=args.steps,
                       batches=args.batches, train_batches=args.train_batches, sdxl_steps=args.sdxl_steps,
                       sdxl_batches=args.sdxl_batches, torch_dtype=args.torch_dtype,
                       torch_compile=args.torch_compile, budget_s=args.budget_s, isolate=args.isolate,
                       compile_cache=args.compile_cache, parity_latent=args.parity_latent, allow_cpu=args.allow_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check, prints the table, writes --json/--markdown; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args._child:
        return _child_main(args._child, args._rows, args._config)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))  # exits 2, as argparse's own errors do
    prepare_environment(cfg)
    from t2i_jax.bench import cli as bench_cli

    started = datetime.datetime.now(datetime.UTC)
    try:
        report = run_all(cfg)
    except NoGPU as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return EXIT_NO_GPU
    report.update(
        command="python -m t2i_jax.bench.gpu_check " + shlex.join(argv),
        argv=argv, date=started.isoformat(timespec="seconds"), versions=bench_cli.versions(),
        host=platform.node(), nvidia_smi=nvidia_smi(),
        thresholds={"parity": PARITY_LIMITS, "attention": ATTENTION_LIMIT, "targets": TARGETS},
    )
    report["exit_status"] = exit_status(report["rows"])
    print(format_table(report), flush=True)
    parity = [r for r in report["rows"] if r["section"] == "parity"]
    bad = [r for r in parity if r["status"] in ("FAIL", "FAILED")]
    verdict = f"{len(bad)} parity row(s) failed" if bad else ("parity passed" if parity else "no parity rows")
    print(f"\ngpu_check: {len(report['rows'])} rows in {report['wall_s']:.0f} s; {verdict}; "
          f"exit status {report['exit_status']}", flush=True)
    if args.json:
        bench_cli.write_json(args.json, json.loads(json.dumps(report, default=_json_default)))
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_markdown(report))
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
