"""CLI: python -m t2i_jax.train --config configs/clip_shapes.py --workdir runs/x [--config.train.steps=10]

`--config FILE[:ARG]` loads FILE's `get_config(ARG)`; `--config.a.b=v` overrides a
field. The config's `objective` picks `t2i_jax.train.<objective>.train_and_evaluate`.
Multi-host: run the same command on every host; `--distributed=auto` calls
`jax.distributed.initialize()` when the environment (SLURM, TPU pod, MPI,
JAX_COORDINATOR_ADDRESS) says this is one process of several.
"""

import importlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from t2i_jax.train import OBJECTIVES

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, eval results, export.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto-detect, always or never.")


def main(argv):
    """Parses flags (when called directly with an argv list) and runs the config's objective."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(argv)
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from t2i_jax import parallel
    parallel.initialize_distributed(_DISTRIBUTED.value)
    config = _CONFIG.value
    objective = config.get("objective")
    if objective not in OBJECTIVES:
        raise app.UsageError(f"config objective {objective!r} is not one of {list(OBJECTIVES)}")
    module = importlib.import_module(f"t2i_jax.train.{objective}")
    try:
        result = module.train_and_evaluate(config, _WORKDIR.value)
    except FloatingPointError as e:
        logging.error("%s", e)
        sys.exit(1)
    logging.info("finished at step %d%s", result["step"],
                 f" (stopped: {result['stopped']})" if result["stopped"] else "")


if __name__ == "__main__":
    app.run(main)
