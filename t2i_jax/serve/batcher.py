"""The cross-request batcher: compatible requests share one device batch, incompatible ones queue fairly.

Requests become rows (one per image). Rows whose images can share a compiled call (same model,
size, sampler and its options, steps, guidance scale, prompt chunk count, img2img strength and
mask-ness: the CLI's grouping, `sample.batches`) form a group. The worker, ONE thread that makes
every JAX call, takes the group whose oldest row is the oldest of all (first come, first served
across groups, so no group starves), waits up to `gather_s` for more rows of it, pads the batch to
the smallest compiled batch size that holds it (padding rows repeat the last row and are dropped)
and hands each image back to its request. Every image has its own seed (`pipeline`'s per-image
seeds), so it is the CLI's image whatever else shares its batch.

Progress comes from a `pipeline.Preview` on the server's loop: a host callback after every model
evaluation and a decoded preview every `preview_every` evaluations, routed to the batch running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from t2i_jax.serve.a1111 import Request

log = logging.getLogger("t2i_jax.serve")


class QueueFull(Exception):
    """The queue holds its maximum of requests; `retry_after` estimates seconds until there is room."""

    def __init__(self, retry_after: int, limit: int):
        super().__init__(f"the queue is full ({limit} requests); retry in about {retry_after} s")
        self.retry_after, self.limit = retry_after, limit


class Draining(Exception):
    """The server is shutting down: requests already accepted finish, new ones are refused."""


class Cancelled(Exception):
    """The request was cancelled (client gone) or refused at shutdown before it ran."""


@dataclasses.dataclass
class Task:
    """What /progress reports about one request (A1111's task, `id_task`)."""

    id: str
    images: int
    steps_per_image: int = 0
    state: str = "queued"  # queued, running, done, interrupted, cancelled, failed
    done_rows: int = 0
    running_rows: int = 0
    step: int = 0
    total: int = 0
    preview: np.ndarray | None = None  # uint8 HWC
    preview_no: int = 0
    device_batches: list = dataclasses.field(default_factory=list)  # (rows, padded size) of each batch it ran in
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    job_timestamp: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        if not self.images:
            return 0.0
        running = self.running_rows * (self.step / self.total if self.total else 0.0)
        return min(1.0, (self.done_rows + running) / self.images)


@dataclasses.dataclass(eq=False)
class Work:
    """One request in the queue: its rows' results and the future its handler waits on."""

    req: Request
    task: Task
    future: concurrent.futures.Future
    images: list
    remaining: int
    seq: int
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class Row:
    work: Work
    index: int
    seq: int  # arrival order, the fairness clock
    arrived: float


@dataclasses.dataclass
class Model:
    """A configured model: its name, where it loads from, and once loaded its Sampler."""

    name: str
    source: str
    sampler: object = None
    native: int | None = None
    vae_scale: int | None = None
    load_seconds: float | None = None


class Batcher:
    """The queue and the one device thread. `submit` from any thread; everything JAX runs in the worker."""

    def __init__(self, models: Sequence[Model], *, make_sampler: Callable[[str], object],
                 batch_sizes: Sequence[int] = (1, 2, 4, 8), gather_s: float = 0.01, max_queue: int = 64,
                 preview_every: int = 4, prompt_syntax: str = "a1111"):
        from t2i_jax import pipeline

        self.models = {m.name: m for m in models}
        self.make_sampler = make_sampler
        self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
        self.gather_s, self.max_queue, self.syntax = gather_s, max_queue, prompt_syntax
        self.preview = pipeline.Preview(self._on_step, self._on_images, every=max(1, int(preview_every)))
        self._cv = threading.Condition()
        self._inbox: list[Work] = []
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []
        self._groups: dict[tuple, collections.deque] = {}
        self._queued = 0  # requests accepted and not finished
        self._running: list[Row] | None = None
        self._seq = itertools.count()
        self._compiled: dict = {}
        self.tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self.last_task: Task | None = None
        self.draining = False
        self._stop = False
        self._batch_seconds = collections.deque(maxlen=20)
        self.stats = {"batches": 0, "images": 0, "padded": 0, "compile_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="t2i-device", daemon=True)
        self._thread.start()

    # ---- Any thread.

    def submit(self, req: Request) -> Work:
        """Queues `req`; raises QueueFull or Draining. The Work's future gives (images, interrupted)."""
        with self._cv:
            if self.draining:
                raise Draining()
            if self._queued >= self.max_queue:
                raise QueueFull(self.retry_after(), self.max_queue)
            task_id = req.task_id or f"task({uuid.uuid4().hex[:12]})"
            req.task_id = task_id
            task = Task(task_id, len(req.seeds), req.steps)
            self.tasks[task_id] = task
            while len(self.tasks) > 512:
                self.tasks.popitem(last=False)
            work = Work(req, task, concurrent.futures.Future(), [None] * len(req.seeds), len(req.seeds),
                        next(self._seq))
            self._queued += 1
            self._inbox.append(work)
            self._cv.notify_all()
        return work

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Runs `fn()` in the worker thread (JAX work: loading a model); its future gives the result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def retry_after(self) -> int:
        """Seconds until the queue likely has room: recent batch times x the requests ahead."""
        per = float(np.mean(self._batch_seconds)) if self._batch_seconds else 1.0
        return max(1, int(np.ceil(per * max(1, self._queued) / max(1, self.batch_sizes[-1]))))

    def cancel(self, work: Work) -> None:
        """Drops the request's rows not yet running (its client went away)."""
        with self._cv:
            if not work.future.done():
                work.cancelled = True
                work.task.state = "cancelled"
                self._finish(work, exc=Cancelled("cancelled: the client disconnected"))

    def interrupt(self, task_id: str | None = None) -> int:
        """A1111's interrupt: requests not yet running (those of `task_id`, or all) end now with the images
        made so far; a running batch cannot be stopped inside its compiled loop and completes. Returns the
        number of requests ended."""
        ended = 0
        with self._cv:
            works = self._all_works()
            running = {id(r.work) for r in self._running or []}
            for w in works:
                if (task_id is None or w.task.id == task_id) and id(w) not in running and not w.future.done():
                    w.task.state = "interrupted"
                    self._finish(w, result=([im for im in w.images if im is not None], True))
                    ended += 1
        return ended

    def drain(self) -> None:
        """Refuses new requests from now on (Draining); the queued ones still run."""
        with self._cv:
            self.draining = True
            self._cv.notify_all()

    def idle(self) -> bool:
        """True when no accepted request is waiting or running."""
        with self._cv:
            return self._queued == 0

    def wait_idle(self, timeout: float) -> bool:
        """Blocks until every accepted request is finished, or `timeout` s; True when idle."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._queued:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def refuse_queued(self, why: str) -> int:
        """Ends every request not yet running with Cancelled(`why`) (shutdown after its timeout)."""
        n = 0
        with self._cv:
            running = {id(r.work) for r in self._running or []}
            for w in self._all_works():
                if id(w) not in running and not w.future.done():
                    self._finish(w, exc=Cancelled(why))
                    n += 1
        return n

    def close(self) -> None:
        """Stops the worker thread (after the batch it is running)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def queue_length(self) -> int:
        """Requests accepted and not finished (running ones included)."""
        with self._cv:
            return self._queued

    def task(self, task_id: str | None) -> Task | None:
        """The task named, or without a name the one running (else the latest), as A1111's /progress."""
        with self._cv:
            if task_id is not None:
                return self.tasks.get(task_id)
            if self._running:
                return self._running[0].work.task
            return self.last_task

    # ---- Under the lock.

    def _all_works(self) -> list[Work]:
        seen, out = set(), []
        for w in self._inbox + [r.work for g in self._groups.values() for r in g] + \
                [r.work for r in self._running or []]:
            if id(w) not in seen:
                seen.add(id(w))
                out.append(w)
        return out

    def _finish(self, work: Work, result=None, exc: BaseException | None = None) -> None:
        if work.future.done():
            return
        self._queued -= 1
        now = time.time()
        work.task.finished = now
        if exc is not None:
            if work.task.state not in ("cancelled", "interrupted"):
                work.task.state = "failed"
            work.future.set_exception(exc)
        else:
            if work.task.state not in ("interrupted",):
                work.task.state = "done"
            work.future.set_result(result)
        self._cv.notify_all()

    # ---- The worker thread.

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self._calls and not self._live_rows():
                    self._cv.wait(0.5)
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            for work in inbox:
                self._admit(work)
            batch = self._take()
            if batch:
                self._run(batch)

    def _live_rows(self) -> bool:
        return any(r for g in self._groups.values() for r in g if not r.work.future.done())

    def _admit(self, work: Work) -> None:
        """Files a request's rows under their group key (loading its model on first use)."""
        try:
            key = self._key(work.req)
        except Exception as e:  # a model that fails to load, a prompt the tokenizer rejects
            log.exception("request %s refused", work.task.id)
            with self._cv:
                self._finish(work, exc=e)
            return
        now = time.monotonic()
        with self._cv:
            if work.future.done():
                return
            group = self._groups.setdefault(key, collections.deque())
            for i in range(len(work.req.seeds)):
                group.append(Row(work, i, work.seq, now))

    def model(self, name: str) -> Model:
        """The named model, loaded (in the worker thread: loading and compiling are JAX work)."""
        m = self.models[name]
        if m.sampler is None:
            t0 = time.perf_counter()
            m.sampler = self.make_sampler(m.source)
            pipe = m.sampler.pipe
            m.vae_scale = pipe.vae_scale
            m.native = pipe.unet.config.sample_size * pipe.vae_scale
            m.load_seconds = time.perf_counter() - t0
            log.info("model %s loaded from %s in %.1f s", name, m.source, m.load_seconds)
        return m

    def _key(self, req: Request) -> tuple:
        from t2i_jax import prompts as prompt_lib

        sampler = self.model(req.model).sampler
        tok = sampler.pipe.tokenizer
        chunks = prompt_lib.num_chunks(tok, req.prompt, self.syntax)
        if req.cfg_scale > 1:
            chunks = max(chunks, prompt_lib.num_chunks(tok, req.negative_prompt, self.syntax))
        mode = None if req.init_image is None else ("img2img" if req.mask is None else "inpaint", req.strength)
        options = tuple(sorted(req.scheduler_options.items()))
        return (req.model, req.height, req.width, req.sampler, options, req.steps, req.cfg_scale, chunks, mode)

    def _take(self) -> list[Row] | None:
        """The next batch: the group holding the oldest row, gathered for up to `gather_s`."""
        with self._cv:
            for key in list(self._groups):
                g = self._groups[key]
                while g and g[0].work.future.done():
                    g.popleft()
                if not g:
                    del self._groups[key]
            if not self._groups:
                return None
            key = min(self._groups, key=lambda k: self._groups[k][0].seq)
            group = self._groups[key]
            deadline = group[0].arrived + self.gather_s
            cap = self.batch_sizes[-1]
            while len(group) < cap and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0 or self._inbox:
                    break
                self._cv.wait(left)
            inbox_waiting = bool(self._inbox)
        if inbox_waiting:  # newcomers may belong to this group: file them first
            with self._cv:
                inbox, self._inbox = self._inbox, []
            for work in inbox:
                self._admit(work)
            if time.monotonic() < deadline:
                return self._take()
        with self._cv:
            group = self._groups.get(key)
            if not group:
                return None
            rows = []
            while group and len(rows) < cap:
                r = group.popleft()
                if not r.work.future.done():
                    rows.append(r)
            if not group:
                del self._groups[key]
            if not rows:
                return None
            for w in {id(r.work): r.work for r in rows}.values():
                n = sum(r.work is w for r in rows)
                w.task.state = "running"
                w.task.started = w.task.started or time.time()
                w.task.running_rows = n
                w.task.step = 0
            self._running = rows
            self.last_task = rows[0].work.task
            return rows

    def padded_size(self, n: int) -> int:
        """The smallest compiled batch size that holds `n` rows."""
        return next(b for b in self.batch_sizes if b >= n)

    def _arguments(self, rows: list[Row], size: int) -> dict:
        """`Sampler.prepare`'s arguments for `rows` padded to `size` (padding repeats the last row)."""
        req = rows[0].work.req
        padded = rows + [rows[-1]] * (size - len(rows))
        kw = dict(seeds=[r.work.req.seeds[r.index] for r in padded],
                  negative_prompts=[r.work.req.negative_prompt for r in padded], steps=req.steps,
                  guidance_scale=req.cfg_scale, scheduler=req.sampler, height=req.height, width=req.width,
                  scheduler_options=req.scheduler_options or None, prompt_syntax=self.syntax, preview=self.preview)
        if req.init_image is not None:
            kw.update(init_images=np.stack([r.work.req.init_image for r in padded]), strength=req.strength)
            if req.mask is not None:
                kw["mask_images"] = np.stack([r.work.req.mask for r in padded])
        return {"prompts": [r.work.req.prompt for r in padded], **kw}

    def compiled(self, sampler, kw: dict, key: tuple):
        """The AOT-compiled loop for these arguments (cached per group key and padded size)."""
        fn, args = sampler.prepare(kw["prompts"], **{k: v for k, v in kw.items() if k != "prompts"})
        # The guidance scale is an argument of the program; only whether it guides is compiled in.
        key = key[:6] + (key[6] > 1.0,) + key[7:]
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = fn.lower(*args).compile()
            dt = time.perf_counter() - t0
            self.stats["compile_seconds"] += dt
            log.info("compiled batch %d of %s in %.1f s", len(kw["seeds"]), key, dt)
        return self._compiled[key], args

    def warm(self, req: Request) -> float:
        """Compiles `req`'s program at every batch size (call before serving); returns the seconds."""
        import jax

        t0 = time.perf_counter()
        key = self._key(req)
        sampler = self.model(req.model).sampler
        fake = Work(req, Task("warm", len(req.seeds)), concurrent.futures.Future(), [None], 1, -1)
        for size in self.batch_sizes:
            rows = [Row(fake, 0, -1, 0.0)]
            self._current = None
            fn, args = self.compiled(sampler, self._arguments(rows, size), key + (size,))
            jax.block_until_ready(fn(*args))  # runs once too: the first run of a program pays its set-up
        return time.perf_counter() - t0

    _current: list[Row] | None = None

    def _run(self, rows: list[Row]) -> None:
        import jax

        from t2i_jax import inpaint, pipeline

        req = rows[0].work.req
        t0 = time.perf_counter()
        try:
            key = self._key(req)
            sampler = self.model(req.model).sampler
            size = self.padded_size(len(rows))
            kw = self._arguments(rows, size)
            fn, args = self.compiled(sampler, kw, key + (size,))
            for w in {id(r.work): r.work for r in rows}.values():
                w.task.device_batches.append((len(rows), size))
                w.task.total = args[7].num_evals  # the scheduler state: Heun and PNDM evaluate more than steps
            self._current = rows
            out = np.asarray(jax.device_get(fn(*args)))
            self._current = None
            if req.mask is not None:
                out = inpaint.composite(out, kw["init_images"], kw["mask_images"])
            images = pipeline.to_uint8(out[:len(rows)])
        except Exception as e:
            self._current = None
            log.exception("batch of %d failed", len(rows))
            with self._cv:
                for w in {id(r.work): r.work for r in rows}.values():
                    self._finish(w, exc=e)
                self._running = None
            return
        dt = time.perf_counter() - t0
        self._batch_seconds.append(dt)
        with self._cv:
            self.stats["batches"] += 1
            self.stats["images"] += len(rows)
            self.stats["padded"] += size - len(rows)
            for r, im in zip(rows, images):
                w = r.work
                if w.future.done():
                    continue
                w.images[r.index] = im
                w.remaining -= 1
                w.task.done_rows += 1
                w.task.running_rows = max(0, w.task.running_rows - 1)
                if w.remaining == 0:
                    self._finish(w, result=(list(w.images), False))
            self._running = None
            self._cv.notify_all()

    # ---- Preview callbacks (XLA's host-callback thread, while the worker waits on the batch).

    def _on_step(self, i) -> None:
        rows = self._current
        if not rows:
            return
        for w in {id(r.work): r.work for r in rows}.values():
            w.task.step = int(i) + 1

    def _on_images(self, i, images) -> None:
        rows = self._current
        if not rows:
            return
        from t2i_jax import pipeline

        images = np.asarray(images)
        first: dict[int, int] = {}
        for b, r in enumerate(rows):
            first.setdefault(id(r.work), b)
        for r in rows:
            b = first.get(id(r.work))
            if b is not None and b < len(images):
                r.work.task.preview = pipeline.to_uint8(images[b])
                r.work.task.preview_no += 1
                first.pop(id(r.work))
