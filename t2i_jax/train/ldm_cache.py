"""The ldm trainer's dataset cache: the frozen VAE's posteriors and the text states of every
caption, encoded once (`cache.enabled`), and the iterator that draws batches from it by
(seed, step) alone.

For an SDXL model (`t2i_jax.train.sdxl_cond`) the cache also holds the second encoder's
pooled embedding of every caption and each record's time ids (original size, center crop,
target size).
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.train import sdxl_cond

__all__ = ["CacheIterator", "put_global", "build_cache"]

log = logging.getLogger(__name__)


class CacheIterator:
    """Batches from an in-memory cache, drawn by (seed, step) only: an epoch is a permutation of
    the records from `default_rng([seed, epoch])`; each host returns its rows of the global batch.

    Checkpointable like a grain iterator (`get_state` / `set_state` bytes).
    """

    def __init__(self, cache: dict, global_batch: int, seed: int):
        self.cache, self.global_batch, self.seed, self.step = cache, global_batch, seed, 0
        self.n = len(cache["mean"])
        per = global_batch // jax.process_count()
        self.rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        self._perms: dict[int, np.ndarray] = {}  # the epochs' permutations in use (at most two)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(record indices, caption indices) of the global batch of `step`."""
        pos = step * self.global_batch + np.arange(self.global_batch)
        epochs = pos // self.n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            idx[epochs == e] = self._perm(int(e))[pos[epochs == e] % self.n]
        u = np.random.default_rng([self.seed, step, 1]).random(self.global_batch)
        cap = self.cache["cap_start"][idx] + (u * self.cache["cap_count"][idx]).astype(np.int64)
        return idx, cap

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx, cap = (a[self.rows] for a in self.indices(self.step))
        self.step += 1
        out = {"mean": self.cache["mean"][idx], "std": self.cache["std"][idx], "context": self.cache["context"][cap]}
        if "time_ids" in self.cache:  # SDXL: per caption pooled embedding, per record time ids
            out.update(pooled=self.cache["pooled"][cap], time_ids=self.cache["time_ids"][idx])
        return out

    def get_state(self) -> bytes:
        return json.dumps({"step": self.step, "seed": self.seed, "records": self.n}).encode()

    def set_state(self, state) -> None:
        s = json.loads(state.decode() if isinstance(state, bytes) else state)
        if (s["seed"], s["records"]) != (self.seed, self.n):
            raise ValueError(f"the checkpoint's data cache had seed {s['seed']} and {s['records']} records; this run "
                             f"has seed {self.seed} and {self.n}: resume with the config it was saved with")
        self.step = s["step"]

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
        pass


def put_global(tree, shardings):
    """Host arrays, the same on every host, -> global arrays with `shardings` (each device takes its part)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
        tree, shardings)


def _encode_in_chunks(fn, params, arrays: list, chunk: int, mesh) -> list:
    """Runs jitted `fn(params, *chunk_arrays)` over the leading axis of host arrays (the same on
    every host); each host feeds its rows, results come back whole on every host."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    chunk = max(n_dev, -(-chunk // n_dev) * n_dev)
    per = chunk // n_proc
    out = []
    for i in range(0, len(arrays[0]), chunk):
        parts = []
        for a in arrays:
            c = a[i:i + chunk]
            if len(c) < chunk:
                c = np.concatenate([c, np.repeat(c[-1:], chunk - len(c), 0)])
            parts.append(c[jax.process_index() * per:(jax.process_index() + 1) * per])
        res = fn(params, *parallel.host_to_global(parts, mesh))
        out.append(jax.tree_util.tree_map(lambda x, n=min(chunk, len(arrays[0]) - i): np.asarray(x)[:n], res))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *out)


def build_cache(config, source, res: int, parts, tokenizer, frozen, mesh) -> dict:
    """Encodes records [0, cache.size) once, `cache.batch_size` images at a time as they are read:
    {"mean", "std" [N, h, w, c], "context" [M, L, D] for every caption, "cap_start", "cap_count" [N]},
    "empty" [L, D] (the "" caption's states) and "skipped" [(key, reason)]: a record whose image
    does not decode is left out and counted, as the streaming loader does.

    SDXL (`sdxl_cond.is_sdxl`): context is both encoders' states, plus "pooled" [M, P],
    "empty_pooled" [P] and "time_ids" [N, K] (original size, center crop, target size)."""
    n = int(config.cache.size) or len(source)
    if n > 10_000_000:
        raise ValueError(f"{source!r} is endless; set cache.size to the number of records to cache")
    rep = parallel.replicated(mesh)
    vae, te = parts["vae"], parts["text_encoder"]

    def enc_img(fp, x):
        post = vae.apply({"params": fp["vae"]}, x, method=vae.encode)
        return post.mean, post.std

    xl = sdxl_cond.is_sdxl(parts["unet"])

    def enc_txt(fp, ids, ids_2=None):
        if xl:
            return sdxl_cond.encode(parts, fp, ids, ids_2)
        return te.apply({"params": fp["text_encoder"]}, ids).last_hidden_state.astype(jnp.float32)

    enc_img, enc_txt = jax.jit(enc_img, out_shardings=rep), jax.jit(enc_txt, out_shardings=rep)
    bs = int(config.cache.batch_size)
    means, stds, pending, captions, start, count, skipped, time_ids = [], [], [], [], [], [], [], []

    def flush():
        if pending:
            m, sd = _encode_in_chunks(enc_img, frozen, [np.stack(pending)], bs, mesh)
            means.append(m)
            stds.append(sd)
            pending.clear()

    for i in range(n):
        rec = source[i]
        try:
            img, original = data_lib.decode_image(rec["image"], res, with_size=True)
        except Exception as e:  # noqa: BLE001  one bad image costs that image, as in the streaming loader
            key = str(rec.get("key", i))
            log.warning("cache: skipping image %s: %s", key, e)
            skipped.append((key, str(e)))
            continue
        h, w = img.shape[:2]
        top, left = (h - res) // 2, (w - res) // 2
        pending.append(img[top:top + res, left:left + res].astype(np.float32) / 127.5 - 1.0)
        if xl:
            time_ids.append(sdxl_cond.example_time_ids(original, (top, left), res, sdxl_cond.num_time_ids(parts)))
        start.append(len(captions))
        count.append(len(rec["captions"]))
        captions += list(rec["captions"])
        if len(pending) == bs:
            flush()
    flush()
    if not start:
        names = ", ".join(k for k, _ in skipped[:5])
        raise ValueError(f"none of the {n} records of {source!r} has an image that decodes (e.g. {names}); "
                         "check the dataset's image paths")
    mean, std = np.concatenate(means), np.concatenate(stds)
    texts = captions + [""]
    ids = [tokenizer(texts)] + ([parts["tokenizer_2"](texts)] if xl else [])
    context = _encode_in_chunks(enc_txt, frozen, ids, bs, mesh)
    extra = {}
    if xl:
        context, pooled = context
        extra = {"pooled": pooled[:-1], "empty_pooled": pooled[-1], "time_ids": np.stack(time_ids)}
    log.info("cached %d records (%d captions, %d images skipped): latents %s, text states %s", len(start),
             len(captions), len(skipped), mean.shape[1:], context.shape[1:])
    return {"mean": mean, "std": std, "context": context[:-1], "empty": context[-1],
            "cap_start": np.asarray(start), "cap_count": np.asarray(count), "skipped": skipped, **extra}
