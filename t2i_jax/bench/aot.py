"""Compile the sampler and the train steps for a TPU topology ahead of time, on any machine.

With the `libtpu` wheel installed (`pip install -e ".[tpu-aot]"`),
`jax.experimental.topologies` gives the devices of a TPU slice ("v5e:4x4",
"v6e:2x2", "v5p:2x2x1") on a CPU-only host, and `jit(...).lower(abstract
arguments).compile()` runs the real TPU compiler for them. This module does
that for the project's own programs, on the project's own mesh and partition
rules, with every model built abstractly (shapes only, nothing allocated):

    sample      `pipeline.Sampler.loop`: the jitted denoise+decode loop, at a
                global batch, params replicated, the batch split over all chips;
    train_ldm   `train.ldm.setup_step`'s step (the trainer's real step via
                `train.loop.make_train_step`) on cached latents, with the
                config's FSDP axis, remat and optimizer;
    train_clip  CLIP's contrastive step (`train.clip.make_objective` through
                the same `make_train_step`), its `PARTITION_RULES`.

SDXL models (`--model sdxl`, `tiny-sdxl`): the sampler's SDXL loop (both text
encoders' context, pooled text and time ids into every U-Net evaluation; the
program `bench.models.sample_loop_program` builds) and the trainer's SDXL step
with configs/sdxl_finetune.py's settings (`ldm_config`); no CLIP step.

Per chip it reports what XLA planned (`memory_analysis`: arguments, outputs,
temporaries) split into params / optimizer state / activations, whether that
fits the chip's HBM (`tpu_chips.CHIPS`), FLOPs and bytes accessed
(`cost_analysis`), a roofline bound max(FLOPs / peak, bytes / bandwidth) and
from it an upper bound on items/s per chip, and the collectives of each
compiled program with where they sit (inside the denoising loop's while body
or not). These are compiler figures and bounds, not measurements.

XLA counts a while body once: the loop program's cost is one trip plus what
is outside the loop. The sampler's totals therefore add (trips - 1) x the
U-Net evaluation compiled alone on the same mesh (the scheduler's few
element-wise ops in the body are counted once); the U-Net evaluations per trip
are counted in the loop's jaxpr (calls of the U-Net's input convolution).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from t2i_jax import parallel, pipeline
from t2i_jax.bench import core, tpu_chips
from t2i_jax.bench import models as bench_models
from t2i_jax.schedulers.schedule import SD_SCHEDULER

__all__ = ["WHAT", "AotSettings", "libtpu_available", "topology_devices", "abstract", "collectives",
           "compile_sample", "compile_train_ldm", "train_ldm_program", "train_ldm_model_flops",
           "train_bytes_lower_bound", "compile_train_clip", "run", "ldm_config", "default_what"]

WHAT = ("sample", "train_ldm", "train_clip")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# The CLIP each named model is trained with (its text tower is the SD text encoder's family).
CLIP_FOR = {"tiny": "tiny", "sd15": "vit-l-14", "sd21": "vit-l-14"}


@dataclasses.dataclass(frozen=True)
class AotSettings:
    """One ahead-of-time compile. None: the model's usual value."""

    topology: str = "v5e:2x2"  # a jax topology name; "tpu:" prefix allowed
    model: str = "tiny"  # one of bench.core.MODELS
    resolution: int | None = None  # image side (default: native)
    batch: int | None = None  # global batch (default: one per chip; sampling and training alike)
    what: tuple[str, ...] = WHAT
    steps: int = 50  # sampler steps
    scheduler: str | None = None  # sampler (default: the model's: PNDM for SD 1.x/2.x, Euler for SDXL)
    guidance_scale: float = 7.5
    fsdp: int | None = None  # train: FSDP degree (default: the config's mesh.fsdp)
    remat: bool | None = None  # train: rematerialise U-Net / CLIP layers (default: the config's)
    clip_batch: int | None = None  # train_clip global batch (default: `batch`)
    grad_accum: int | None = None  # train: micro-batches per step; the global batch stays `batch` (None: the config's)
    attention_impl: str | None = None  # train_ldm: U-Net attention, e.g. "chunked" (default: the config's)
    fsdp_min_size: int | None = None  # train: tensors with fewer elements stay replicated (default: the config's)
    clip_overrides: tuple[tuple[str, object], ...] = ()  # train_clip: transformers CLIPConfig fields (tests)
    unet_overrides: tuple[tuple[str, object], ...] = ()  # UNetConfig fields replaced (tests: a smaller U-Net)


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------


def _accelerator_type(topology: str, n: int) -> str:
    kind = topology.split(":")[0]
    return {"v5e": f"v5litepod-{n}", "v6e": f"v6e-{n}", "v5p": f"v5p-{2 * n}", "v4": f"v4-{2 * n}"}.get(kind, kind)


def _quiet_libtpu(topology: str) -> None:
    # libtpu reads these when it first loads. Without TPU_ACCELERATOR_TYPE it warns that it cannot
    # find the host's TPU; ALLOW_MULTIPLE_LIBTPU_LOAD lets several processes (pytest workers, a
    # second shell) compile at once instead of failing on /tmp/libtpu_lockfile.
    dims = [int(d) for d in re.findall(r"\d+", topology.split(":", 1)[-1])]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology, math.prod(dims) if dims else 1))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
    """Whether the libtpu wheel (the TPU compiler) is installed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list:
    """The TPU devices of a topology name ("v5e:4x4", "tpu:v6e:2x2", "v5p:2x2x1"), compile-only."""
    name = topology.removeprefix("tpu:")
    if not libtpu_available():
        raise RuntimeError(f"compiling for TPU topology {name!r} needs the libtpu wheel; "
                           'install it with pip install -e ".[tpu-aot]"')
    _quiet_libtpu(name)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001  libtpu's message names no fix
        raise ValueError(f"TPU topology {name!r} was refused by libtpu ({e}); name one as KIND:SHAPE, "
                         "e.g. v5e:2x2, v5e:4x4, v5e:16x16, v6e:2x4, v5p:2x2x1, v4:2x2x1") from e


# --------------------------------------------------------------------------
# Abstract values
# --------------------------------------------------------------------------


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) laid out as `shardings` (a tree or one)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the first device's shard)."""
    total = 0
    for a in jax.tree_util.tree_leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        total += math.prod(shape) * jnp.dtype(a.dtype).itemsize
    return int(total)


# --------------------------------------------------------------------------
# Compiled-program figures
# --------------------------------------------------------------------------

_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_S32_CONST = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ASYNC_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\sasync-start\(.*?calls=%?([\w.\-]+)")
# libtpu emits a reduce-scatter as a custom fusion named all-reduce-scatter (an all-reduce and a slice
# inside), and may fuse other collectives with their neighbours the same way.
_FUSED_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\sfusion\(.*?kind=kCustom, calls=%?((all-reduce-scatter|"
                       r"reduce-scatter|all-gather|all-reduce|all-to-all|collective-permute)[\w.\-]*)")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(1)
                comps[current] = []
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps


def _callees(lines: Sequence[str]) -> set[str]:
    out = set()
    for line in lines:
        out.update(_CALLS.findall(line))
        for group in _CALL_LISTS.findall(line):
            out.update(x.strip().lstrip("%") for x in group.split(",") if x.strip())
    return out


def _trips_from_condition(lines: Sequence[str]) -> int | None:
    # A fori_loop from 0 compiles to `i < N` with N its one integer constant; libtpu's compiled
    # HLO drops the known_trip_count annotation, so read N there.
    consts = [int(c) for line in lines for c in _S32_CONST.findall(line)]
    return consts[0] if len(consts) == 1 and any("direction=LT" in line for line in lines) else None


def collectives(hlo: str) -> dict:
    """The collectives of a compiled (SPMD-partitioned) HLO module and where they sit.

    Returns {"ops": [{"op", "name", "computation", "in_while", "while_trips"}], "counts":
    {op: n}, "in_while": {op: n}, "whiles": [{"body", "trips"}]}. `in_while`: the op is in a
    while body or a computation it calls (fusions, async wrappers, nested whiles); `while_trips`
    the known trip count of the outermost while it is in (None when XLA does not know it).
    """
    comps = _computations(hlo)
    graph = {name: _callees(lines) for name, lines in comps.items()}
    whiles = []
    for lines in comps.values():
        for line in lines:
            m = _WHILE.search(line)
            if m:
                t = _TRIP.search(line)
                trips = int(t.group(1)) if t else _trips_from_condition(comps.get(m.group(1), ()))
                whiles.append({"body": m.group(2), "trips": trips})

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            todo.extend(graph.get(c, ()))
        return seen

    # Outermost first: a while reached from another while's body is nested in it.
    inside: dict[str, int | None] = {}
    reached = [(w, reach(w["body"])) for w in whiles]
    nested = {w["body"] for w, r in reached for w2 in whiles if w2 is not w and w["body"] in reach(w2["body"])}
    for w, r in reached:
        if w["body"] in nested:
            continue
        for c in r:
            inside.setdefault(c, w["trips"])
    ops = []
    for comp, lines in comps.items():
        for line in lines:
            m = _OP.match(line)
            op = m.group(2) if m else None
            if op is None and (f := _FUSED_OP.match(line)):
                op, m = ("reduce-scatter" if f.group(3) == "all-reduce-scatter" else f.group(3)), f
            if op is None:
                a = _ASYNC_OP.match(line)
                if a:  # an async wrapper: its op is the one the wrapped computation holds
                    wrapped = " ".join(comps.get(a.group(2), ()))
                    op = next((c for c in COLLECTIVES if re.search(rf"\s{c}\(", wrapped)), None)
                    m = a
            if op is None:
                continue
            ops.append({"op": op, "name": m.group(1), "computation": comp, "in_while": comp in inside,
                        "while_trips": inside.get(comp)})
    # An async wrapper's inner op would count twice: keep the wrapper, drop ops in wrapped computations
    # that an async-start calls.
    wrapped = set()
    for lines in comps.values():
        for line in lines:
            if (a := _ASYNC_OP.match(line) or _FUSED_OP.match(line)):
                wrapped |= reach(a.group(2))
    ops = [o for o in ops if o["computation"] not in wrapped]
    counts: dict[str, int] = {}
    in_loop: dict[str, int] = {}
    for o in ops:
        counts[o["op"]] = counts.get(o["op"], 0) + 1
        if o["in_while"]:
            in_loop[o["op"]] = in_loop.get(o["op"], 0) + 1
    return {"ops": ops, "counts": counts, "in_while": in_loop, "whiles": whiles}


def is_oom(e: Exception) -> bool:
    """Whether a compile failed because the program does not fit the chip's memory."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    cost = cost or {}
    opt = cost.get("optimal_seconds")
    return {"flops": float(cost.get("flops", 0.0)) or None,
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)) or None,
            # libtpu's own estimate; it came back negative for real programs (a U-Net forward), so it is
            # kept only where positive.
            "optimal_seconds": float(opt) if opt is not None and opt > 0 else None}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    mem = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp",
                                                                       "generated_code")}
    # XLA's heap-simulated peak. `temp` leaves out buffers that live inside a while body (a
    # chunked attention's scores, a grad_accum scan's micro-batch activations: seen 0 bytes of
    # temporaries for a program whose peak held 36 MiB of them); the peak counts them.
    mem["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    # What the program holds at its peak: arguments, outputs not aliased to (donated) arguments and
    # temporaries, or XLA's peak where that is more; and its code.
    held = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    mem["total"] = max(held, mem["peak"]) + mem["generated_code"]
    return mem


def roofline(flops: float | None, bytes_accessed: float | None, chip: tpu_chips.Chip) -> dict:
    """max(FLOPs / peak, bytes / bandwidth) for one chip: a lower bound on the program's time."""
    t_c = flops / chip.bf16_flops_per_s if flops else None
    t_m = bytes_accessed / chip.hbm_bytes_per_s if bytes_accessed else None
    times = [t for t in (t_c, t_m) if t is not None]
    bound = max(times) if times else None
    return {"compute_s": t_c, "memory_s": t_m, "bound_s": bound,
            "bound_by": None if bound is None else ("compute" if bound == t_c else "memory")}


def _figures(compiled, chip, *, items_per_chip: float, param_bytes: int, optimizer_bytes: int = 0,
             extra_flops: float = 0.0, extra_bytes: float = 0.0, compile_s: float) -> dict:
    mem = _memory(compiled)
    held = mem["argument"] + mem["output"] - mem["alias"]  # what is not a temporary
    cost = _cost(compiled)
    flops = (cost["flops"] or 0.0) + extra_flops or None
    byts = (cost["bytes_accessed"] or 0.0) + extra_bytes or None
    roof = roofline(flops, byts, chip)
    out = {
        "compile_s": compile_s,
        "memory_per_chip": {**mem, "params": param_bytes, "optimizer_state": optimizer_bytes,
                            "activations": max(mem["temp"], mem["peak"] - held), "hbm": chip.hbm_bytes,
                            "fits": mem["total"] <= chip.hbm_bytes, "headroom": chip.hbm_bytes - mem["total"]},
        "xla_cost_per_chip": cost,
        "flops_per_chip": flops, "bytes_accessed_per_chip": byts,
        "roofline_per_chip": roof,
        "items_per_chip": items_per_chip,
        "flops_per_item": flops / items_per_chip if flops else None,
        "max_items_per_s_per_chip": items_per_chip / roof["bound_s"] if roof["bound_s"] else None,
    }
    hlo, error = hlo_text(compiled)
    if hlo is None:  # the figures above stand; only the collectives are unknown
        out["collectives"] = {"counts": {}, "in_while": {}, "whiles": [], "error": error}
        out["collective_ops"] = []
        return out
    col = collectives(hlo)
    out["collectives"] = {k: col[k] for k in ("counts", "in_while", "whiles")}
    out["collective_ops"] = [{k: o[k] for k in ("op", "name", "in_while", "while_trips")} for o in col["ops"]]
    return out


def hlo_text(compiled) -> tuple[str | None, str | None]:
    """(the compiled module's HLO text, None), or (None, why) where jax cannot print it.

    libtpu 0.0.52 compiled an SD1.5 train step for v6e:2x4 (66 min here) whose module jax 0.10.2
    then failed to rebuild for printing ("Async done requires its operand to be an asynchronous
    op"): the memory and cost figures are known by then and are not thrown away with it.
    """
    try:
        return compiled.as_text(), None
    except Exception as e:  # noqa: BLE001  any failure to print leaves the rest of the report valid
        return None, f"the compiled HLO could not be printed, so its collectives are not counted: {str(e)[:300]}"


def _collective_counts(compiled) -> dict:
    hlo, error = hlo_text(compiled)
    return collectives(hlo)["counts"] if hlo is not None else {"error": error}


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


# --------------------------------------------------------------------------
# Counting calls in a jaxpr
# --------------------------------------------------------------------------


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _count_convs(jaxpr, kernel_shape: tuple) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and tuple(eqn.invars[1].aval.shape) == kernel_shape:
            n += 1
        for sub in _sub_jaxprs(eqn):
            n += _count_convs(sub, kernel_shape)
    return n


def _loops(jaxpr):
    """(trips, body jaxpr) of every scan / while in `jaxpr`, outermost first."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["length"], eqn.params["jaxpr"].jaxpr
        elif eqn.primitive.name == "while":
            yield None, eqn.params["body_jaxpr"].jaxpr
        else:
            for sub in _sub_jaxprs(eqn):
                yield from _loops(sub)


def unet_evals_per_trip(fn: Callable, args: Sequence, kernel_shape: tuple, trips: int) -> int:
    """U-Net calls in one trip of `fn`'s loop of `trips` trips: calls of the convolution with the
    U-Net's `conv_in` kernel shape (no other layer in the body has it) in the loop body's jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    for length, body in _loops(jaxpr):
        if length in (trips, None):
            return _count_convs(body, kernel_shape)
    raise ValueError(f"no loop of {trips} trips in the sampler program")


# --------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------


def _resolution(model: str, resolution: int | None) -> int:
    spec = core.MODELS[model]
    return resolution or spec.unet_config().sample_size * spec.vae_config().downsample_factor


def _scheduler(s: AotSettings) -> str:
    return s.scheduler or core.MODELS[s.model].scheduler


def compile_sample(s: AotSettings, mesh: Mesh, chip: tpu_chips.Chip) -> dict:
    """`pipeline.Sampler`'s txt2img loop (denoise + decode) for `s.batch` images on `mesh`, the program
    `bench.models.sample_loop_program` builds (SDXL: both encoders' context, pooled text and time ids
    into every U-Net evaluation)."""
    dtype = jnp.bfloat16
    n = mesh.devices.size
    b = s.batch or n
    prog = bench_models.sample_loop_program(s.model, batch=b, steps=s.steps, scheduler=_scheduler(s),
                                            guidance_scale=s.guidance_scale, resolution=_resolution(s.model,
                                                                                                    s.resolution),
                                            dtype=dtype, mesh=mesh, unet_overrides=s.unet_overrides)
    loop, args, use_cfg, lat_shape = prog["loop"], prog["args"], prog["use_cfg"], prog["latent_shape"]
    params, cond = args[0], prog["cond"]
    trips = int(prog["state"].num_evals)
    kernel = tuple(params["unet"]["conv_in"]["kernel"].shape)
    per_trip = unet_evals_per_trip(loop, args, kernel, trips)
    compiled, compile_s = _compile(loop, *args)

    # One U-Net evaluation as the body runs it (CFG rows, the Sampler's cast params, SDXL's added
    # conditioning), compiled alone: the (trips - 1) trips XLA's count of the loop leaves out.
    rows = 2 * b if use_cfg else b
    u = prog["sampler"].pipe.unet
    batch = parallel.batch_sharding(mesh)

    def rows_of(a, dt=None):
        return jax.ShapeDtypeStruct((rows, *a.shape[1:]), dt or a.dtype, sharding=batch)

    def unet_eval(p, x, t, ctx, added):
        return u.apply({"params": p}, x, t, ctx, added).astype(jnp.float32)

    xl = isinstance(cond, dict)
    context = cond["context"] if xl else cond
    added = {k: rows_of(cond[k]) for k in ("text_embeds", "time_ids")} if xl else None
    u_args = (params["unet"], jax.ShapeDtypeStruct((rows, *lat_shape[1:]), dtype, sharding=batch),
              jax.ShapeDtypeStruct((rows,), prog["state"].timesteps.dtype, sharding=batch), rows_of(context, dtype),
              added)
    u_compiled, u_s = _compile(jax.jit(unet_eval, out_shardings=batch), *u_args)
    u_cost = _cost(u_compiled)
    extra = max(trips - 1, 0) * per_trip
    # The loop reads the U-Net's and the VAE's params; the text encoders' run before it.
    out = _figures(compiled, chip, items_per_chip=b / n, param_bytes=per_chip_bytes(params),
                   extra_flops=extra * (u_cost["flops"] or 0.0), extra_bytes=extra * (u_cost["bytes_accessed"] or 0.0),
                   compile_s=compile_s + u_s)
    out.update(item="image", batch=b, resolution=prog["resolution"], steps=s.steps, scheduler=prog["scheduler"],
               cfg=use_cfg, sdxl=xl, loop_trips=trips, unet_evals_per_trip=per_trip, unet_evals=trips * per_trip,
               unet_rows_per_eval=rows, unet_eval_cost_per_chip=u_cost, loop_program_cost_per_chip=_cost(compiled),
               unet_eval_collectives=_collective_counts(u_compiled),
               text_encoder_bytes_per_chip=per_chip_bytes(prog["text_params"]),
               flops_method=("XLA's count of the loop program (one trip + the rest) + (trips - 1) x evals per trip "
                             "x the U-Net evaluation compiled alone"))
    return out


SDXL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sdxl_finetune.py"


def _load_config_file(path: Path, arg: str | None = None) -> ml_collections.ConfigDict:
    # As ml_collections' config_flags loads `--config FILE:ARG`: the file as a module, get_config(ARG).
    import importlib.util

    if not path.is_file():
        raise FileNotFoundError(f"the SDXL train config {path} is missing; the ahead-of-time SDXL train step takes "
                                "its settings from it: run from a checkout of the repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"_aot_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg is not None else mod.get_config()


def ldm_config(model: str, num_chips: int | None = None) -> ml_collections.ConfigDict:
    """The trainer config a model's train step is compiled with: `configs/sd15_finetune.py`'s settings
    for sd15 / sd21 (bf16, remat, chunked attention, AdamW, EMA, min-SNR, cache on), the LDM defaults
    for tiny; for SDXL models `configs/sdxl_finetune.py`'s own `get_config("gpus=N")` for `num_chips`
    devices (bf16, remat, AdamW 1e-6, min-SNR, caption dropout; EMA from 8 devices on, as it sets it;
    its mesh.fsdp = N and batch 4 per device as 4 micro-batches of 1), cache on. `batch_size` is per
    chip (the planner's unit), global in the config files."""
    from t2i_jax.train import ldm

    if core.MODELS[model].is_sdxl:
        n = num_chips or 1
        c = _load_config_file(SDXL_CONFIG, f"gpus={n}")
        c.batch_size = c.batch_size // n
        c.cache.enabled = True
        return c
    c = ldm.default_config()
    if model != "tiny":
        c.model.dtype = "bfloat16"
        c.model.remat = True
        c.model.attention_impl = "chunked"
        c.batch_size = 8  # configs/sd15_finetune.py: per chip here (the planner's unit), global there
        c.optim.lr = 1e-5
        c.optim.weight_decay = 1e-2
        c.optim.grad_clip = 1.0
        c.ema_decay = 0.9999
        c.diffusion.snr_gamma = 5.0
    c.cache.enabled = True
    return c


def train_ldm_program(s: AotSettings, mesh: Mesh, config: ml_collections.ConfigDict | None = None, *,
                      accumulator: bool = True) -> dict:
    """The LDM trainer's jitted step and its abstract arguments (nothing compiled or allocated).

    SDXL models: the step `ldm.setup_step` builds for an SDXL U-Net on the cache's batch
    (`sdxl_cond.batch_keys(True)`: latent mean and std, both encoders' context, the pooled
    embedding, time ids), both text encoders and the VAE frozen. `accumulator=False` leaves the
    metric accumulator (a few scalars, found by tracing the step) out: args[1] is None.

    Returns {"step_fn", "args" (state, accumulator, frozen, batch), "config", "remat", "batch",
    "resolution", "attention_impl", "grad_accum"}.
    """
    from t2i_jax.train import ldm, sdxl_cond

    n = mesh.devices.size
    config = ldm_config(s.model, n) if config is None else ml_collections.ConfigDict(config.to_dict())
    remat = bool(config.model.remat if s.remat is None else s.remat)
    config.model.remat = remat
    b = s.batch or n
    # The config's micro-batches where the batch per chip allows them (configs/sdxl_finetune.py: 4 of 1
    # image per device; at 1 per chip that is 1 of 1).
    accum = s.grad_accum if s.grad_accum is not None else math.gcd(int(config.train.grad_accum), b // n)
    if accum < 1 or b % (accum * n):
        raise ValueError(f"grad_accum {accum} cuts batch {b} into micro-batches of {b / accum:g}, which do not "
                         f"split over the {n} chips; use a grad_accum dividing the {b // n} samples per chip")
    config.train.grad_accum = accum
    if s.attention_impl is not None:
        config.model.attention_impl = s.attention_impl
    if s.fsdp_min_size is not None:
        config.mesh.fsdp_min_size = s.fsdp_min_size
    dtype = jnp.dtype(config.model.dtype)
    parts = bench_models.model_parts(s.model, dtype, remat=remat, unet_overrides=s.unet_overrides)
    parts["unet"] = parts["unet"].clone(attention_impl=config.model.attention_impl or None)
    unet, vae, tok = parts["unet"], parts["vae"], parts["tokenizer"]
    config.batch_size = b
    res = _resolution(s.model, s.resolution)
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    frozen_params = bench_models.abstract_params({k: v for k, v in parts.items() if k != "unet"})
    xl = sdxl_cond.is_sdxl(unet)
    parts.update(scheduler_config={**SD_SCHEDULER, "prediction_type": "epsilon"}, params=frozen_params)
    width = unet.config.per_block("cross_attention_dim")[0]  # SDXL: both encoders' states side by side
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch)  # noqa: E731
    lat = res // vae.config.downsample_factor
    c = vae.config.latent_channels
    bat = {"mean": f32(b, lat, lat, c), "std": f32(b, lat, lat, c), "context": f32(b, tok.max_length, width)}
    empty = {"empty_context": np.zeros((tok.max_length, width), np.float32)}
    if xl:
        pooled = parts["text_encoder_2"].config.projection_dim
        bat.update(pooled=f32(b, pooled), time_ids=f32(b, sdxl_cond.num_time_ids(parts)))
        empty["empty_pooled"] = np.zeros((pooled,), np.float32)
        assert tuple(bat) == sdxl_cond.batch_keys(True)
    run = ldm.setup_step(parts, config, mesh, cached=True, total_steps=10**6, **empty)
    state = abstract(run["abstract_state"], run["shardings"])
    frozen = abstract({k: frozen_params[k] for k in run["frozen_shardings"]}, run["frozen_shardings"])
    acc = _abstract_accumulator(run["step_fn"], state, frozen, bat, repl) if accumulator else None
    return {"step_fn": run["step_fn"], "args": (state, acc, frozen, bat), "config": config, "remat": remat,
            "batch": b, "resolution": res, "attention_impl": config.model.attention_impl or "xla",
            "grad_accum": int(config.train.grad_accum)}


def train_bytes_lower_bound(program: dict) -> int:
    """Bytes per chip the step needs before any activation: its arguments (state, frozen params,
    batch) and one fp32 gradient per param shard. A candidate above HBM needs no compile."""
    state = program["args"][0]
    return per_chip_bytes(program["args"]) + per_chip_bytes(state.params)


def train_ldm_model_flops(s: AotSettings, batch: int = 8) -> dict:
    """XLA's FLOPs per sample of the LDM train step as the model defines it: the trainer's step for
    `s.model` at `s.resolution`, remat off, XLA's attention, one micro-batch, lowered (not compiled)
    for one CPU device and counted by XLA's HLO cost analysis.

    What the compiled TPU step's count cannot give: under remat it includes the recomputed forward,
    and XLA counts a while body once (a chunked attention's query chunks, a grad_accum scan), so
    those counts are of the program, not of the model. This one has no loop; the optimizer update's
    few FLOPs per parameter are spread over `batch` samples.
    """
    one = dataclasses.replace(s, topology="cpu", batch=batch, fsdp=1, remat=False, attention_impl="xla",
                              grad_accum=1, what=("train_ldm",))
    t0 = time.perf_counter()
    prog = train_ldm_program(one, parallel.make_mesh(data=-1, fsdp=1, devices=jax.devices("cpu")[:1]))
    cost = prog["step_fn"].lower(*prog["args"]).cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {"flops_per_sample": float(cost.get("flops", 0.0)) / batch or None, "batch": batch,
            "resolution": prog["resolution"], "lower_s": time.perf_counter() - t0,
            "method": "HLO cost analysis of the lowered step (remat off, XLA attention, no grad_accum), one CPU device"}


def compile_train_ldm(s: AotSettings, mesh: Mesh, chip: tpu_chips.Chip,
                      config: ml_collections.ConfigDict | None = None, program: dict | None = None) -> dict:
    """The LDM trainer's step (`ldm.setup_step`, cached latents) for `s.batch` samples on `mesh`
    (`program`: `train_ldm_program`'s, when already built)."""
    prog = program or train_ldm_program(s, mesh, config)
    state, acc, frozen, bat = prog["args"]
    if acc is None:  # built with accumulator=False (the lower bound's)
        acc = _abstract_accumulator(prog["step_fn"], state, frozen, bat, parallel.replicated(mesh))
        prog = {**prog, "args": (state, acc, frozen, bat)}
    compiled, compile_s = _compile(prog["step_fn"], *prog["args"])
    opt_bytes = per_chip_bytes(state.opt_state) + per_chip_bytes(state.ema_params)
    b = prog["batch"]
    # With grad_accum > 1 the micro-batches are a scan, whose body XLA counts once: the step is
    # counted as grad_accum x XLA's count (which holds one optimizer update, so the update's FLOPs
    # and bytes are over-counted grad_accum - 1 times: a bound from above).
    cost = _cost(compiled)
    accum = prog["grad_accum"]
    more = accum - 1
    out = _figures(compiled, chip, items_per_chip=b / mesh.devices.size, param_bytes=per_chip_bytes(state.params),
                   optimizer_bytes=opt_bytes, compile_s=compile_s, extra_flops=more * (cost["flops"] or 0.0),
                   extra_bytes=more * (cost["bytes_accessed"] or 0.0))
    out.update(flops_method="XLA's count of the compiled step" + (
        f" x grad_accum {accum} (the micro-batch scan's body is counted once)" if more else "") + (
        "; a chunked attention's query-chunk loop is also counted once (one chunk of each long attention)"
        if str(prog["attention_impl"]).startswith("chunked") else "") + (
        "; remat's recomputed forward is included" if prog["remat"] else ""))
    out.update(item="sample", batch=b, resolution=prog["resolution"], fsdp=mesh.shape["fsdp"],
               data=mesh.shape["data"], remat=prog["remat"], grad_accum=accum,
               micro_batch_per_chip=b // mesh.devices.size // accum, attention_impl=prog["attention_impl"],
               ema=prog["config"].ema_decay > 0, cached=True, frozen_bytes_per_chip=per_chip_bytes(frozen),
               step="t2i_jax.train.ldm.setup_step (train.loop.make_train_step)")
    return out


def _abstract_accumulator(step_fn, state, frozen, batch, repl) -> dict:
    from t2i_jax.train import loop as loop_lib

    names = loop_lib.metric_names(step_fn, state, frozen, batch)
    f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    zeros = {k: f32 for k in names}
    return {"sum": zeros, "last": dict(zeros), "bad": dict(zeros), "count": i32, "first_bad": i32}


def compile_train_clip(s: AotSettings, mesh: Mesh, chip: tpu_chips.Chip) -> dict:
    """CLIP's contrastive train step (`train.clip.make_objective` + `make_train_step`) on `mesh`."""
    from t2i_jax.train import clip as clip_train
    from t2i_jax.train import loop as loop_lib
    from t2i_jax.train import state as state_lib

    config = clip_train.default_config()
    config.model.name = CLIP_FOR[s.model]
    if s.model != "tiny":
        config.model.dtype = "bfloat16"
    config.model.remat = bool(s.remat) if s.remat is not None else s.model != "tiny"
    config.train.grad_accum = s.grad_accum or 1
    if s.fsdp_min_size is not None:
        config.mesh.fsdp_min_size = s.fsdp_min_size
    config.model.overrides = ml_collections.ConfigDict(dict(s.clip_overrides))
    model, _ = clip_train.make_model(config)
    n = mesh.devices.size
    b = s.clip_batch or s.batch or n
    ocfg = ml_collections.ConfigDict({**config.optim.to_dict(), "total_steps": 10**6})
    tx, schedule = state_lib.make_optimizer(ocfg)
    init = lambda params: state_lib.create_state(params, tx, ema=config.ema_decay > 0, seed=0)  # noqa: E731
    from t2i_jax.convert import clip as clip_convert

    abstract_state = jax.eval_shape(init, clip_convert.expected_shapes(model))
    shardings = state_lib.state_shardings(abstract_state, clip_train.PARTITION_RULES, mesh, config.mesh.fsdp_min_size)
    step_fn = loop_lib.make_train_step(clip_train.make_objective(model, mesh), tx, schedule, config, mesh,
                                       shardings, {})
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = abstract(abstract_state, shardings)
    r = model.config.vision.image_size
    bat = {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32, sharding=batch),
           "input_ids": jax.ShapeDtypeStruct((b, model.config.text.max_position_embeddings), jnp.int32,
                                             sharding=batch)}
    acc = _abstract_accumulator(step_fn, state, {}, bat, repl)
    compiled, compile_s = _compile(step_fn, state, acc, {}, bat)
    opt_bytes = per_chip_bytes(state.opt_state) + per_chip_bytes(state.ema_params)
    out = _figures(compiled, chip, items_per_chip=b / n, param_bytes=per_chip_bytes(state.params),
                   optimizer_bytes=opt_bytes, compile_s=compile_s)
    out.update(item="sample", batch=b, resolution=r, clip=config.model.name, fsdp=mesh.shape["fsdp"],
               data=mesh.shape["data"], remat=config.model.remat, step="t2i_jax.train.clip.make_objective "
               "(train.loop.make_train_step)")
    return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def default_what(model: str) -> tuple[str, ...]:
    """The programs `--aot` compiles for a model when --what is not given (SDXL: no CLIP step)."""
    return WHAT if model in CLIP_FOR else tuple(w for w in WHAT if w != "train_clip")


def validate(s: AotSettings, num_chips: int) -> None:
    """Raises ValueError naming the bad setting, its value and the fix."""
    if s.model not in core.MODELS:
        raise ValueError(f"unknown model {s.model!r}; choose one of {sorted(core.MODELS)}")
    bad = [w for w in s.what if w not in WHAT]
    if bad or not s.what:
        raise ValueError(f"--what {','.join(s.what)!r}: choose from {', '.join(WHAT)}")
    if "train_clip" in s.what and s.model not in CLIP_FOR:
        raise ValueError(f"--what train_clip: no CLIP is trained for {s.model} (an SDXL model's text encoders are "
                         f"frozen); use --what {','.join(default_what(s.model))}")
    if s.resolution is not None:
        pipeline.check_size("resolution", s.resolution, 8)
    for name in ("batch", "clip_batch"):
        v = getattr(s, name)
        if v is not None and (v < 1 or v % num_chips):
            raise ValueError(f"{name} {v} does not split over the {num_chips} chips of {s.topology}; use a "
                             f"multiple of {num_chips}")
    if s.fsdp is not None and (s.fsdp < 1 or num_chips % s.fsdp):
        raise ValueError(f"fsdp {s.fsdp} does not divide the {num_chips} chips of {s.topology}; use one of "
                         f"{[d for d in range(1, num_chips + 1) if num_chips % d == 0]}")


def run(s: AotSettings, log: Callable[[str], None] = lambda m: None,
        ldm_train_config: ml_collections.ConfigDict | None = None) -> dict:
    """Compiles `s.what` for `s.topology`; returns every figure as one JSON-able dict."""
    devices = topology_devices(s.topology)
    chip = tpu_chips.chip_for(s.topology.removeprefix("tpu:"))
    n = len(devices)
    validate(s, n)
    results = {}
    for what in s.what:
        t0 = time.perf_counter()
        log(f"{what}: compiling for {s.topology} ({n} x {devices[0].device_kind}) ...")
        if what == "sample":
            mesh = parallel.make_mesh(devices=devices)  # the Sampler's default: every chip on "data"
            results[what] = compile_sample(s, mesh, chip)
        else:
            cfg = ldm_train_config if what == "train_ldm" else None
            fsdp = s.fsdp if s.fsdp is not None else int((cfg or ldm_config(s.model, n)).mesh.fsdp)
            mesh = parallel.make_mesh(data=-1, fsdp=fsdp, devices=devices)
            try:
                results[what] = (compile_train_ldm(s, mesh, chip, cfg) if what == "train_ldm"
                                 else compile_train_clip(s, mesh, chip))
            except Exception as e:  # noqa: BLE001  the compiler's out-of-memory is an answer; the rest raise
                if not is_oom(e):
                    raise
                results[what] = {"fits": False, "fsdp": fsdp, "batch": s.batch or n,
                                 "compile_error": str(e).splitlines()[0][:500],
                                 "hint": f"does not fit a {chip.kind} chip at fsdp={fsdp}; find a plan with --plan "
                                         f"{s.topology}"}
        results[what]["wall_s"] = time.perf_counter() - t0
    return {"settings": dataclasses.asdict(s) | {"what": list(s.what)},
            "topology": {"name": s.topology.removeprefix("tpu:"), "chips": n, "device_kind": devices[0].device_kind},
            "chip": chip.as_dict(), "results": results,
            "note": "compiler figures and roofline bounds for TPU, compiled ahead of time here; not measurements"}


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def table(report: dict) -> str:
    """The figures as fixed-width text."""
    t, c = report["topology"], report["chip"]
    lines = [f"TPU {t['name']}: {t['chips']} x {t['device_kind']} ({c['hbm_gib']:.0f} GiB HBM, "
             f"{c['hbm_gb_per_s']:.0f} GB/s, {c['bf16_tflops']:.0f} bf16 TFLOP/s per chip) -- compiled ahead of time; "
             "bounds, not measurements", "",
             f"{'program':11} {'batch':>6} {'params':>7} {'optim':>7} {'activ':>7} {'total':>7} {'fits':>5} "
             f"{'TFLOP/chip':>10} {'GB/chip':>8} {'bound s':>8} {'by':>7} {'max items/s/chip':>16} {'compile s':>9}"]
    for what, r in report["results"].items():
        if "compile_error" in r:
            lines.append(f"{what:11} {r['batch']:6d}  NOT COMPILED: {r['hint']} ({r['compile_error'][:200]})")
            continue
        m = r["memory_per_chip"]
        roof = r["roofline_per_chip"]
        lines.append(
            f"{what:11} {r['batch']:6d} {_gib(m['params']):>7} {_gib(m['optimizer_state']):>7} "
            f"{_gib(m['activations']):>7} {_gib(m['total']):>7} {'yes' if m['fits'] else 'NO':>5} "
            f"{(r['flops_per_chip'] or 0) / 1e12:10.3f} {(r['bytes_accessed_per_chip'] or 0) / 1e9:8.2f} "
            f"{roof['bound_s'] or 0:8.4f} {roof['bound_by'] or '-':>7} "
            f"{r['max_items_per_s_per_chip'] or 0:16.3f} {r['compile_s']:9.1f}")
    lines.append("(GiB per chip; total = arguments + outputs - donated + temporaries + code)")
    for what, r in report["results"].items():
        if "compile_error" in r:
            continue
        col = r["collectives"]
        where = ", ".join(f"{op} x{k} ({col['in_while'].get(op, 0)} in a loop)" for op, k in col["counts"].items())
        lines.append(f"{what}: collectives: {col['error']}" if "error" in col else
                     f"{what}: collectives: {where or 'none'}")
        if what == "sample":
            lines.append(f"sample: {r['loop_trips']} loop trips x {r['unet_evals_per_trip']} U-Net evaluation(s) "
                         f"per trip at {r['unet_rows_per_eval']} rows")
    return "\n".join(lines)
