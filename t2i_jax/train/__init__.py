"""Training: one file per objective (`clip.py`, `ldm.py`, `vae.py`) on shared pieces.

- `state.py`: TrainState pytree, AdamW + warm-up/cosine + clipping, EMA, gradient accumulation;
- `checkpoint.py`: the orbax CheckpointManager (state, grain iterator, config) and SIGTERM handling;
- `metrics.py`: metrics.jsonl and TensorBoard event files (tensorboardX; no TensorFlow needed);
- `config.py`: the config keys every trainer reads; `workdir.py`: the run folder; `inputs.py`: loader
  arguments and the held-out eval set from a data config;
- `export.py`: a trained model as a complete diffusers StableDiffusionPipeline folder.

CLI: `python -m t2i_jax.train --config configs/X.py --workdir DIR [--config.key=value ...]`;
the config's `objective` names the module whose `train_and_evaluate(config, workdir)` runs.
"""

OBJECTIVES = ("clip", "ldm", "vae")
