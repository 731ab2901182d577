"""The Starlette app: AUTOMATIC1111's `/sdapi/v1/...` routes, the page at `/`, and its progress stream.

Handlers run on the event loop and never call JAX: generation, model loading and compiling happen
in the batcher's one worker thread (`batcher.Batcher`), and a handler awaits its request's future.
Every error is JSON naming the field, the value and the limit (`a1111.ApiError`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import random
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from t2i_jax.sample import STYLES
from t2i_jax.serve import a1111
from t2i_jax.serve.a1111 import ApiError, Limits
from t2i_jax.serve.batcher import Batcher, Cancelled, Draining, QueueFull

log = logging.getLogger("t2i_jax.serve")
STATIC = Path(__file__).resolve().parent / "static"
# The page and its assets hold no data and no secret: served without the API key, so a browser can
# load the page and then send the key (typed into it) with every API call.
PUBLIC = ("/", "/static/", "/favicon.ico")
# While draining, these still answer (an accepted request's client may follow its progress).
DRAIN_OPEN = ("/sdapi/v1/progress", "/t2i/events")


@dataclasses.dataclass
class Service:
    """What the routes share: the batcher, the limits, the default model, the API key."""

    batcher: Batcher
    limits: Limits = dataclasses.field(default_factory=Limits)
    default_model: str = ""
    api_key: str | None = None
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    started: float = dataclasses.field(default_factory=time.time)
    default_steps: int = 20  # the page's

    @property
    def model_names(self) -> list[str]:
        """The configured models' names, in --model order."""
        return list(self.batcher.models)


class Guard:
    """ASGI middleware: the bearer key on every API route, and 503 for new requests while draining."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        err = None
        if self.service.batcher.draining and not path.startswith(DRAIN_OPEN):
            err = ApiError(503, "the server is shutting down; requests already accepted finish, retry elsewhere "
                           "or later", headers={"Retry-After": "30"})
        elif self.service.api_key and not (path == "/" or path.startswith(PUBLIC[1:])):
            headers = dict(scope["headers"])
            got = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.service.api_key}".encode()):
                err = ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' "
                               "(the server's --api-key)", headers={"WWW-Authenticate": "Bearer"})
        if err is not None:
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: Request, limit: int):
    """The JSON body, at most `limit` bytes (413 past it), {} when empty; 400 when not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes "
                       "(the server's --max-body-mb)", field="body", value=int(length), limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes (the server's --max-body-mb)",
                           field="body", value=size, limit=limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None


def create_app(service: Service) -> Starlette:
    """The ASGI app over `service`."""
    batcher = service.batcher

    async def model_info(name: str):
        """The named model, loaded (in the worker thread) if it was not yet."""
        m = batcher.models[name]
        if m.sampler is None:
            await asyncio.wrap_future(batcher.call(lambda: batcher.model(name)))
        return m

    def fits_for(m):
        tok = m.sampler.pipe.tokenizer

        def fits(text: str) -> bool:
            ids = tok.hf(tok.expand(text), padding=False, truncation=False, verbose=False)["input_ids"]
            return len(ids) <= tok.max_length
        return fits

    async def generate(request: Request, img2img: bool):
        body = await read_json(request, service.limits.max_body_bytes)
        name = service.default_model
        if isinstance(body, dict) and isinstance(body.get("override_settings"), dict):
            wanted = body["override_settings"].get("sd_model_checkpoint")
            if isinstance(wanted, str) and wanted in batcher.models:
                name = wanted
        m = await model_info(name)
        req = a1111.parse(body, img2img=img2img, limits=service.limits, models=service.model_names,
                          default_model=name, native=m.native, size_multiple=m.vae_scale, fits=fits_for(m),
                          rng=service.rng)
        try:
            work = batcher.submit(req)
        except QueueFull as e:
            raise ApiError(429, str(e), field="queue", value=batcher.queue_length(), limit=e.limit,
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Draining:
            raise ApiError(503, "the server is shutting down; retry elsewhere or later",
                           headers={"Retry-After": "30"}) from None
        done = asyncio.wrap_future(work.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                batcher.cancel(work)  # the client went away: its queued rows are dropped
                done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
            gone.cancel()
        try:
            images, interrupted = done.result()
        except Cancelled as e:
            raise ApiError(503, f"request {req.task_id} was not run: {e}", headers={"Retry-After": "30"}) from None
        except ApiError:
            raise
        except ValueError as e:  # what the pipeline refuses (e.g. a size the model cannot make)
            raise ApiError(400, str(e)) from None
        # device_batches: (requests' rows, padded size) of each device batch that made its images.
        out = await asyncio.to_thread(a1111.response, req, images, interrupted=interrupted,
                                      job_timestamp=work.task.job_timestamp,
                                      extra={"device_batches": work.task.device_batches})
        return JSONResponse(out)

    async def txt2img(request):
        return await generate(request, img2img=False)

    async def img2img(request):
        return await generate(request, img2img=True)

    async def samplers(request):
        return JSONResponse(a1111.samplers_list())

    async def sd_models(request):
        return JSONResponse([{"title": m.name, "model_name": m.name, "hash": None, "sha256": None,
                              "filename": m.source, "config": None} for m in batcher.models.values()])

    async def prompt_styles(request):
        return JSONResponse([{"name": k, "prompt": p, "negative_prompt": n} for k, (p, n) in STYLES.items()])

    async def get_options(request):
        return JSONResponse({"sd_model_checkpoint": service.default_model, "samples_format": "png",
                             "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1})

    async def set_options(request):
        body = await read_json(request, service.limits.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(422, "the options body must be a JSON object, e.g. {\"sd_model_checkpoint\": \"NAME\"}")
        if "sd_model_checkpoint" in body:
            name = body["sd_model_checkpoint"]
            if name not in batcher.models:
                raise ApiError(400, f"sd_model_checkpoint {name!r} is not a configured model; use one of: "
                               f"{', '.join(service.model_names)} (start the server with --model NAME=PATH to add "
                               "one)", field="sd_model_checkpoint", value=name, limit=service.model_names)
            service.default_model = name
        return JSONResponse(None)

    async def progress(request):
        skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true", "yes")
        task_id = request.query_params.get("id_task")
        return JSONResponse(progress_body(batcher, batcher.task(task_id), skip_image=skip,
                                          unknown=task_id is not None and batcher.task(task_id) is None))

    async def interrupt(request):
        body = await read_json(request, service.limits.max_body_bytes)
        task_id = request.query_params.get("id_task") or (body.get("id_task") if isinstance(body, dict) else None)
        return JSONResponse({"interrupted": batcher.interrupt(task_id)})

    async def events(request):
        task_id = request.query_params.get("id_task")
        if not task_id:
            raise ApiError(400, "GET /t2i/events needs ?id_task=ID (the force_task_id of your txt2img request)",
                           field="id_task")
        return StreamingResponse(_event_stream(batcher, task_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def page_info(request):
        m = batcher.models[service.default_model]
        return JSONResponse({"model": service.default_model, "native": m.native, "vae_scale": m.vae_scale,
                             "limits": dataclasses.asdict(service.limits), "samplers": list(a1111.SAMPLERS),
                             "default_sampler": a1111.DEFAULT_SAMPLER, "styles": sorted(STYLES),
                             "batch_sizes": batcher.batch_sizes, "steps": service.default_steps})

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def api_error(request, exc: ApiError):
        return _error_response(exc)

    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": "NotFound" if exc.status_code == 404 else "Error",
                             "detail": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=500)

    routes = [
        Route("/", index),
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
        Route("/sdapi/v1/samplers", samplers),
        Route("/sdapi/v1/sd-models", sd_models),
        Route("/sdapi/v1/prompt-styles", prompt_styles),
        Route("/sdapi/v1/options", get_options, methods=["GET"]),
        Route("/sdapi/v1/options", set_options, methods=["POST"]),
        Route("/sdapi/v1/progress", progress),
        Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
        Route("/t2i/events", events),
        Route("/t2i/info", page_info),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: server_error})
    app.add_middleware(Guard, service=service)
    app.state.service = service
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its connection closed before the answer)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def progress_body(batcher: Batcher, task, *, skip_image: bool = False, unknown: bool = False) -> dict:
    """A1111's /progress answer for `task` (None: idle)."""
    now = time.time()
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": batcher.queue_length(), "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0,
             "sampling_step": 0, "sampling_steps": 0}
    if task is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": "unknown task" if unknown else None, "id_task": None,
                "status": "unknown" if unknown else "idle", "preview_no": 0}
    p = task.progress()
    if task.started and p > 0 and task.state == "running":
        elapsed = now - task.started
        eta = max(0.0, elapsed / p - elapsed)
    elif task.state == "queued":
        eta = float(batcher.retry_after())
    else:
        eta = 0.0
    state.update(interrupted=task.state == "interrupted", job=task.id, job_timestamp=task.job_timestamp,
                 sampling_step=task.step, sampling_steps=task.total)
    text = {"queued": "queued", "running": f"sampling: step {task.step}/{task.total}", "done": "done",
            "interrupted": "interrupted", "cancelled": "cancelled", "failed": "failed"}[task.state]
    image = None
    if task.preview is not None and not skip_image:
        image = a1111.png_base64(task.preview)
    return {"progress": p, "eta_relative": eta, "state": state, "current_image": image, "textinfo": text,
            "id_task": task.id, "status": task.state, "preview_no": task.preview_no}


async def _event_stream(batcher: Batcher, task_id: str):
    """Server-sent events for one task: one `progress` event per change (with the preview image when a new
    one came), then `end`. Waits up to 60 s for a task that is not queued yet (the page opens the stream
    before it posts its request)."""
    last, sent_preview, waited = None, 0, 0.0
    while True:
        task = batcher.tasks.get(task_id)
        if task is None:
            if waited > 60:
                yield "event: end\ndata: {\"status\": \"unknown\"}\n\n"
                return
            await asyncio.sleep(0.05)
            waited += 0.05
            continue
        now = (task.state, task.step, task.preview_no)
        if now != last:
            body = progress_body(batcher, task, skip_image=task.preview_no == sent_preview)
            sent_preview = task.preview_no
            last = now
            yield f"event: progress\ndata: {json.dumps(body)}\n\n"
        if task.state not in ("queued", "running"):
            yield f"event: end\ndata: {json.dumps({'status': task.state})}\n\n"
            return
        await asyncio.sleep(0.03)
