"""Evaluation metrics: retrieval recall@K and matched-pair cosine, shapes prompt adherence, CLIP score.

`python -m t2i_jax.eval DIR` scores a folder written by `python -m t2i_jax.sample`.
The CLIP score (`t2i_jax.eval.clip_score.CLIPScorer`) imports JAX and the
models, so it is not imported here.
"""

from t2i_jax.eval.adherence import AdherenceReport, ShapesPrompt, analyze_image, format_adherence_table, parse_caption
from t2i_jax.eval.adherence import evaluate as evaluate_adherence
from t2i_jax.eval.retrieval import format_table, matched_cosine, recall_at_k, retrieval_metrics

__all__ = ["format_table", "matched_cosine", "recall_at_k", "retrieval_metrics", "AdherenceReport", "ShapesPrompt",
           "analyze_image", "evaluate_adherence", "format_adherence_table", "parse_caption"]
