"""`python -m t2i_jax.bench`: see t2i_jax.bench.cli."""

from t2i_jax.bench.cli import main

if __name__ == "__main__":
    main()
