"""The memory planner: the smallest FSDP degree whose LDM train step fits a TPU chip, and at it the
largest per-chip micro-batch, remat only if needed, and XLA's attention or the chunked one.

    python -m t2i_jax.bench --plan tpu:v5e:16x16 --model sd15 --resolution 512 --batch 2048
    python -m t2i_jax.bench --plan tpu:v5e:4x4 --model sdxl --batch 64   # configs/sdxl_finetune.py's step

`lower_bounds` gives the first filter alone, per FSDP degree, without compiling.

A candidate is (fsdp, remat, attention, micro-batch per chip) on the project's
mesh (`parallel.make_mesh(data=-1, fsdp=...)`): fsdp a power of two dividing
the chip count; the micro-batch set through the trainer's `train.grad_accum`
(the global batch stays `batch`: batch / chips = micro-batch x grad_accum);
attention "chunked" (`layers.query_chunk_size`: exact, the scores held a query
chunk at a time) or "xla". Each is judged by compiling the trainer's step for
the topology (`aot.compile_train_ldm`) and comparing XLA's per-chip total with
the chip's HBM; a compile the TPU compiler refuses for want of memory counts as
not fitting.

Preferred, in this order: the smallest fsdp (least parameter traffic), then
the largest micro-batch (fewest accumulation passes), then no remat (no
recomputation), then XLA's attention. Memory falls as fsdp grows, with remat,
with chunked attention and with a smaller micro-batch, so few are compiled:

- a candidate whose arguments plus one fp32 gradient per parameter shard
  (`aot.train_bytes_lower_bound`, no compile) already exceed HBM is skipped;
- degrees are tried in ascending order with every memory saving on (remat,
  the first attention option, the smallest micro-batch); the first that fits
  is the degree;
- at that degree the largest fitting micro-batch is found by bisection, then
  remat off and then the other attention are each tried once, kept if they fit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from t2i_jax import parallel
from t2i_jax.bench import aot, tpu_chips

__all__ = ["degrees", "micro_batches", "plan", "lower_bounds"]

ATTENTION_OPTIONS = ("chunked", "xla")  # the memory-saving one first


def degrees(num_chips: int) -> list[int]:
    """The FSDP degrees tried: powers of two dividing `num_chips`, and `num_chips` itself."""
    out = [d for d in (2 ** k for k in range(num_chips.bit_length())) if num_chips % d == 0]
    return sorted(set(out) | {num_chips})


def micro_batches(per_chip: int) -> list[int]:
    """The micro-batches per chip tried, ascending: `per_chip` and its halvings while they divide it."""
    out = [per_chip]
    while out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return sorted(out)


def lower_bounds(s: aot.AotSettings, fsdp_degrees: Sequence[int] | None = None) -> dict:
    """The planner's lower bound per FSDP degree, with nothing compiled: for each degree (default
    `degrees(chips)`), the per-chip bytes of the LDM train step's arguments (train state with the
    config's EMA and AdamW moments, the frozen parts replicated, the global batch `s.batch` split
    over the chips) plus one fp32 gradient per parameter shard (`aot.train_bytes_lower_bound`), from
    abstract values only. Activations and XLA's temporaries come on top, so a degree that passes
    may still not fit; one that fails cannot.

    Returns {"topology", "chip", "batch", "resolution", "ema", "rows": [{"fsdp", "data",
    "lower_bound_bytes", "state_bytes", "frozen_bytes", "batch_bytes", "gradient_bytes",
    "passes"}], "smallest_passing_fsdp" (None if none passes), "note"}.
    """
    devices = aot.topology_devices(s.topology)
    chip = tpu_chips.chip_for(s.topology.removeprefix("tpu:"))
    n = len(devices)
    aot.validate(dataclasses.replace(s, what=("train_ldm",)), n)
    rows = []
    prog = None
    for d in fsdp_degrees or degrees(n):
        if n % d:
            raise ValueError(f"fsdp {d} does not divide the {n} chips of {s.topology}; use one of {degrees(n)}")
        mesh = parallel.make_mesh(data=-1, fsdp=d, devices=devices)
        prog = aot.train_ldm_program(dataclasses.replace(s, fsdp=d), mesh, accumulator=False)
        state, _, frozen, batch = prog["args"]
        bound = aot.train_bytes_lower_bound(prog)
        rows.append({"fsdp": d, "data": n // d, "lower_bound_bytes": bound, "state_bytes": aot.per_chip_bytes(state),
                     "frozen_bytes": aot.per_chip_bytes(frozen), "batch_bytes": aot.per_chip_bytes(batch),
                     "gradient_bytes": aot.per_chip_bytes(state.params), "passes": bound <= chip.hbm_bytes})
    passing = [r["fsdp"] for r in rows if r["passes"]]
    return {"topology": {"name": s.topology.removeprefix("tpu:"), "chips": n, "device_kind": devices[0].device_kind},
            "chip": chip.as_dict(), "model": s.model, "batch": prog["batch"], "resolution": prog["resolution"],
            "ema": prog["config"].ema_decay > 0, "rows": rows,
            "smallest_passing_fsdp": min(passing) if passing else None,
            "note": "lower bounds before activations (arguments + one fp32 gradient), from abstract values; "
                    "nothing compiled"}


def plan(s: aot.AotSettings, log: Callable[[str], None] = lambda m: None, *,
         remat_options: tuple[bool, ...] = (True, False), attention_options: Sequence[str] = ATTENTION_OPTIONS,
         micro_batch_options: Sequence[int] | None = None) -> dict:
    """The plan for `s` (topology, model, resolution, global batch): {"choice": the fitting candidate
    preferred (None if none fits), "candidates": every candidate considered, with its per-chip bytes
    or why it was skipped, "compiles": how many were compiled}.

    Each option list may be cut to fewer choices, the memory-saving one first: `remat_options`
    ((True,) plans only with remat, as configs/sd15_finetune.py trains), `attention_options`
    (U-Net `attention_impl`s, e.g. ("chunked:512", "xla")), `micro_batch_options` (micro-batches per
    chip, each dividing the batch per chip; default `micro_batches` of it).
    """
    devices = aot.topology_devices(s.topology)
    chip = tpu_chips.chip_for(s.topology.removeprefix("tpu:"))
    n = len(devices)
    aot.validate(dataclasses.replace(s, what=("train_ldm",)), n)
    per_chip = (s.batch or n) // n
    micros = sorted(set(micro_batch_options or micro_batches(per_chip)))
    bad = [m for m in micros if m < 1 or per_chip % m]
    if bad:
        raise ValueError(f"micro-batch(es) {bad} per chip do not divide the {per_chip} samples per chip of batch "
                         f"{s.batch or n} on {n} chips; choose from {sorted(set(micro_batches(per_chip)))} "
                         f"or other divisors of {per_chip}")
    if not remat_options or not attention_options:
        raise ValueError("remat_options and attention_options each need at least one choice")
    hbm = chip.hbm_bytes
    candidates: dict[tuple, dict] = {}

    def judge(fsdp: int, remat: bool, attention: str, micro: int) -> bool:
        key = (fsdp, remat, attention, micro)
        if key in candidates:
            return candidates[key]["fits"]
        name = f"fsdp={fsdp} remat={remat} attention={attention} micro-batch={micro}/chip"
        one = dataclasses.replace(s, fsdp=fsdp, remat=remat, what=("train_ldm",), attention_impl=attention,
                                  grad_accum=per_chip // micro)
        mesh = parallel.make_mesh(data=-1, fsdp=fsdp, devices=devices)
        prog = aot.train_ldm_program(one, mesh)
        bound = aot.train_bytes_lower_bound(prog)
        row = {"fsdp": fsdp, "data": n // fsdp, "remat": remat, "attention_impl": attention,
               "micro_batch_per_chip": micro, "grad_accum": per_chip // micro, "lower_bound_bytes": bound}
        if bound > hbm:
            row.update(fits=False, skipped=f"arguments + gradients alone are {bound / 2**30:.2f} GiB per chip, "
                                           f"over {hbm / 2**30:.0f} GiB")
            log(f"plan: {name}: skipped ({row['skipped']})")
        else:
            log(f"plan: {name}: compiling ...")
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
            log(f"plan: {name}: {'fits' if row['fits'] else 'does not fit'}"
                + (f" ({total / 2**30:.2f} GiB per chip)" if total else "")
                + (f": {row['compile_error'][:300]}" if "compile_error" in row else ""))
        candidates[key] = row
        return row["fits"]

    choice = None
    for d in degrees(n):  # ascending; a degree under the lower bound costs no compile
        remat, attention = remat_options[0], attention_options[0]
        if not judge(d, remat, attention, micros[0]):
            continue
        lo, hi = 0, len(micros)  # micros[lo] fits; micros[hi:] are not known to
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if judge(d, remat, attention, micros[mid]) else (lo, mid)
        micro = micros[lo]
        for other in remat_options[1:]:
            if judge(d, other, attention, micro):
                remat = other
        for other in attention_options[1:]:
            if judge(d, remat, other, micro):
                attention = other
        choice = candidates[(d, remat, attention, micro)]
        break
    rows = sorted(candidates.values(), key=lambda r: (r["fsdp"], -r["micro_batch_per_chip"], r["remat"],
                                                      r["attention_impl"]))
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
             f"{'fsdp':>5} {'data':>5} {'remat':>6} {'attention':>11} {'micro':>5} {'accum':>5} "
             f"{'GiB/chip':>9}  verdict"]
    for r in report["candidates"]:
        total = r.get("memory_per_chip", {}).get("total")
        verdict = r.get("skipped") or r.get("compile_error") or ("fits" if r["fits"] else "does not fit")
        lines.append(f"{r['fsdp']:5d} {r['data']:5d} {str(r['remat']):>6} {r['attention_impl']:>11} "
                     f"{r['micro_batch_per_chip']:5d} {r['grad_accum']:5d} "
                     f"{'-' if total is None else format(total / 2**30, '9.2f'):>9}  {verdict}")
    c = report["choice"]
    lines.append("choice: " + ("none fits" if c is None else
                               f"fsdp={c['fsdp']} remat={c['remat']} attention={c['attention_impl']} "
                               f"micro-batch={c['micro_batch_per_chip']}/chip (grad_accum={c['grad_accum']})"))
    return "\n".join(lines)
