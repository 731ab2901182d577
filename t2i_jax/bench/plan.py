"""The memory planner: the smallest FSDP degree and remat policy whose LDM train step fits a TPU chip.

    python -m t2i_jax.bench --plan tpu:v5e:16x16 --model sd15 --resolution 512 --batch 2048

Candidates are (fsdp, remat) on the project's mesh (`parallel.make_mesh(data=-1,
fsdp=...)`), fsdp a power of two dividing the chip count. Preferred is the
smallest fsdp (least parameter traffic), and at that degree no remat (least
recomputation). Each candidate is judged by compiling the trainer's step for
the topology (`aot.compile_train_ldm`) and comparing XLA's per-chip total with
the chip's HBM; a compile the TPU compiler refuses for want of memory counts as
not fitting. Few are compiled:

- a candidate whose arguments plus one fp32 gradient per parameter shard
  (`aot.train_bytes_lower_bound`, no compile) already exceed HBM is skipped;
- memory falls as fsdp grows and with remat, so degrees are tried in
  ascending order under remat, the first that fits is the answer, and only
  that degree is then tried without remat.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from t2i_jax import parallel
from t2i_jax.bench import aot, tpu_chips

__all__ = ["degrees", "plan"]


def degrees(num_chips: int) -> list[int]:
    """The FSDP degrees tried: powers of two dividing `num_chips`, and `num_chips` itself."""
    out = [d for d in (2 ** k for k in range(num_chips.bit_length())) if num_chips % d == 0]
    return sorted(set(out) | {num_chips})


def plan(s: aot.AotSettings, log: Callable[[str], None] = lambda m: None, *,
         remat_options: tuple[bool, ...] = (True, False)) -> dict:
    """The plan for `s` (topology, model, resolution, global batch): {"choice": the fitting candidate
    preferred (None if none fits), "candidates": every candidate considered, with its per-chip bytes
    or why it was skipped, "compiles": how many were compiled}.

    `remat_options`: remat policies to consider, the memory-saving one first ((True,) plans only
    with remat, as configs/sd15_finetune.py trains).
    """
    devices = aot.topology_devices(s.topology)
    chip = tpu_chips.chip_for(s.topology.removeprefix("tpu:"))
    n = len(devices)
    aot.validate(dataclasses.replace(s, what=("train_ldm",)), n)
    hbm = chip.hbm_bytes
    candidates: dict[tuple[int, bool], dict] = {}

    def judge(fsdp: int, remat: bool) -> bool:
        key = (fsdp, remat)
        if key in candidates:
            return candidates[key]["fits"]
        one = dataclasses.replace(s, fsdp=fsdp, remat=remat, what=("train_ldm",))
        mesh = parallel.make_mesh(data=-1, fsdp=fsdp, devices=devices)
        prog = aot.train_ldm_program(one, mesh)
        bound = aot.train_bytes_lower_bound(prog)
        row = {"fsdp": fsdp, "data": n // fsdp, "remat": remat, "lower_bound_bytes": bound}
        if bound > hbm:
            row.update(fits=False, skipped=f"arguments + gradients alone are {bound / 2**30:.2f} GiB per chip, "
                                           f"over {hbm / 2**30:.0f} GiB")
            log(f"plan: fsdp={fsdp} remat={remat}: skipped ({row['skipped']})")
        else:
            log(f"plan: fsdp={fsdp} remat={remat}: compiling ...")
            t0 = time.perf_counter()
            try:
                r = aot.compile_train_ldm(one, mesh, chip, program=prog)
                mem = r["memory_per_chip"]
                row.update(fits=mem["fits"], memory_per_chip=mem, flops_per_item=r["flops_per_item"],
                           roofline_per_chip=r["roofline_per_chip"],
                           max_items_per_s_per_chip=r["max_items_per_s_per_chip"],
                           collectives=r["collectives"]["counts"], compile_s=r["compile_s"])
            except Exception as e:  # noqa: BLE001  only the compiler's out-of-memory is an answer
                if not aot.is_oom(e):
                    raise
                row.update(fits=False, compile_error=str(e).splitlines()[0][:500],
                           compile_s=time.perf_counter() - t0)
            total = row.get("memory_per_chip", {}).get("total")
            log(f"plan: fsdp={fsdp} remat={remat}: {'fits' if row['fits'] else 'does not fit'}"
                + (f" ({total / 2**30:.2f} GiB per chip)" if total else "")
                + (f": {row['compile_error'][:300]}" if "compile_error" in row else ""))
        candidates[key] = row
        return row["fits"]

    ds = degrees(n)
    first = remat_options[0]
    choice = None
    for d in ds:  # ascending; a degree under the lower bound costs no compile
        if judge(d, first):
            choice = candidates[(d, first)]
            for other in remat_options[1:]:
                if judge(d, other):
                    choice = candidates[(d, other)]
            break
    rows = sorted(candidates.values(), key=lambda r: (r["fsdp"], r["remat"]))
    return {"settings": dataclasses.asdict(s) | {"what": ["train_ldm"]},
            "topology": {"name": s.topology.removeprefix("tpu:"), "chips": n, "device_kind": devices[0].device_kind},
            "chip": chip.as_dict(), "choice": choice, "candidates": rows,
            "compiles": sum(1 for r in rows if "skipped" not in r),
            "note": "compiled ahead of time for the topology on this machine; per-chip bytes are XLA's plan"}


def table(report: dict) -> str:
    """The candidates and the choice as text."""
    t = report["topology"]
    lines = [f"memory plan: {report['settings']['model']} train step, batch {report['settings']['batch']} on "
             f"{t['name']} ({t['chips']} x {t['device_kind']}, {report['chip']['hbm_gib']:.0f} GiB per chip)",
             f"{'fsdp':>5} {'data':>5} {'remat':>6} {'GiB/chip':>9}  verdict"]
    for r in report["candidates"]:
        total = r.get("memory_per_chip", {}).get("total")
        verdict = r.get("skipped") or r.get("compile_error") or ("fits" if r["fits"] else "does not fit")
        lines.append(f"{r['fsdp']:5d} {r['data']:5d} {str(r['remat']):>6} "
                     f"{'-' if total is None else format(total / 2**30, '9.2f'):>9}  {verdict}")
    c = report["choice"]
    lines.append("choice: " + ("none fits" if c is None else f"fsdp={c['fsdp']} remat={c['remat']}"))
    return "\n".join(lines)
