"""CLI: python -m t2i_jax.train --config configs/clip_shapes.py --workdir runs/x [--config.train.steps=10]

`--config FILE[:ARG]` loads FILE's `get_config(ARG)`; `--config.a.b=v` overrides a
field. The config's `objective` picks `t2i_jax.train.<objective>.train_and_evaluate`.
Multi-host: run the same command on every host; `--distributed=auto` calls
`jax.distributed.initialize()` when the environment (SLURM, TPU pod, MPI,
JAX_COORDINATOR_ADDRESS) says this is one process of several.
From Python: `t2i_jax.train.__main__.run(argv)` (a list, as on the command line).

Exit status: 0 when the run reached its last step; 75 (EX_TEMPFAIL) when it was
stopped early by SIGTERM or Ctrl-C (or train.preempt_at_step) after saving a
checkpoint of the step it stopped at: rerun the same command to resume (a
supervisor should requeue it); 1 when a non-finite loss stopped it, a
checkpoint could not be saved or too many images were unreadable; 2 for a config error, including a resume whose
config differs from the checkpoint's.
"""

import importlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from t2i_jax.train import OBJECTIVES

# Exit status of a run stopped early (signal) after its checkpoint was saved: "try again", as
# sysexits.h's EX_TEMPFAIL; distinct from success (0), failure (1) and usage errors (2).
EXIT_STOPPED = 75

def _define(fv: flags.FlagValues):
    """Defines the CLI's flags in `fv`; returns their holders (config, workdir, distributed)."""
    return (
        config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).", flag_values=fv,
                                        lock_config=True),
        flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, eval results, export.",
                            flag_values=fv),
        flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "Call jax.distributed.initialize(): auto-detect, always or never.", flag_values=fv),
    )


_FLAGS = _define(flags.FLAGS)


def run(argv: list[str]) -> dict:
    """The CLI from Python: `run(["prog", "--config", "configs/x.py", "--workdir", "runs/x",
    "--config.train.steps=10"])`, as often as wanted in one process.

    Each call parses `argv` into flags of its own (config_flags defines one flag per config
    field, which a second parse of the global flags would define again). config_flags reads the
    `--config.a.b=v` overrides from `sys.argv`; it is `argv` while the config loads.
    """
    fv = flags.FlagValues()
    holders = _define(fv)
    saved = sys.argv
    sys.argv = list(argv)
    try:
        fv(sys.argv)
        config = holders[0].value
    finally:
        sys.argv = saved
    return _train(config, holders[1].value, holders[2].value)


def main(argv):
    """The `app.run` entry: the global flags are parsed."""
    del argv
    config, workdir, distributed = (h.value for h in _FLAGS)
    result = _train(config, workdir, distributed)
    if result["stopped"]:
        logging.warning("stopped early at step %d; rerun the same command to resume (exit status %d)",
                        result["step"], EXIT_STOPPED)
        sys.exit(EXIT_STOPPED)


def _train(config, workdir, distributed) -> dict:
    if config is None or workdir is None:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from t2i_jax import parallel
    parallel.initialize_distributed(distributed)
    objective = config.get("objective")
    if objective not in OBJECTIVES:
        raise app.UsageError(f"config objective {objective!r} is not one of {list(OBJECTIVES)}")
    module = importlib.import_module(f"t2i_jax.train.{objective}")
    from t2i_jax.data import TooManyBadImages
    from t2i_jax.train.checkpoint import CheckpointSaveError, ConfigMismatchError
    try:
        result = module.train_and_evaluate(config, workdir)
    except (FloatingPointError, CheckpointSaveError, TooManyBadImages) as e:
        logging.error("%s", e)
        sys.exit(1)
    except ConfigMismatchError as e:
        logging.error("%s", e)
        sys.exit(2)
    logging.info("finished at step %d%s", result["step"],
                 f" (stopped: {result['stopped']})" if result["stopped"] else "")
    return result


HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")

if __name__ == "__main__":
    try:
        app.run(main)
    except SystemExit as e:
        # absl prints the usage for --help and exits 1; the convention (and this project's other CLIs) is 0.
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
