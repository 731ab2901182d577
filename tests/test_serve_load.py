"""The server as a process under load (slow: each test starts server processes, which load and compile
the model): a real SIGTERM in the middle of a load, and the 32-client x 2-request run against batching
and one-at-a-time servers (`python -m t2i_jax.serve.load` is the same run as a script, its figures in
BENCHMARKS.md). The fast suite drains an in-process server the same way (tests/test_serve.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

STEPS = 4


@pytest.mark.slow
def test_sigterm_to_a_server_process_during_load():
    from t2i_jax.serve.load import sigterm_during_load

    out = sigterm_during_load(8, 2, STEPS, ["--gather-ms", "50", "--drain-timeout", "120"])
    ends = out["ends"]
    assert out["requests"] == 16 and out["exit_code"] == 0, out
    assert set(ends) <= {"200", "503", "refused"}, out  # nothing hung, nothing dropped mid-answer
    assert ends.get("200", 0) >= 8, out  # every client's first request was accepted before the drain
    assert ends.get("503", 0) + ends.get("refused", 0) >= 1, out
    assert out["ok_and_own"], out  # each answer carries its own request's seed and task id
    assert all("shutting down" in d or "not run" in d for d in out["503_details"]), out


@pytest.mark.slow
def test_load_32_clients_x_2_batched_against_one_at_a_time():
    from t2i_jax.serve.load import compare

    out = compare(32, 2, STEPS, rounds=1)  # one round each: 64 requests per server
    for name in ("batched", "one_at_a_time"):
        s = out[name]
        assert s["requests"] == 64 and s["ok"] == 64 and s["unique_tasks"] == 64, out
    assert out["batched"]["mean_device_batch"] > 2, out
    # On the 2-core CPU the device is no cheaper per image at batch 8 than at 1 (BENCHMARKS.md: 1.07x for
    # the loop alone), so batching cannot win here; it must not cost much either (under the shared
    # machine's load the ratio of one round swings between about 0.6 and 1).
    assert out["ratio"] > 0.5, out
