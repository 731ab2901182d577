"""Mesh, partition rules and multi-host set-up: one code path from 1 CPU to a pod.

Everything, sampling and training alike, is `jax.jit` with `NamedSharding`
over one 2-D mesh with axes `("data", "fsdp")` (`make_mesh`):

- the batch is split over both axes (`batch_sharding`): every device holds
  a different slice of it;
- a parameter is replicated, or sharded over `fsdp` by a rule
  (`tree_shardings`); XLA all-gathers a sharded weight where it is used and
  reduce-scatters its gradient.

    mesh = make_mesh(data=-1, fsdp=8)
    shardings = tree_shardings(params, [(r".*", "fsdp")], mesh)
    params = jax.device_put(params, shardings)
    batch = host_to_global({"image": np_images}, mesh)

Rules are `(regex, spec)` pairs matched with `re.search` against the
"/"-joined path of each leaf (`text_model/encoder/layers_0/mlp/fc1/kernel`),
first match wins, no match replicates. Because the match is a search, the
same rules apply to an optimizer state or a train state whose leaves sit
under extra prefixes (`opt_state/1/0/mu/...`). A spec is a `PartitionSpec`
or the string "fsdp": shard the largest dimension divisible by the fsdp axis
size, if the leaf has at least `fsdp_min_size` elements (small tensors cost
more to gather than to keep).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXES", "BATCH_AXES", "make_mesh", "fsdp_spec", "partition_specs", "tree_shardings", "batch_sharding",
           "replicated", "host_to_global", "to_host", "initialize_distributed", "path_str", "DEFAULT_RULES"]

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device
# FSDP everything above the size threshold; the rest is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = ((r".*", "fsdp"),)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *,
              num_devices: int = 0) -> Mesh:
    """The package's one mesh: axes ("data", "fsdp") over `devices` (default: all of them).

    Sampling (`pipeline.Sampler`, default `make_mesh()`: every device on
    "data") and training (`make_mesh(config.mesh.data, config.mesh.fsdp,
    num_devices=config.mesh.num_devices)`) both use it and split the batch
    over both axes (`batch_sharding`). One of `data`, `fsdp` may be -1: it
    takes whatever the other leaves. `num_devices` > 0 keeps only the first
    that many devices (tests, scaling measurements). Devices are laid out
    with `mesh_utils.create_device_mesh` so that on TPU/GPU the fsdp axis (the
    chattier one) is the most local.
    """
    for name, v in (("data", data), ("fsdp", fsdp), ("num_devices", num_devices)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"make_mesh: {name}={v!r} is not an int; pass devices as make_mesh(devices=[...]) "
                            "and sizes as ints (-1: the rest)")
    devices = list(jax.devices() if devices is None else devices)
    if num_devices:
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"mesh num_devices={num_devices}: there are {len(devices)} devices; use 1.."
                             f"{len(devices)}, or 0 for all")
        devices = devices[:num_devices]
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 else 0
    elif fsdp == -1:
        fsdp = n // data if data > 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices; "
                         f"choose sizes whose product is {n} (or -1 for one of them)")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # e.g. odd subsets of a TPU slice
        arr = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(arr, AXES)


def path_str(path) -> str:
    """A pytree key path as "a/b/0/c" (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**14) -> P:
    """Shards the largest dimension divisible by `fsdp_size` over "fsdp", else replicates.

    Leaves with fewer than `min_size` elements, and any leaf when the fsdp
    axis has size 1, are replicated.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Largest first; on ties the earlier dimension (stable sort).
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def partition_specs(tree, rules: Sequence[tuple[str, Any]], mesh: Mesh, *, fsdp_min_size: int = 2**14):
    """A PartitionSpec for each leaf of `tree` (arrays or ShapeDtypeStructs) from regex `rules`."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if isinstance(spec, str):
                    if spec != "fsdp":
                        raise ValueError(f"partition rule {pattern.pattern!r}: unknown spec {spec!r}; use a "
                                         "PartitionSpec or 'fsdp'")
                    return fsdp_spec(shape, fsdp_size, fsdp_min_size)
                if len(spec) > len(shape):
                    raise ValueError(f"partition rule {pattern.pattern!r} gives {spec} to {name} of shape {shape}")
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, mesh: Mesh | None = None, *,
                   fsdp_min_size: int = 2**14):
    """`NamedSharding`s for every leaf of `tree`, from `partition_specs`."""
    if mesh is None:
        raise ValueError("tree_shardings needs a mesh (see make_mesh)")
    specs = partition_specs(tree, rules, mesh, fsdp_min_size=fsdp_min_size)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def host_to_global(tree, mesh: Mesh, sharding: NamedSharding | None = None):
    """Per-host numpy batches -> global jax Arrays (leading dims concatenated over hosts).

    Each host passes its own slice (what its data loader shard produced);
    with one process this is a sharded `device_put`.
    """
    sharding = batch_sharding(mesh) if sharding is None else sharding
    n = mesh.devices.size // jax.process_count()  # devices per host

    def one(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"the per-host batch of {x.shape[0]} is not a multiple of the {n} devices of this "
                             f"host; use a global batch size that is a multiple of {mesh.devices.size}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(one, tree)


def to_host(tree):
    """Host numpy copy of a (possibly sharded over hosts) pytree; a collective with several processes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


# Environment variables that say "this process is one of several".
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")


def _looks_multi_process() -> str | None:
    """Why we think this is one process of a multi-process job, or None."""
    for var in _MULTI_PROCESS_ENV:
        if os.environ.get(var):
            if var == "TPU_WORKER_HOSTNAMES" and "," not in os.environ[var]:
                continue  # a single-host TPU VM lists one worker
            return f"${var} is set"
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1 and \
            "SLURM_STEP_ID" in os.environ:  # inside `srun`, not just an sbatch script
        return f"SLURM job with {os.environ.get('SLURM_NTASKS') or os.environ.get('SLURM_NPROCS')} tasks"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI job"
    return None


def initialize_distributed(mode: str | bool = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when this is one process of several.

    mode "auto" (default): initialise when the environment says so
    (JAX_COORDINATOR_ADDRESS, a multi-worker TPU pod slice, `srun` with more
    than one task, Open MPI); jax then detects coordinator, process count and
    id itself (SLURM, TPU and MPI cluster environments), or reads them from
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. True / "on": always
    (explicit arguments override detection). False / "off": never.
    A single process needs nothing and returns False. Call it first thing,
    before any jax computation. Returns whether it initialised.
    """
    mode = {"on": True, "off": False, "true": True, "false": False}.get(str(mode).lower(), mode)
    if mode not in (True, False, "auto"):
        raise ValueError(f"distributed mode {mode!r}: use 'auto', 'on' or 'off'")
    explicit = coordinator_address is not None
    reason = "requested" if mode is True or explicit else (_looks_multi_process() if mode == "auto" else None)
    if mode is False or reason is None:
        return False
    if jax.distributed.is_initialized():
        return True
    # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id; a launcher
    # without a cluster jax detects (launch/local_multiprocess.py, plain ssh) passes them so.
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    log.info("initialising jax.distributed (%s)", reason)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
