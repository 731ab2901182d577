"""Two processes on this machine (jax.distributed on CPU with gloo collectives, coordinator on
127.0.0.1) train shapes_ldm together, launched by launch/local_multiprocess.py, and agree with
one process on the same global batches."""

import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import shapes_ldm  # noqa: E402
from launch import local_multiprocess  # noqa: E402
from t2i_jax import parallel  # noqa: E402
from t2i_jax.train import ldm  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402

STEPS = 4
OVERRIDES = {"data.resolution": 16, "data.length": 64, "batch_size": 16, "train.steps": STEPS,
             "train.log_every": 1, "train.checkpoint_every": STEPS, "progress": False, "export": False,
             "eval.every": 0, "eval.steps": 2, "optim.warmup_steps": 2}


def test_process_env_is_loopback_and_replaces_device_flags():
    env = local_multiprocess.process_env(1, 2, 1234, cpu=True, devices_per_process=3, gpus_per_process=0,
                                         base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["JAX_COORDINATOR_ADDRESS"] == env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=3"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    gpu = local_multiprocess.process_env(1, 2, 1234, cpu=False, devices_per_process=1, gpus_per_process=4, base={})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_initialize_distributed_reads_launcher_env(monkeypatch):
    calls = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.update(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.initialize_distributed("auto")
    assert calls == {"coordinator_address": None, "num_processes": 2, "process_id": 1}


def _final_state(workdir, like=None):
    """The saved state at STEPS; a checkpoint of other processes' devices is restored onto the
    structure of `like` on this process's first device."""
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [STEPS]
    target = None
    if like is not None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
    return ckpt.manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


@pytest.mark.slow  # 160 s on 2 cores (three compiles of the LDM step); the launcher's own tests stay fast
def test_two_processes_match_one(tmp_path):
    workdir = tmp_path / "two"
    cmd = [sys.executable, "-m", "t2i_jax.train", "--config", "configs/shapes_ldm.py", "--workdir", str(workdir),
           *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    rc = local_multiprocess.launch(cmd, 2, cpu=True, devices_per_process=1, idle_timeout=600, cwd=str(REPO), env=env)
    assert rc == 0
    two = [r["loss"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")]
    assert len(two) == STEPS  # process 0 alone writes metrics

    c = shapes_ldm.get_config()
    for k, v in OVERRIDES.items():
        node, *path = k.split(".")
        target = c
        for p in [node, *path][:-1]:
            target = target[p]
        target[k.split(".")[-1]] = v
    c.mesh.num_devices = 2  # the same 2 global devices, in one process
    ldm.train_and_evaluate(c, tmp_path / "one")
    one = [r["loss"] for r in metrics_lib.read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    assert one[0] != one[-1]
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    ref = _final_state(tmp_path / "one")
    got = _final_state(workdir, like=ref)
    assert int(got["step"]) == STEPS
    leaves = jax.tree_util.tree_leaves(got["params"])
    assert len(leaves) == len(jax.tree_util.tree_leaves(ref["params"])) > 10
    for a, b in zip(leaves, jax.tree_util.tree_leaves(ref["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
