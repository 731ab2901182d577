"""Metrics to `workdir/metrics.jsonl` and TensorBoard event files, written with tensorboardX.

An event file is a TFRecord stream of `tensorflow.Event` protos: each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian); tensorboardX writes it (its protos, its CRC32C), without
TensorFlow. Each log step is one `Event` whose `Summary` holds every scalar of
that step. `read_events` reads a file back (checking the CRCs) for tests and
scripts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path

from t2i_jax.files import atomic_write

__all__ = ["EventWriter", "MetricWriter", "read_events", "read_jsonl"]

# Writers opened by this process: part of the file name, so that two writers
# opened in the same second (a run resumed in-process) never share a file.
_SERIAL = itertools.count()


class EventWriter:
    """Appends scalar summaries to one TensorBoard event file in `logdir`.

    Writes are synchronous: `flush` puts every event so far on disk.
    (tensorboardX's `FileWriter` queues events to a background thread, and
    its `flush` does not wait for the queue.)
    """

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step. The file then starts with a SessionLog START
        event at that step, which tells TensorBoard to drop the events of later steps that earlier
        files hold (written after the checkpoint a crashed run resumes from)."""
        # Imported here, not at the top: tensorboardX imports torch when torch
        # is installed (0.8 s, +180 MB of host memory), and only the process
        # that writes metrics needs it.
        from tensorboardX.event_file_writer import EventsWriter

        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.{next(_SERIAL)}"
        pattern = f"events.out.tfevents.*{suffix}"
        before = set(logdir.glob(pattern))  # an earlier process with the same pid
        self._writer = EventsWriter(str(logdir / "events"), filename_suffix=suffix)
        (self.path,) = set(logdir.glob(pattern)) - before
        if purge_step is not None:
            from tensorboardX.proto import event_pb2

            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(purge_step), session_log=start))
            self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding all `values` (tag -> number) at `step`."""
        from tensorboardX.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items()])
        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        """Writes what was logged to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the file."""
        self._writer.close()


def read_events(path: str | os.PathLike) -> list[dict]:
    """Parses an event file: [{"wall_time", "step", "file_version"?, "session_log"?, "scalars": {tag: value}}].

    Raises ValueError on a CRC mismatch or a truncated record.
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    data = Path(path).read_bytes()
    events, i = [], 0
    while i < len(data):
        if i + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {i}")
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        if i + 16 + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {i}")
        body = data[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if dcrc != masked_crc32c(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + n
        ev = event_pb2.Event.FromString(body)
        out = {"wall_time": ev.wall_time, "step": ev.step,
               "scalars": {v.tag: v.simple_value for v in ev.summary.value if v.HasField("simple_value")}}
        if ev.file_version:
            out["file_version"] = ev.file_version
        if ev.HasField("session_log"):
            out["session_log"] = event_pb2.SessionLog.SessionStatus.Name(ev.session_log.status)
        events.append(out)
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
        data = "".join(keep).encode("utf-8")
        atomic_write(path, lambda f: f.write(data))


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
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115  open for the run
        self._events = EventWriter(Path(workdir) / "tensorboard", purge_step=start if start > 0 else None)

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
        """Closes both sinks."""
        if self.enabled:
            self._jsonl.close()
            self._events.close()
