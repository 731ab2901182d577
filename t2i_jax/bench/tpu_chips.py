"""What one TPU chip holds and does: HBM capacity, HBM bandwidth and dense bf16 peak, per TPU kind.

Figures per chip from Google Cloud's system-architecture pages (the chip
specification tables), checked against them on 2026-12-01:
  v4   https://cloud.google.com/tpu/docs/v4   "275 teraflops (bf16 or int8)", "HBM2 capacity and bandwidth:
       32 GiB, 1200 GBps"
  v5e  https://cloud.google.com/tpu/docs/v5e  "197 TFLOPs" (bf16), "HBM2 capacity and bandwidth: 16 GB, 819 GBps"
       (a later revision of the page lists "HBM bandwidth per chip: 800 GiBps"; 819 GB/s is kept)
  v5p  https://cloud.google.com/tpu/docs/v5p  "459 TFLOPs" (bf16), "HBM2e capacity and bandwidth: 95 GB, 2765 GBps"
  v6e  https://cloud.google.com/tpu/docs/v6e  "918 TFLOPs" (bf16), "HBM capacity per chip: 32 GB",
       "HBM bandwidth per chip: 1638 GBps"
Capacities are taken in GiB: the pages write "GB" for the same 16 GiB / 32 GiB parts the v4
page writes in GiB, and the TPU compiler's own out-of-memory report on a v5e adds up to 16 GiB
("Used 30.21G of 15.48G hbm", with 530.00M reserved: https://github.com/erfanzar/EasyDeL/issues/142).
That report also shows a program gets about 0.5 GiB less than the datasheet: a compile for the
topology, which refuses what does not fit, is the final word, not the comparison with `hbm_bytes`.
Bandwidths are decimal (GB/s = 1e9 bytes/s) as published. The peaks are the ones
`t2i_jax.bench.devices.PEAKS` holds for measured runs.
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
    "v6e": Chip("v6e", 32 * GiB, 1638e9, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
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
