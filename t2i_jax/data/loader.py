"""The image-caption loader: grain.DataLoader with per-host sharding and checkpointable state.

    loader = make_loader(source, global_batch_size=256, seed=0, resolution=512, tokenizer=tok)
    it = iter(loader)                  # grain DataLoaderIterator ("PyGrainDatasetIterator")
    batch = next(it)                   # {"image": f32 [B, R, R, 3], "caption": str [B],
                                       #  "input_ids": i32 [B, 77], "key": str [B], ...}
    state = it.get_state()             # bytes (JSON); it.set_state(state) resumes exactly

B is the per-host batch, global_batch_size // shard_count. Each host reads a
disjoint slice of every epoch (grain `ShardOptions`, remainder dropped so all
hosts run the same number of steps).

Each record's image and caption depend only on (seed, its place in the
sampler's order); which records share a batch also depends on `worker_count`
(grain gives each worker process every worker_count-th record and batches
there), so a checkpoint must be resumed with the worker count it was saved with
(grain checks this), and a finite epoch with workers may drop a few more
records at the end (each worker drops its own remainder).

Checkpointing with orbax (grain 0.2.18): `grain.checkpoint.CheckpointHandler`
with the args `grain.checkpoint.CheckpointSave(item=it)` /
`CheckpointRestore(item=it)` (the same objects as `grain.python.PyGrainCheckpoint
Handler/Save/Restore`). It writes the JSON state of each host to
`process_<i>-of-<n>.json`, e.g. in a CheckpointManager:

    mngr = ocp.CheckpointManager(dir, item_names=("state", "data"), ...)  # data -> CheckpointHandler
    mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it)))

`iterator_state` / `set_iterator_state` give the same state as a JSON-able dict
for anyone who keeps it elsewhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import grain
import jax

from t2i_jax.data import shapes as shapes_lib
from t2i_jax.data import sources
from t2i_jax.data.tfds_source import TfdsSource
from t2i_jax.data.transforms import (
    DecodeImage,
    Delay,
    DropBad,
    Preprocess,
    SkipLimit,
    SkipLog,
    Tokenize,
)

__all__ = [
    "SOURCE_NAMES",
    "Loader",
    "from_config",
    "iterator_state",
    "make_loader",
    "set_iterator_state",
    "source_from_config",
]


@dataclass
class Loader:
    """A grain DataLoader plus what the trainer needs to know about it.

    `iter(loader)` gives a fresh grain `DataLoaderIterator` (checkpointable);
    `skips` counts images that failed to load (`skipped_count()` reads it).
    """

    grain_loader: grain.DataLoader
    source: object
    skips: SkipLog
    batch_size: int  # per host
    global_batch_size: int
    shard_index: int
    shard_count: int

    def __iter__(self) -> grain.DataLoaderIterator:
        return iter(self.grain_loader)

    def skipped_count(self) -> int:
        """Records skipped so far because their image would not load, over all of this host's
        iterators and worker processes. Host only and cheap (no device sync, no full re-read of
        the skip file), so a trainer can log it at every log step."""
        return self.skips.count

    def restore(self, state: bytes | str | Mapping) -> grain.DataLoaderIterator:
        """A fresh iterator continuing from `state` (bytes, JSON text or dict)."""
        it = iter(self)
        set_iterator_state(it, state)
        return it


def make_loader(
    source,
    *,
    global_batch_size: int,
    seed: int,
    resolution: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
    tokenizer=None,
    tokenizer_2=None,
    size_conditioning: bool = False,
    skips: SkipLog | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_threads: int = 8,
    read_buffer: int = 64,
    delay_ms: float = 0.0,
    first_good_within: int = SkipLimit.first_good_within,
    max_bad_fraction: float = SkipLimit.max_bad_fraction,
    bad_window: int = SkipLimit.bad_window,
) -> Loader:
    """Builds the grain pipeline decode -> drop bad -> crop/flip/scale + caption -> [tokenize] -> batch.

    Args:
      source: a random-access source of `{"image", "captions", "key", ...}` records.
      global_batch_size: batch over all hosts; each host gets global_batch_size // shard_count.
      seed: shuffling and per-record randomness (32-bit, non-negative).
      resolution: output side in pixels (shorter side resized, then cropped).
      shuffle: reshuffle every epoch (deterministic by seed).
      num_epochs: None repeats forever.
      shard_index, shard_count: this host's slice; default jax.process_index() / process_count().
      random_crop: random instead of center crop. random_flip: horizontal flip with p = 0.5.
      tokenizer: a `t2i_jax.tokenizer.Tokenizer`; adds `input_ids` int32 [B, max_length].
      tokenizer_2: SDXL's second tokenizer; adds `input_ids_2` int32 [B, max_length].
      size_conditioning: SDXL: adds `original_size` and `crop_top_left` int32 [B, 2], each
        image's (height, width) before the resize and (top, left) of its crop.
      skips: where skipped images are counted; default a new SkipLog (file-backed when
        worker_count > 0, so counts from worker processes add up).
      worker_count: grain worker processes (0: in this process). worker_buffer_size: batches
        each worker prepares ahead.
      read_threads, read_buffer: threads and buffer for reading records from the source.
      delay_ms: benchmarks and tests: sleep this long per batch, as a slow source or decode
        would (to measure how well a trainer overlaps data loading with its steps).
      first_good_within, max_bad_fraction, bad_window: when skipping bad images stops the run
        with `TooManyBadImages` (see `transforms.SkipLimit`): none of the first
        `first_good_within` records decodes (capped at the records per host, so a small
        all-bad dataset also stops; 0: off), or more than `max_bad_fraction` of the last
        `bad_window` bad (>= 1: off). Checked per worker process.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of the "
                         f"{shard_count} hosts; use {max(1, global_batch_size // shard_count) * shard_count}")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"seed {seed!r} must be an int in [0, 2**32)")
    per_host = global_batch_size // shard_count
    if len(source) // shard_count < per_host:
        raise ValueError(f"{source!r} has {len(source)} records, {len(source) // shard_count} per host, fewer than "
                         f"one per-host batch of {per_host}; lower global_batch_size")
    limit = SkipLimit(first_good_within=min(int(first_good_within), len(source) // shard_count),
                      max_bad_fraction=float(max_bad_fraction), bad_window=int(bad_window))
    if worker_count > 0:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app (a script, a notebook,
        # pytest) they are unparsed and grain stops with UnparsedFlagAccessError.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    if skips is None:
        if worker_count > 0:
            fd, path = tempfile.mkstemp(prefix="t2i_jax_skipped_", suffix=".tsv")
            os.close(fd)
            skips = SkipLog(path)
        else:
            skips = SkipLog()
    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                                drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=shuffle,
                                          num_epochs=num_epochs, seed=seed)
    ops = [DecodeImage(resolution, record_size=size_conditioning), DropBad(skips, limit),
           Preprocess(resolution, random_crop, random_flip, record_crop=size_conditioning)]
    if tokenizer is not None:
        ops.append(Tokenize(tokenizer))
    if tokenizer_2 is not None:
        ops.append(Tokenize(tokenizer_2, key="input_ids_2"))
    ops.append(grain.transforms.Batch(batch_size=per_host, drop_remainder=True))
    if delay_ms:
        ops.append(Delay(float(delay_ms)))
    grain_loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=ops,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer),
    )
    return Loader(grain_loader, source, skips, per_host, global_batch_size, shard_index, shard_count)


def iterator_state(it: grain.DataLoaderIterator) -> dict:
    """The iterator's state as a JSON-able dict (what `it.get_state()` encodes)."""
    return json.loads(it.get_state().decode())


def set_iterator_state(it: grain.DataLoaderIterator, state: bytes | str | Mapping) -> None:
    """Restores `it` to `state`: bytes from `get_state()`, its JSON text, or `iterator_state`'s dict."""
    if isinstance(state, Mapping):
        state = json.dumps(dict(state))
    if isinstance(state, str):
        state = state.encode()
    it.set_state(state)


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------

SOURCE_NAMES = ("shapes", "flickr8k", "flickr30k", "coco", "jsonl", "csv", "tfds")

# Loader keys valid for every source, with defaults.
_LOADER_KEYS = {
    "resolution": None, "global_batch_size": None, "seed": 0, "shuffle": True, "num_epochs": None,
    "random_crop": False, "random_flip": False, "worker_count": 0, "worker_buffer_size": 1,
    "read_threads": 8, "read_buffer": 64, "delay_ms": 0.0,
    "first_good_within": SkipLimit.first_good_within, "max_bad_fraction": SkipLimit.max_bad_fraction,
    "bad_window": SkipLimit.bad_window,
}
# Source-specific keys, with defaults.
_SOURCE_KEYS = {
    "shapes": {"split": "train", "length": None, "holdout": None, "source_seed": 0, "colors": None},
    "flickr8k": {"path": None},
    "flickr30k": {"path": None},
    "coco": {"path": None, "split": "train2017", "annotations": None, "images": None},
    "jsonl": {"path": None, "images": None, "image_key": "image", "caption_key": "caption"},
    "csv": {"path": None, "images": None, "image_column": "image", "caption_column": "caption"},
    "tfds": {"dataset": None, "split": "train", "data_dir": None, "path": None},
}


def _as_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        cfg = cfg.to_dict()
    return dict(cfg)


def _split_config(cfg) -> tuple[str, dict, dict]:
    cfg = _as_dict(cfg)
    name = cfg.pop("name", None)
    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown data source name {name!r}; choose one of {list(SOURCE_NAMES)}")
    known = {**_LOADER_KEYS, **_SOURCE_KEYS[name]}
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {name!r} data config; known keys: {sorted(known)}")
    source_cfg = {k: cfg.get(k, d) for k, d in _SOURCE_KEYS[name].items()}
    loader_cfg = {k: cfg.get(k, d) for k, d in _LOADER_KEYS.items()}
    return name, source_cfg, loader_cfg


def _need(name: str, c: dict, key: str):
    if c.get(key) is None:
        raise ValueError(f"the {name!r} data config needs {key!r}")
    return c[key]


def source_from_config(cfg):
    """The source named by `cfg["name"]` (see `from_config`)."""
    name, c, lc = _split_config(cfg)
    if name == "shapes":
        kwargs = {} if c["holdout"] is None else {"holdout": [tuple(p) for p in c["holdout"]]}
        if c["colors"] is not None:  # shape colours, e.g. with an EXTRA_COLORS one ("teal")
            kwargs["colors"] = list(c["colors"])
        return shapes_lib.ShapesSource(_need(name, lc, "resolution"), split=c["split"], seed=c["source_seed"],
                                       length=c["length"], **kwargs)
    if name == "flickr8k":
        return sources.flickr8k(_need(name, c, "path"))
    if name == "flickr30k":
        return sources.flickr30k(_need(name, c, "path"))
    if name == "coco":
        if c["annotations"] is None or c["images"] is None:
            root = _need(name, c, "path")
            if not os.path.isdir(root):
                raise FileNotFoundError(f"COCO folder {root} does not exist; expected annotations/captions_<split>"
                                        ".json and <split>/ inside it, or set 'annotations' and 'images'")
        ann = c["annotations"] or os.path.join(c["path"], "annotations", f"captions_{c['split']}.json")
        images = c["images"] or os.path.join(c["path"], c["split"])
        return sources.coco_captions(ann, images)
    if name == "jsonl":
        return sources.jsonl_source(_need(name, c, "path"), images=c["images"], image_key=c["image_key"],
                                    caption_key=c["caption_key"])
    if name == "csv":
        return sources.csv_source(_need(name, c, "path"), images=c["images"], image_column=c["image_column"],
                                  caption_column=c["caption_column"])
    assert name == "tfds"
    return TfdsSource(_need(name, c, "dataset"), split=c["split"], data_dir=c["data_dir"] or c["path"])


def from_config(cfg, *, tokenizer=None, shard_index: int | None = None, shard_count: int | None = None) -> Loader:
    """Source + loader from a dict / ConfigDict.

    Keys: `name` (one of SOURCE_NAMES), `resolution`, `global_batch_size`, and optionally
    seed, shuffle, num_epochs, random_crop, random_flip, worker_count, worker_buffer_size,
    read_threads, read_buffer, delay_ms, and the bad-image limit first_good_within (100),
    max_bad_fraction (0.5), bad_window (1000) (see `make_loader`); then per source:
      shapes: split ("train" | "eval" | "holdout"), length (None: endless), holdout
        [(shape, colour), ...], source_seed, colors (shape colours; None: shapes.COLORS);
      flickr8k, flickr30k: path (the dataset folder);
      coco: path (folder with annotations/ and <split>/), split ("train2017"), or annotations + images;
      jsonl: path, images, image_key, caption_key;
      csv: path, images, image_column, caption_column;
      tfds: dataset (tfds name, e.g. "coco_captions", "celeb_a"), split, data_dir (or path).
    Unknown keys are an error, so a misspelt option does not silently fall back to its default.
    """
    name, _, lc = _split_config(cfg)
    source = source_from_config(cfg)
    return make_loader(
        source,
        global_batch_size=_need(name, lc, "global_batch_size"),
        seed=lc["seed"],
        resolution=_need(name, lc, "resolution"),
        shuffle=lc["shuffle"],
        num_epochs=lc["num_epochs"],
        shard_index=shard_index,
        shard_count=shard_count,
        random_crop=lc["random_crop"],
        random_flip=lc["random_flip"],
        tokenizer=tokenizer,
        worker_count=lc["worker_count"],
        worker_buffer_size=lc["worker_buffer_size"],
        read_threads=lc["read_threads"],
        read_buffer=lc["read_buffer"],
        delay_ms=lc["delay_ms"],
        first_good_within=lc["first_good_within"],
        max_bad_fraction=lc["max_bad_fraction"],
        bad_window=lc["bad_window"],
    )
