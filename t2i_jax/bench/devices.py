"""What a device can do: datasheet peaks, a measured matmul peak, memory in use."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

# Dense (no 2:4 sparsity) peak TFLOP/s per JAX device, from the vendors'
# datasheets: (pattern on `device.device_kind`, name, bf16, fp32). Most
# specific patterns first.
#
# NVIDIA "fp32" is the TF32 tensor-core peak: XLA runs float32 convolutions
# and matmuls at default precision in TF32 on Ampere and newer, so that is
# the ceiling an fp32 run can reach. TPU v2/v3 expose each core as a device
# (half a chip); v4 and later expose a chip. TPU fp32 is left open: at default
# precision an fp32 matmul is one bf16 MXU pass, so no separate peak applies.
PEAKS: tuple[tuple[str, str, float | None, float | None], ...] = (
    (r"H200 NVL", "H200 NVL", 835.5, 417.5),
    (r"H200", "H200 SXM", 989.4, 494.7),
    (r"H100 NVL", "H100 NVL", 835.5, 417.5),
    (r"H100 PCIe", "H100 PCIe", 756.5, 378.0),
    (r"H100|H800", "H100 SXM", 989.4, 494.7),
    (r"GH200", "GH200", 989.4, 494.7),
    (r"B200", "B200", 2250.0, 1100.0),
    (r"A100|A800", "A100", 312.0, 156.0),
    (r"L40S", "L40S", 366.0, 183.0),
    (r"\bL4\b", "L4", 121.0, 60.0),
    (r"\bA10\b(?!0)", "A10", 125.0, 62.5),
    (r"TPU v6 lite|TPU v6e|TPU7x|Trillium", "TPU v6e", 918.0, None),
    (r"TPU v5 lite|TPU v5e", "TPU v5e", 197.0, None),
    (r"TPU v5p|TPU v5", "TPU v5p", 459.0, None),
    (r"TPU v4", "TPU v4", 275.0, None),
    (r"TPU v3", "TPU v3 (per core)", 61.5, None),
    (r"TPU v2", "TPU v2 (per core)", 22.5, None),
)


def datasheet_peak(device_kind: str, dtype: str) -> tuple[str | None, float | None]:
    """(matched name, dense peak TFLOP/s for `dtype` "bf16"/"fp32") or (None, None)
    for a device not in `PEAKS` (CPUs among them)."""
    for pattern, name, bf16, fp32 in PEAKS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return name, (bf16 if dtype == "bf16" else fp32)
    return None, None


def measure_matmul_tflops(dtype, *, n: int | None = None, iters: int = 10) -> float:
    """Achieved TFLOP/s of a square n x n matmul chain on one device.

    A ceiling that this software stack reaches on this device for dense
    work in `dtype`; utilisation against it says how far the model is from
    the best the device does, independent of datasheet clocks.
    """
    dev = jax.devices()[0]
    if n is None:
        n = 1024 if dev.platform == "cpu" else 8192
    reps = 4

    @jax.jit
    def chain(a, b):
        for _ in range(reps):
            a = (a @ b).astype(dtype)
        return a

    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (n, n), dtype) / n ** 0.5, dev)
    b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype) / n ** 0.5, dev)
    chain(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = chain(a, b)
    out.block_until_ready()
    dt = (time.perf_counter() - t0) / iters
    return 2.0 * n ** 3 * reps / dt / 1e12


def peak_bytes_in_use() -> int | None:
    """The largest `peak_bytes_in_use` over local devices since the process
    started (None where the backend keeps no statistics, e.g. CPU)."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes XLA planned for one executable (arguments, outputs,
    temporaries, aliased/donated), or None when the backend does not say."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f, 0) or 0) for f in fields}


def dtype_of(name: str):
    """"bf16" / "fp32" -> the jnp dtype."""
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[name]
