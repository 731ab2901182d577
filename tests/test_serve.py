"""`python -m t2i_jax.serve` over real HTTP on loopback: the A1111 routes, their field names and types,
bad inputs (4xx naming the field, and the server still serving), equality with the CLI alone and
batched with 7 other requests, previews and progress, cancel on disconnect, interrupt, 429, the API
key, and the page in headless Chromium (Debian's, driven by Playwright).

One server for the module: the bundled model (32 px native) on one device, 4 steps of "Euler a",
compiled at batch sizes 1 and 8 at start-up.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

STEPS = 4
PROMPT = "a red circle"
CHROMIUM = "/usr/bin/chromium"


def _start(app):
    """A uvicorn server for `app` on a free loopback port, in a thread; (base URL, server, thread)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def served():
    from t2i_jax.sample import BUNDLED_MODEL
    from t2i_jax.serve.__main__ import build_service, parse_args
    from t2i_jax.serve.app import create_app

    args = parse_args(["--model", f"shapes={BUNDLED_MODEL}", "--model", f"shapes-b={BUNDLED_MODEL}",
                       "--devices", "1", "--batch-sizes", "1,8", "--warm-steps", str(STEPS),
                       "--preview-every", "2", "--gather-ms", "300", "--max-body-mb", "1", "--max-queue", "16"])
    service = build_service(args)
    url, server, thread = _start(create_app(service))
    client = httpx.Client(base_url=url, timeout=120)
    yield service, client, url
    client.close()
    server.should_exit = True
    thread.join(timeout=30)
    service.batcher.close()


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _txt2img(client, **body):
    body = {"prompt": PROMPT, "steps": STEPS, "sampler_name": "Euler a", "cfg_scale": 7, **body}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------
# Routes and fields
# --------------------------------------------------------------------------


def test_info_routes(served):
    _, client, _ = served
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert names[:2] == ["Euler a", "Euler"] and "DPM++ 2M Karras" in names and "DDIM" in names
    assert all(isinstance(s["aliases"], list) and isinstance(s["options"], dict) for s in samplers)
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["shapes", "shapes-b"]
    assert set(models[0]) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"
    styles = client.get("/sdapi/v1/prompt-styles").json()
    assert {"name", "prompt", "negative_prompt"} <= set(styles[0]) and "anime" in [s["name"] for s in styles]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "EventSource" not in client.get("/static/app.js").text  # fetch-read SSE: the key travels as a header
    info = client.get("/t2i/info").json()
    assert info["native"] == 32 and info["vae_scale"] == 2 and info["steps"] == STEPS


def test_options_switch_among_configured(served):
    _, client, _ = served
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-b"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-b"
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"})
    assert r.status_code == 400 and r.json()["field"] == "sd_model_checkpoint" and "shapes-b" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"


def test_txt2img_fields(served):
    _, client, _ = served
    out = _txt2img(client, seed=11, batch_size=2, n_iter=2, restore_faces=True, some_unknown_field=[1, 2])
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and all(_png(b).shape == (32, 32, 3) for b in out["images"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["not_honoured"] == ["restore_faces"]  # the unknown field is ignored, as A1111 does
    assert info["sampler_name"] == "Euler a" and info["steps"] == STEPS and info["width"] == 32
    assert out["parameters"]["batch_size"] == 2 and out["parameters"]["n_iter"] == 2
    assert info["infotexts"][1].startswith(PROMPT) and "Seed: 12" in info["infotexts"][1]
    # -1 draws a seed, reported; the same seed again gives the same image.
    rnd = json.loads(_txt2img(client, seed=-1)["info"])
    assert 0 <= rnd["seed"] < 2**32 and rnd["seed"] != -1
    again = _txt2img(client, seed=13)
    assert np.array_equal(_png(again["images"][0]), _png(out["images"][2]))


def test_same_image_as_the_cli_alone_and_batched_with_7_others(served, tmp_path):
    from PIL import Image

    from t2i_jax import sample

    _, client, _ = served
    assert sample.main(["--prompt", PROMPT, "--seed", "5", "--steps", str(STEPS), "--scheduler", "euler_a",
                        "--guidance-scale", "7", "--out", str(tmp_path), "--no-compilation-cache"]) == 0
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    cli = np.asarray(Image.open(tmp_path / manifest[0]["file"]).convert("RGB"))

    alone = _txt2img(client, seed=5)
    assert json.loads(alone["info"])["device_batches"] == [[1, 1]]
    bodies = [{"seed": 5}] + [{"seed": 100 + k, "prompt": f"a blue square {k}"} for k in range(7)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda b: _txt2img(client, **b), bodies))
    batched = outs[0]
    assert json.loads(batched["info"])["device_batches"] == [[8, 8]], "the 8 requests did not share one batch"
    for out in (alone, batched):
        diff = np.abs(_png(out["images"][0]).astype(int) - cli.astype(int)).max()
        assert diff <= 1, f"server image differs from the CLI's by {diff}/255"
    # Each of the others is its own image (the batch split back in request order).
    assert len({_png(o["images"][0]).tobytes() for o in outs}) == 8


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


BAD = [
    ({"steps": 500}, 400, "steps", 150),
    ({"steps": "20"}, 422, "steps", None),
    ({"steps": 0}, 400, "steps", 1),
    ({"width": 33}, 400, "width", 2),
    ({"height": 4096}, 400, "height", 1024),
    ({"batch_size": 17}, 400, "batch_size", 16),
    ({"batch_size": 8, "n_iter": 3}, 400, "batch_size", 16),
    ({"cfg_scale": "high"}, 422, "cfg_scale", None),
    ({"cfg_scale": 0.5}, 400, "cfg_scale", 1),
    ({"sampler_name": "DPM2"}, 400, "sampler_name", None),
    ({"styles": ["no-such-style"]}, 400, "styles", None),
    ({"seed": 2**40}, 400, "seed", None),
    ({"prompt": 7}, 422, "prompt", None),
    ({"override_settings": {"sd_model_checkpoint": "../../model.ckpt"}}, 400,
     "override_settings.sd_model_checkpoint", None),
    ({"scheduler": "Exponential"}, 400, "scheduler", None),
]


def test_bad_inputs_are_4xx_naming_the_field(served):
    _, client, _ = served
    for body, status, field, limit in BAD:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, **body})
        assert r.status_code == status, (body, r.text)
        err = r.json()
        assert err["field"] == field and field.split(".")[0] in err["detail"], (body, err)
        if limit is not None:
            assert err["limit"] == limit, (body, err)
    unknown = client.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM2"}).json()
    assert "DPM2" in unknown["detail"] and "Euler a" in unknown["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=[1, 2]).status_code == 422
    big = client.post("/sdapi/v1/txt2img", content=b" " * (2 << 20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["limit"] == 1 << 20
    for images, why in ((["!!!not base64!!!"], "base64"), ([base64.b64encode(b"hello world").decode()], "image"),
                        (["/etc/passwd"], "base64"), ("x", "list")):
        r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": images})
        assert r.status_code in (400, 422) and why in r.json()["detail"], r.text
    nf = client.get("/sdapi/v1/nothing")
    assert nf.status_code == 404 and "nothing" in nf.json()["detail"]
    # Still serving.
    assert len(_txt2img(client, seed=1)["images"]) == 1


def test_queue_full_is_429_with_retry_after(served):
    service, client, _ = served
    old = service.batcher.max_queue
    service.batcher.max_queue = 0
    try:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": STEPS})
    finally:
        service.batcher.max_queue = old
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["field"] == "queue"


# --------------------------------------------------------------------------
# img2img, progress, previews, cancel, interrupt
# --------------------------------------------------------------------------


def _b64_png(rgb) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_follows_its_init_image(served):
    _, client, _ = served
    outs = []
    for rgb, prefix in (((250, 250, 250), ""), ((0, 0, 200), "data:image/png;base64,")):
        r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": STEPS, "seed": 3,
                                                   "sampler_name": "Euler a", "denoising_strength": 0.5,
                                                   "init_images": [prefix + _b64_png(rgb)]})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
        outs.append(_png(r.json()["images"][0]).astype(float))
    white, blue = outs
    # Half the noise (the model still draws its red circle): the white start stays brighter.
    assert white.mean() > blue.mean() + 15


@pytest.mark.slow
def test_img2img_mask_repaints_only_the_white_part(served):
    from PIL import Image

    _, client, _ = served
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # repaint the left half
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": STEPS, "seed": 4, "denoising_strength": 1.0,
                                               "init_images": [_b64_png((0, 0, 200))], "mask_blur": 0,
                                               "mask": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200, r.text
    out = _png(r.json()["images"][0]).astype(int)
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"]
    assert np.array_equal(out[:, 16:], np.broadcast_to([0, 0, 200], (32, 16, 3)))  # kept exactly (A1111's overlay)
    assert np.abs(out[:, :16] - [0, 0, 200]).mean() > 20  # repainted


def test_progress_has_the_tasks_preview(served):
    _, client, _ = served
    out = _txt2img(client, seed=2, force_task_id="mytask-1")
    assert json.loads(out["info"])["task_id"] == "mytask-1"
    p = client.get("/sdapi/v1/progress", params={"id_task": "mytask-1"}).json()
    assert p["progress"] == 1.0 and p["textinfo"] == "done" and p["eta_relative"] == 0.0
    assert p["state"]["sampling_steps"] == STEPS and p["state"]["sampling_step"] == STEPS
    assert p["state"]["job"] == "mytask-1" and p["preview_no"] == 1  # every 2 evaluations, not the last
    assert _png(p["current_image"]).shape == (32, 32, 3)
    assert client.get("/sdapi/v1/progress", params={"id_task": "mytask-1", "skip_current_image": "true"}
                      ).json()["current_image"] is None
    idle = client.get("/sdapi/v1/progress", params={"id_task": "nobody"}).json()
    assert idle["progress"] == 0.0 and idle["current_image"] is None and idle["textinfo"] == "unknown task"
    # The page's stream: progress events, the preview once, then the end.
    with client.stream("GET", "/t2i/events", params={"id_task": "mytask-1"}) as r:
        text = "".join(r.iter_text())
    assert "event: progress" in text and text.rstrip().endswith('data: {"status": "done"}')


def _hold_worker(service, seconds: float) -> None:
    """Keeps the device thread busy, so requests sent meanwhile wait in the queue."""
    service.batcher.call(lambda: time.sleep(seconds))


def test_disconnect_cancels_queued_work(served, tmp_path):
    service, client, url = served
    before = service.batcher.stats["images"]
    _hold_worker(service, 3.0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": STEPS, "force_task_id": "gone-1"},
                   timeout=1.0)
    deadline = time.monotonic() + 30
    while client.get("/sdapi/v1/progress", params={"id_task": "gone-1"}).json()["status"] != "cancelled":
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.1)
    assert service.batcher.wait_idle(60)
    assert service.batcher.stats["images"] == before  # its image was never made


def test_compatible_requests_share_a_batch_and_groups_queue_first_come_first_served(served):
    service, client, url = served
    _hold_worker(service, 1.5)
    bodies = [("fair-a", 7), ("fair-b", 5), ("fair-c", 7)]  # b guides differently: another group
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = []
        for task, cfg in bodies:
            futs.append(pool.submit(lambda t=task, g=cfg: httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120, json={
                "prompt": PROMPT, "steps": STEPS, "cfg_scale": g, "seed": 9, "force_task_id": t})))
            time.sleep(0.3)  # submitted in this order, all while the worker is busy
        infos = [json.loads(f.result(timeout=120).json()["info"]) for f in futs]
    batches = {i["task_id"]: i["device_batches"] for i in infos}
    assert batches == {"fair-a": [[2, 8]], "fair-b": [[1, 1]], "fair-c": [[2, 8]]}, batches
    started = {t: service.batcher.tasks[t].started for t, _ in bodies}
    assert max(started["fair-a"], started["fair-c"]) < started["fair-b"]  # the oldest request's group first
    a, c = (_png(f.result().json()["images"][0]) for f in (futs[0], futs[2]))
    assert np.array_equal(a, c)  # same prompt, seed and settings in one batch: the same image


def test_interrupt_ends_queued_requests(served):
    service, client, url = served
    _hold_worker(service, 2.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: httpx.post(f"{url}/sdapi/v1/txt2img", timeout=60, json={
            "prompt": PROMPT, "steps": STEPS, "force_task_id": "stop-me"}))
        deadline = time.monotonic() + 30
        while client.get("/sdapi/v1/progress", params={"id_task": "stop-me"}).json()["status"] != "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/sdapi/v1/interrupt", json={"id_task": "stop-me"}).json() == {"interrupted": 1}
        r = fut.result(timeout=60)
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]


# --------------------------------------------------------------------------
# API key, help
# --------------------------------------------------------------------------


def test_api_key_guards_every_api_route(served):
    import dataclasses

    from t2i_jax.serve.app import create_app

    service, _, _ = served
    url, server, thread = _start(create_app(dataclasses.replace(service, api_key="s3cret")))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for method, path in (("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/progress"),
                                 ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/interrupt"),
                                 ("GET", "/t2i/info")):
                r = c.request(method, path, json={})
                assert r.status_code == 401 and "Bearer" in r.json()["detail"], path
                wrong = c.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401, path
            ok = c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()[0]["name"] == "Euler a"
            assert c.get("/").status_code == 200  # the page itself asks for the key
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_help_exits_0(capsys):
    from t2i_jax.serve.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--api-key" in out and "127.0.0.1" in out and "7860" in out


def test_bad_flags_exit_2_before_loading(capsys):
    from t2i_jax.serve.__main__ import main

    for argv, words in ((["--max-steps", "0"], "--max-steps 0"), (["--warm-sampler", "DPM2"], "DPM2"),
                        (["--model", "a=x", "--model", "a=y"], "taken"), (["--batch-sizes", "1,x"], "integers")):
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv


# --------------------------------------------------------------------------
# The page in a browser
# --------------------------------------------------------------------------


def _artifacts() -> Path:
    d = Path(os.environ.get("T2I_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_page_generates_with_previews_in_chromium(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    _, _, url = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            assert page.input_value("#steps") == str(STEPS) and page.input_value("#width") == "32"
            page.fill("#prompt", "a green triangle")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_selector("body[data-done='1']", timeout=120_000)
            previews = int(page.get_attribute("body", "data-previews") or 0)
            assert previews >= 1, "no preview reached the page"
            assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
            results = page.query_selector_all("#gallery img.result")
            assert len(results) == 1
            size = page.evaluate("() => { const i = document.querySelector('#gallery img.result');"
                                 " return [i.naturalWidth, i.naturalHeight]; }")
            assert size == [32, 32]
            assert "Seed: 7" in page.inner_text("#gallery .card pre")
            assert page.get_attribute("#gallery .card a", "download") == "t2i-7.png"
            page.screenshot(path=str(_artifacts() / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert (_artifacts() / "serve_page.png").stat().st_size > 1000



@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_page_asks_for_the_api_key(served):
    import dataclasses

    from t2i_jax.serve.app import create_app

    sync_api = pytest.importorskip("playwright.sync_api")
    service, _, _ = served
    url, server, thread = _start(create_app(dataclasses.replace(service, api_key="k3y")))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                        "--disable-background-networking", "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#keyrow", state="visible", timeout=60_000)
                assert "API key" in page.inner_text("#error")
                page.fill("#api_key", "k3y")
                page.press("#api_key", "Tab")
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                assert page.eval_on_selector("#sampler_name", "s => s.options.length") == 11
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)

# --------------------------------------------------------------------------
# SIGTERM during load (last: it drains the module's batcher, then reopens it)
# --------------------------------------------------------------------------


def test_sigterm_during_load_finishes_accepted_and_refuses_new(served):
    """The drain that SIGTERM starts (the server's `handle_exit`, what uvicorn's signal handler calls;
    the same with a real signal to a server process: tests/test_serve_load.py, slow) under 8 clients x 2
    requests: accepted requests finish with their own images, later ones get a clear 503 or find the
    server gone, nothing hangs, and the server stops."""
    import signal

    from t2i_jax.serve.__main__ import make_server
    from t2i_jax.serve.load import run_load

    service, _, _ = served
    bound: list = []
    server = make_server(service, "127.0.0.1", 0, drain_timeout=120, log_level="warning", bound=bound)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not bound:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)

    def during(records):
        # Drain once every client's first request is accepted: the second ones are sent only after their
        # first is answered, so they always meet the drain (waiting for a first answer instead raced with
        # the second requests on a loaded machine).
        while not all(service.batcher.task(f"load-{c}-0") for c in range(8)):
            time.sleep(0.005)
        server.handle_exit(signal.SIGTERM, None)

    try:
        records = run_load(f"http://127.0.0.1:{bound[0]}", 8, 2, STEPS, timeout=120, during=during)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the server did not stop after draining"
    finally:
        service.batcher.draining = False  # reopen the module's batcher for any later test
    ends = [r["status"] for r in records]
    assert len(records) == 16 and set(ends) <= {200, 503, "refused"}, records
    assert ends.count(200) >= 8, records  # every client's first request was accepted before the drain
    assert ends.count(503) + ends.count("refused") >= 1, records
    assert all(r["ok"] for r in records if r["status"] == 200)  # each with its own seed and task id
    assert all("shutting down" in r["detail"] for r in records if r["status"] == 503)
