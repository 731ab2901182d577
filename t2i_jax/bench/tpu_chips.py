"""What one TPU chip holds and does: HBM capacity, HBM bandwidth and dense bf16 peak, per TPU kind.

Figures per chip from Google Cloud's system-architecture pages (the chip
specification tables), as published in 2025:
  v4   https://cloud.google.com/tpu/docs/v4   32 GiB HBM2, 1200 GB/s, 275 TFLOP/s bf16
  v5e  https://cloud.google.com/tpu/docs/v5e  16 GiB HBM2, 819 GB/s, 197 TFLOP/s bf16
  v5p  https://cloud.google.com/tpu/docs/v5p  95 GiB HBM2e, 2765 GB/s, 459 TFLOP/s bf16
  v6e  https://cloud.google.com/tpu/docs/v6e  32 GiB HBM, 1640 GB/s, 918 TFLOP/s bf16
The peaks are the ones `t2i_jax.bench.devices.PEAKS` holds for measured runs.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Chip", "CHIPS", "chip_for"]


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's datasheet figures."""

    kind: str  # "v5e"
    hbm_bytes: int  # HBM capacity
    hbm_bytes_per_s: float  # HBM bandwidth
    bf16_flops_per_s: float  # dense bf16 peak
    source: str  # the datasheet page

    def as_dict(self) -> dict:
        return {"kind": self.kind, "hbm_gib": self.hbm_bytes / 2**30, "hbm_gb_per_s": self.hbm_bytes_per_s / 1e9,
                "bf16_tflops": self.bf16_flops_per_s / 1e12, "source": self.source}


GiB = 2**30
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 1200e9, 275e12, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 819e9, 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GiB, 2765e9, 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GiB, 1640e9, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
}

# jax's `device_kind` of each (a topology name's prefix is tried first).
_KIND_PATTERNS = ((r"v6 lite|v6e", "v6e"), (r"v5 lite|v5e|v5litepod", "v5e"), (r"v5p|\bTPU v5\b", "v5p"),
                  (r"v4", "v4"))


def chip_for(topology_or_kind: str) -> Chip:
    """The chip of a topology name ("v5e:4x4", "tpu:v6e:2x2") or a device kind ("TPU v5 lite")."""
    head = topology_or_kind.removeprefix("tpu:").split(":")[0].strip().lower()
    if head in CHIPS:
        return CHIPS[head]
    for pattern, kind in _KIND_PATTERNS:
        if re.search(pattern, topology_or_kind, re.IGNORECASE):
            return CHIPS[kind]
    raise ValueError(f"no datasheet figures for TPU {topology_or_kind!r}; known kinds: {', '.join(CHIPS)} "
                     "(name the topology as e.g. v5e:4x4)")
