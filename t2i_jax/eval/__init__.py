"""Evaluation metrics: retrieval recall@K and matched-pair cosine (more to come: CLIP score, FID)."""

from t2i_jax.eval.retrieval import format_table, matched_cosine, recall_at_k, retrieval_metrics

__all__ = ["format_table", "matched_cosine", "recall_at_k", "retrieval_metrics"]
