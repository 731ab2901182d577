"""Data/compute overlap benchmark: the VAE trainer on shapes with a data source that sleeps per batch.

    python -m t2i_jax.train --config configs/overlap_bench.py --workdir /tmp/overlap \
        --config.data.delay_ms=30

With `data.delay_ms` = D and a step of C ms, a loop that waits for the host
between steps runs at 1 / (D + C); one that prefetches batches and keeps its
metrics on the device approaches 1 / max(D, C). The steps/s is in the log
(`steps_per_sec`) and in workdir/metrics.jsonl. See BENCHMARKS.md.
"""

import ml_collections

from t2i_jax.train import vae


def get_config(arg=None):
    del arg
    c = vae.default_config()
    c.model.name = "tiny"
    c.data = ml_collections.ConfigDict({"name": "shapes", "resolution": 16, "split": "train", "seed": 0,
                                        "delay_ms": 30.0})
    c.batch_size = 4
    c.train.steps = 300
    c.train.log_every = 100
    c.train.checkpoint_every = 100_000
    c.eval.enabled = False
    c.export = False
    c.progress = False
    c.mesh.num_devices = 1
    return c
