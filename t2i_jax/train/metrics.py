"""Metrics to `workdir/metrics.jsonl` and TensorBoard event files, without TensorFlow.

An event file is a TFRecord stream of `tensorflow.Event` protos: each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian). A scalar is `Event{wall_time=1, step=2, summary=5:
Summary{value=1: Value{tag=1, simple_value=2}}}`; the first event of a file
carries `file_version=3: "brain.Event:2"`. The few protobuf fields needed are
encoded here by hand; `read_events` reads them back (and checks the CRCs).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["MetricWriter", "EventWriter", "read_events", "read_jsonl", "crc32c"]


# ---------------------------------------------------------------------------
# CRC32C (Castagnoli), table-driven; records are small.
# ---------------------------------------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Protobuf wire format: just what Event/Summary/Value need.
# ---------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


def _parse(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized message."""
    i = 0

    def varint():
        nonlocal i
        shift = n = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(buf):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, wire, varint()
        elif wire == 1:
            yield num, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield num, wire, buf[i:i + n]
            i += n
        elif wire == 5:
            yield num, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


class EventWriter:
    """Appends scalar summaries to one TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._f = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data +
                      struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding all `values` (tag -> number) at `step`."""
        self._write(_event(time.time(), int(step), scalars=values))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str | os.PathLike) -> list[dict]:
    """Parses an event file: [{"wall_time", "step", "file_version"?, "scalars": {tag: value}}].

    Raises ValueError on a CRC mismatch or a truncated record.
    """
    data = Path(path).read_bytes()
    events, i = [], 0
    while i < len(data):
        if i + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {i}")
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        body = data[i + 12:i + 12 + n]
        if len(body) < n or i + 16 + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {i}")
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if dcrc != _masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + n
        ev = {"scalars": {}}
        for num, _, v in _parse(body):
            if num == 1:
                ev["wall_time"] = struct.unpack("<d", v)[0]
            elif num == 2:
                ev["step"] = v - (1 << 64) if v >= 1 << 63 else v
            elif num == 3:
                ev["file_version"] = v.decode()
            elif num == 5:
                for vnum, _, value in _parse(v):
                    if vnum != 1:
                        continue
                    fields = {n_: x for n_, _, x in _parse(value)}
                    if 1 in fields and 2 in fields:
                        ev["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
        events.append(ev)
    return events


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _trim_jsonl(path: Path, start: int) -> None:
    """Drops the rows of steps after `start` (and a torn last line), rewriting the file atomically."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write
        if step <= start:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/` (process 0 only).

    Non-finite values go to JSONL as the strings "nan" / "inf" / "-inf", so the
    file stays valid JSON and the value stays visible.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, start: int = 0):
        """`start`: the step the run (re)starts from; rows of later steps in an existing
        metrics.jsonl, written after the checkpoint a crashed run resumes from, are dropped
        so the file holds each step once."""
        self.enabled = enabled
        if not enabled:
            return
        Path(workdir).mkdir(parents=True, exist_ok=True)
        path = Path(workdir) / "metrics.jsonl"
        if path.exists():
            _trim_jsonl(path, start)
        self._jsonl = open(path, "a", encoding="utf-8")
        self._events = EventWriter(Path(workdir) / "tensorboard")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Logs `values` at `step` to both sinks, flushed."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._events.scalars(step, values)
        self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()
