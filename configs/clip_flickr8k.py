"""Fine-tune OpenAI CLIP ViT-B/32 on Flickr8k: batch 8, lr 1e-5, 5 epochs (the usual Flickr8k study setting).

    python -m t2i_jax.train --config configs/clip_flickr8k.py:/data/flickr8k --workdir runs/clip_flickr8k
    # on a GPU/TPU: add --config.model.dtype=bfloat16; offline: --config.model.init_from=/path/to/clip-vit-base-patch32

The argument (or --config.data.path) is the Kaggle Flickr8k folder: captions.txt
and Images/. The last 1000 images (5000 captions) are held out of training and
used for retrieval recall@1/5/10 and matched-pair cosine before and after;
`workdir/export/` is then a transformers CLIPModel folder.
"""

import ml_collections

from t2i_jax.train import clip


def get_config(arg=None):
    c = clip.default_config()
    c.model.init_from = "openai/clip-vit-base-patch32"
    c.data = ml_collections.ConfigDict({"name": "flickr8k", "path": arg or "", "resolution": 224, "seed": 0,
                                        "random_crop": False, "random_flip": False})
    c.batch_size = 8
    c.train.steps = 0
    c.train.epochs = 5.0  # 7091 training images / 8 = 887 steps an epoch
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.2  # CLIP's pre-training value
    c.optim.grad_clip = 1.0
    c.eval.holdout_tail = 1000
    c.eval.num_images = 1000
    c.eval.batch_size = 256
    return c
