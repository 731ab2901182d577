"""`python -m t2i_jax.serve`: an AUTOMATIC1111-compatible HTTP API and a web page over the pipeline,
with requests batched across users (`batcher`), A1111 fields (`a1111`), routes (`app`)."""
