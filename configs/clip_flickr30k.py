"""Fine-tune OpenAI CLIP ViT-B/32 on Flickr30k: batch 64, lr 1e-5, 3 epochs.

    python -m t2i_jax.train --config configs/clip_flickr30k.py:/data/flickr30k --workdir runs/clip_flickr30k
    # on a GPU/TPU: add --config.model.dtype=bfloat16; several GPUs: --config.mesh.fsdp=N shards the weights

The argument (or --config.data.path) is the Kaggle Flickr30k folder: results.csv
and flickr30k_images/. The last 1000 images (5000 captions, the size of the
Karpathy test split) are held out for retrieval recall@1/5/10 and matched-pair
cosine before and after; `workdir/export/` is a transformers CLIPModel folder.
"""

import ml_collections

from t2i_jax.train import clip


def get_config(arg=None):
    c = clip.default_config()
    c.model.init_from = "openai/clip-vit-base-patch32"
    c.data = ml_collections.ConfigDict({"name": "flickr30k", "path": arg or "", "resolution": 224, "seed": 0,
                                        "random_crop": False, "random_flip": False, "worker_count": 0})
    c.batch_size = 64
    c.train.steps = 0
    c.train.epochs = 3.0  # 30783 training images / 64 = 481 steps an epoch
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.2
    c.eval.holdout_tail = 1000
    c.eval.num_images = 1000
    c.eval.batch_size = 256
    return c
