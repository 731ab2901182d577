"""What the trainers take from a data config: `data.make_loader` arguments and the held-out eval set."""

from __future__ import annotations

import logging

import numpy as np

from t2i_jax import data as data_lib

log = logging.getLogger(__name__)

# Keys of a data config that go to `data.make_loader` as they are.
LOADER_KEYS = ("seed", "shuffle", "num_epochs", "random_crop", "random_flip", "worker_count",
               "worker_buffer_size", "read_threads", "read_buffer", "delay_ms", "first_good_within",
               "max_bad_fraction", "bad_window")


def loader_kwargs(dcfg: dict) -> dict:
    """The `data.make_loader` keyword arguments a data config sets."""
    return {k: dcfg[k] for k in LOADER_KEYS if k in dcfg}


def make_eval_set(source, num_images: int, resolution: int, tokenizer) -> dict:
    """The first `num_images` records: center-cropped images, every caption tokenized (if `tokenizer`).

    Returns {"image" [N, R, R, 3] in [-1, 1], "input_ids" [M, T], "text_to_image" [M], "captions" [M],
    "skipped"}; a record whose image does not decode is skipped and counted.
    """
    images, captions, owner, skipped = [], [], [], 0
    for i in range(min(num_images, len(source))):
        rec = source[i]
        try:
            img = data_lib.decode_image(rec["image"], resolution)
        except Exception as e:  # noqa: BLE001  a bad image costs that image, not the eval
            log.warning("eval: skipping %s: %s", rec.get("key"), e)
            skipped += 1
            continue
        h, w = img.shape[:2]
        top, left = (h - resolution) // 2, (w - resolution) // 2
        images.append(img[top:top + resolution, left:left + resolution].astype(np.float32) / 127.5 - 1.0)
        captions += rec["captions"]
        owner += [len(images) - 1] * len(rec["captions"])
    if not images:
        raise ValueError(f"the eval source {source!r} gave no images")
    ids = tokenizer(captions) if tokenizer is not None else None
    return {"image": np.stack(images), "input_ids": ids, "text_to_image": np.asarray(owner), "captions": captions,
            "skipped": skipped}
