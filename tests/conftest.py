"""Test setup: 8 fake CPU devices and the `slow` marker.

XLA reads XLA_FLAGS once, when jax initialises its backend, so the flag is set
here, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One OpenMP thread for torch (the PyTorch references): its spinning worker
# threads beside JAX's thread pool slow both down on a 2-core machine (the
# LoRA references ran 70x slower with torch's default two threads; three
# reference-heavy test files took 12% less time under `-n 2`).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the module: runs of one config compile the same
    programs, so repeated train runs compile them once."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


# ---------------------------------------------------------------------------
# TPU ahead-of-time compiles (test_aot*.py): the v5e:2x2 slice the fast cases compile for.

AOT_TOPOLOGY = "v5e:2x2"


@pytest.fixture(scope="session")
def chips():
    """The 4 TPU devices of a v5e:2x2 topology (libtpu's compiler, no TPU needed)."""
    from t2i_jax.bench import aot

    return aot.topology_devices(AOT_TOPOLOGY)


@pytest.fixture(scope="session")
def v5e():
    """The datasheet figures of the chip of `chips`."""
    from t2i_jax.bench import tpu_chips

    return tpu_chips.chip_for(AOT_TOPOLOGY)
