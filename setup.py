"""t2i_jax: maintained Flax Stable Diffusion (CLIP, VAE, U-Net, samplers, training)."""

from setuptools import find_packages, setup

# torch is optional: safetensors checkpoints load without it. It is needed for
# pickled checkpoints (.bin/.ckpt) and for the PyTorch reference in the tests.
# Install `torch==2.13.0` (or your own CUDA build) *before* this package so pip
# does not pull a different torch for you.
TORCH = ["torch", "diffusers"]
# python -m t2i_jax.serve: the ASGI app and its server.
SERVE = ["starlette", "uvicorn"]
# The TPU compiler, for ahead-of-time compiles for TPU topologies on any machine
# (`python -m t2i_jax.bench --aot tpu:v5e:4x4`, tests/test_aot.py). 0.0.52 is the
# newest on the index and is verified with jax 0.10.2 here; jax 0.10.2's own `tpu`
# extra pins libtpu==0.0.42.* (its METADATA). jax 0.11.2 was not on the index when
# this was written, so its pin could not be read: when jax moves, take the libtpu
# its METADATA names (`Requires-Dist: libtpu==...; extra == "tpu"`) and rerun
# tests/test_aot.py.
TPU_AOT = ["libtpu==0.0.52"]

setup(
    name="t2i_jax",
    version="0.1.0",
    description="JAX/Flax text-to-image latent diffusion in the Stable Diffusion family",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["t2i_jax", "t2i_jax.*"]),
    package_data={"t2i_jax": ["assets/*", "assets/shapes_model/*", "assets/shapes_model/*/*", "serve/static/*"]},
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "transformers>=5",
        # 0.8: safe_open(backend="pread"), what convert/core reads with.
        "safetensors>=0.8",
        "huggingface_hub",
        "ml_collections",
        "grain",
        "tensorflow-datasets",
        # tensorflow-datasets 4.9.10 imports it at run time without declaring it.
        "importlib_resources",
        "pillow",
        "numpy",
        # The evaluator's connected components (scipy.ndimage.label).
        "scipy",
        # TensorBoard event files without TensorFlow (t2i_jax.train.metrics).
        "tensorboardX",
        "tqdm",
    ],
    extras_require={
        "torch": TORCH,
        "tpu-aot": TPU_AOT,
        "serve": SERVE,
        # peft: the tests make LoRAs with it and load them with diffusers' load_lora_weights;
        # httpx: the server tests' client; playwright: the page's test, driving Debian's chromium (never
        # `playwright install`); libtpu: tests/test_aot.py compiles for TPU topologies.
        "test": TORCH + SERVE + TPU_AOT + ["pytest", "pytest-xdist", "ruff", "peft", "httpx", "playwright"],
    },
)
