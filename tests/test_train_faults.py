"""Training under faults: a resume with another config or process count, a crash between a
metrics row and its checkpoint, a checkpoint save that runs out of disk, Ctrl-C and SIGTERM exit
codes, and the multi-process launcher's progress-based timeout."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from test_train_clip import quick_config  # noqa: E402  (clip_shapes, small and quiet)

from launch import local_multiprocess  # noqa: E402
from t2i_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from t2i_jax.train import clip as clip_train  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train.__main__ import EXIT_STOPPED  # noqa: E402
from t2i_jax.train.checkpoint import (  # noqa: E402
    Checkpointer,
    CheckpointSaveError,
    ConfigMismatchError,
    check_resume,
    config_changes,
)

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run (checkpoint at step 2); tests copy it."""
    workdir = tmp_path_factory.mktemp("base")
    assert clip_train.train_and_evaluate(quick_config(steps=2), workdir)["step"] == 2
    return workdir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------
# Resume with another config.
# ---------------------------------------------------------------------------


def test_config_changes_lists_leaves_and_absent_keys():
    saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 3}
    new = {"a": 1, "b": {"c": (1, 3), "d": "x"}, "added": {"e": 0}}
    assert config_changes(saved, new) == [("added.e", "<absent>", 0), ("b.c", [1, 2], [1, 3]),
                                          ("gone", 3, "<absent>")]
    assert check_resume({"train": {"steps": 2}, "eval": {"x": 1}}, {"train": {"steps": 9}, "eval": {"x": 2}},
                        step=2, directory="d") == [("eval.x", 1, 2), ("train.steps", 2, 9)]
    allowed = check_resume({"optim": {"lr": 1.0}}, {"optim": {"lr": 2.0}}, step=2, directory="d",
                           allow="optim.*")
    assert allowed == [("optim.lr", 1.0, 2.0)]


def test_a_key_added_since_the_checkpoint_at_its_default_is_no_change():
    # A checkpoint written before `lora` existed resumes with the key at its default (LoRA off) ...
    saved = {"train": {"steps": 2}}
    new = {"train": {"steps": 2}, "lora": {"rank": 0, "alpha": 0.0}}
    defaults = {"train": {"steps": 100}, "lora": {"rank": 0, "alpha": 0.0}}
    assert check_resume(saved, new, step=2, directory="d", defaults=defaults) == []
    # ... but not with it turned on, and without the defaults every added key is a change.
    with pytest.raises(ConfigMismatchError, match=r"lora.rank: \"<absent>\" in the checkpoint, now 4"):
        check_resume(saved, {**new, "lora": {"rank": 4, "alpha": 0.0}}, step=2, directory="d", defaults=defaults)
    with pytest.raises(ConfigMismatchError, match="lora.alpha"):
        check_resume(saved, new, step=2, directory="d")
    # The trainers' own defaults are the ones a Checkpointer applies.
    ldm = checkpoint_lib._trainer_defaults("ldm")
    assert ldm["lora"]["rank"] == 0 and ldm["objective"] == "ldm"
    assert checkpoint_lib._trainer_defaults("no_such_trainer") is None


def test_resume_with_changed_model_or_batch_is_refused_and_keeps_the_record(two_step_run, tmp_path):
    workdir = _copy(two_step_run, tmp_path / "run")
    record = (workdir / "config.json").read_bytes()
    c = quick_config(steps=4)
    c.batch_size = 8  # keeps every shape: it used to resume into a mixed run
    c.model.overrides.text_heads = 4  # (an override the saved config lacks)
    with pytest.raises(ConfigMismatchError) as e:
        clip_train.train_and_evaluate(c, workdir)
    msg = str(e.value)
    assert "batch_size: 16 in the checkpoint, now 8" in msg
    assert 'model.overrides.text_heads: "<absent>" in the checkpoint, now 4' in msg
    assert "--config.train.allow_changes=batch_size,model.overrides.text_heads" in msg
    assert "train.steps" not in msg  # an allowed change is not listed
    assert (workdir / "config.json").read_bytes() == record
    assert Checkpointer(workdir / "checkpoints").all_steps() == [2]

    # Harmless changes (length of the run, logging cadence) resume, and config.json then says so.
    r = clip_train.train_and_evaluate(quick_config(steps=4, log_every=2), workdir)
    assert r["step"] == 4
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4


def test_resume_with_another_process_count_says_so(two_step_run, tmp_path):
    workdir = _copy(two_step_run, tmp_path / "run")
    data = workdir / "checkpoints" / "2" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    with pytest.raises(ConfigMismatchError, match=r"written by 2 process\(es\); this run has 1"):
        clip_train.train_and_evaluate(quick_config(steps=4), workdir)


# ---------------------------------------------------------------------------
# A crash after a metrics row, before its checkpoint.
# ---------------------------------------------------------------------------


# slow (23 s): test_kill_9_then_ctrl_c_leave_each_step_once_and_a_checkpoint_of_the_last keeps a crash + resume fast.
@pytest.mark.slow
def test_metrics_hold_each_step_once_after_crash_and_resume(tmp_path):
    c = quick_config(steps=5, checkpoint_every=2)
    clip_train.train_and_evaluate(c, tmp_path)
    before = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in before] == [1, 2, 3, 4, 5]
    # As if killed (-9) after step 5's row was written and before its checkpoint was: the run
    # resumes from step 4 and makes step 5 again.
    shutil.rmtree(tmp_path / "checkpoints" / "5")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # and a row torn by the kill
    r = clip_train.train_and_evaluate(quick_config(steps=6, checkpoint_every=2), tmp_path)
    assert r["step"] == 6
    after = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in after] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(after[4]["loss"], before[4]["loss"], rtol=1e-6)  # step 5 made again, the same
    # TensorBoard: the resumed run's file starts by purging the steps after 4 that the first one holds.
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    first, second = (metrics_lib.read_events(f) for f in files)
    assert max(e["step"] for e in first if e["scalars"]) == 5
    marks = [e for e in second if "session_log" in e]
    assert marks and marks[0]["session_log"] == "START" and marks[0]["step"] == 4
    assert [e["step"] for e in second if e["scalars"]] == [5, 6]


# ---------------------------------------------------------------------------
# A save that runs out of disk.
# ---------------------------------------------------------------------------


@pytest.fixture
def file_size_limit():
    """`limit(n)` makes writing past n bytes of a file fail (EFBIG, as ENOSPC would) in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_save_names_the_step_and_the_last_checkpoint(tmp_path, file_size_limit, async_save):
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=async_save)
    it = iter(grain.MapDataset.range(8).to_iter_dataset())
    ckpt.save(1, {"w": jnp.ones((4, 4))}, it, {"a": 1})
    ckpt.wait()
    file_size_limit(100_000)
    big = {"w": jnp.arange(1 << 19, dtype=jnp.float32)}  # 2 MB: does not fit
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.save(2, big, it, {"a": 1})
        ckpt.wait()  # an asynchronous save fails here, or at the loop's next check()
    msg = str(e.value)
    assert "checkpoint of step 2" in msg and "The last complete checkpoint is step 1" in msg
    assert "File too large" in msg
    file_size_limit(resource.RLIM_INFINITY)
    assert ckpt.all_steps() == [1]
    ckpt.manager.close()


# ---------------------------------------------------------------------------
# Signals: exit status and Ctrl-C.
# ---------------------------------------------------------------------------


def _run_until_steps(cmd, env, metrics_path, n, sig):
    """Starts `cmd`, waits until metrics.jsonl has n rows, sends `sig`; returns (returncode, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # generous: CI may run on a loaded machine
        while time.time() < deadline:
            if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= n:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail(f"the trainer made no {n} steps in 300 s")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode()


def test_kill_9_then_ctrl_c_leave_each_step_once_and_a_checkpoint_of_the_last(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [sys.executable, "-m", "t2i_jax.train", "--config", "configs/clip_shapes.py", "--workdir", str(tmp_path),
           "--config.train.steps=100000", "--config.batch_size=16", "--config.train.log_every=1",
           "--config.train.checkpoint_every=2", "--config.train.async_checkpoint=False",
           "--config.eval.enabled=False", "--config.export=False", "--config.progress=False"]
    metrics = tmp_path / "metrics.jsonl"
    # A crash (SIGKILL: nothing runs after it) leaves rows after the last checkpoint.
    rc, out = _run_until_steps(cmd, env, metrics, 5, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-3000:]
    killed_at = len(metrics.read_text().splitlines())
    # The same command resumes from the last checkpoint; Ctrl-C then saves and exits 75.
    rc, out = _run_until_steps(cmd, env, metrics, killed_at + 2, signal.SIGINT)
    assert rc == EXIT_STOPPED == 75, out[-3000:]
    assert "Ctrl-C: saving a checkpoint" in out and "KeyboardInterrupt" not in out
    assert f"rerun the same command to resume (exit status {EXIT_STOPPED})" in out
    steps = [r["step"] for r in metrics_lib.read_jsonl(metrics)]
    assert steps == list(range(1, steps[-1] + 1))  # each step once, the crashed run's extra rows dropped
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == steps[-1]


# ---------------------------------------------------------------------------
# The launcher times out on no progress, not on the wall clock.
# ---------------------------------------------------------------------------


def test_launcher_stops_a_silent_run_and_keeps_a_talking_one():
    silent = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    assert local_multiprocess.launch(silent, 2, idle_timeout=2) == 124
    assert time.monotonic() - t0 < 50  # stopped long before the sleep ends
    talking = [sys.executable, "-c", "import time\nfor i in range(8):\n print(i, flush=True); time.sleep(0.5)"]
    assert local_multiprocess.launch(talking, 2, idle_timeout=2) == 0  # 4 s in all, never 2 s silent
