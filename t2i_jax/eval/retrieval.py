"""Text<->image retrieval: recall@K in both directions and matched-pair cosine similarity.

The usual Flickr/COCO protocol: N images, M >= N captions, each caption
belongs to one image (`text_to_image[j]`). Text->image: for each caption, is
its image among the K most similar images? Image->text: for each image, is
any of its captions among the K most similar captions?

A caption is also counted correct for another image that carries the very same
caption string (pass `relevant`): synthetic data repeats captions, and
ranking one of two identical descriptions first is not an error.

Ties are scored against the model: an item ranks behind every non-relevant
item with an equal score, so a collapsed model (all scores equal) gets recall
K / N, not 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["l2_normalize", "recall_at_k", "matched_cosine", "relevance_from_captions", "retrieval_metrics",
           "format_table"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ranks(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row: how many non-relevant columns score >= the best relevant column (0 = top)."""
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant item")
    best = np.where(relevant, sim, -np.inf).max(axis=1, keepdims=True)
    return ((sim >= best) & ~relevant).sum(axis=1)


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K for queries (rows of `sim`) against items (columns).

    Args:
      sim: [queries, items] scores, higher is more similar.
      relevant: bool [queries, items], True where the item is a correct answer.
      ks: the K values.
    Returns {"R@K": fraction of queries with a relevant item in the top K}.
    """
    sim, relevant = np.asarray(sim), np.asarray(relevant, bool)
    if sim.shape != relevant.shape:
        raise ValueError(f"sim {sim.shape} and relevant {relevant.shape} differ in shape")
    ranks = _ranks(sim, relevant)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def matched_cosine(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray) -> float:
    """Mean cosine similarity of each caption with its own image."""
    t, v = l2_normalize(text_emb), l2_normalize(image_emb)
    return float(np.mean(np.sum(t * v[np.asarray(text_to_image)], axis=-1)))


def relevance_from_captions(captions: Sequence[str], text_to_image: np.ndarray, num_images: int) -> np.ndarray:
    """bool [texts, images]: caption j is relevant to image i if i has a caption equal to caption j."""
    captions = list(captions)
    text_to_image = np.asarray(text_to_image)
    ids = {c: n for n, c in enumerate(dict.fromkeys(captions))}
    has = np.zeros((len(ids), num_images), bool)  # distinct caption x image
    for c, i in zip(captions, text_to_image):
        has[ids[c], i] = True
    return has[[ids[c] for c in captions]]


def retrieval_metrics(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray, *,
                      relevant: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways and matched-pair cosine, from (unnormalised) embeddings.

    Args:
      text_emb: [M, D] caption embeddings; image_emb: [N, D] image embeddings.
      text_to_image: int [M], the image of each caption.
      relevant: optional bool [M, N]; default: only each caption's own image.
    Returns {"t2i_R@K", "i2t_R@K" for K in ks, "cosine", "num_images", "num_texts"}.
    """
    text_to_image = np.asarray(text_to_image)
    m, n = len(text_emb), len(image_emb)
    if text_to_image.shape != (m,) or text_to_image.min() < 0 or text_to_image.max() >= n:
        raise ValueError(f"text_to_image must hold {m} image indices in [0, {n})")
    if relevant is None:
        relevant = np.zeros((m, n), bool)
        relevant[np.arange(m), text_to_image] = True
    sim = l2_normalize(text_emb) @ l2_normalize(image_emb).T  # [M, N]
    out = {f"t2i_{k}": v for k, v in recall_at_k(sim, relevant, ks).items()}
    out.update({f"i2t_{k}": v for k, v in recall_at_k(sim.T, relevant.T, ks).items()})
    out["cosine"] = matched_cosine(text_emb, image_emb, text_to_image)
    out["num_images"], out["num_texts"] = n, m
    return out


def format_table(results: dict[str, dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> str:
    """A text table, one row per named result (e.g. "before", "after"), in percent."""
    cols = [f"t2i_R@{k}" for k in ks] + [f"i2t_R@{k}" for k in ks]
    lines = [f"{'':8s}" + "".join(f"{c:>10s}" for c in cols) + f"{'cosine':>9s}"]
    for name, r in results.items():
        lines.append(f"{name:8s}" + "".join(f"{100 * r[c]:10.1f}" for c in cols) + f"{r['cosine']:9.4f}")
    return "\n".join(lines)
