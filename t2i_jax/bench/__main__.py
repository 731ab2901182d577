"""`python -m t2i_jax.bench`: see t2i_jax.bench.cli; `python -m t2i_jax.bench enhance`: t2i_jax.bench.enhance."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["enhance"]:
        from t2i_jax.bench.enhance import main as enhance_main

        enhance_main(sys.argv[2:])
    else:
        from t2i_jax.bench.cli import main

        main()
