"""A verifier worker that dies or hangs is replaced; its in-flight item gets a ``timeout`` verdict; the
batch -- and the verify stage -- completes with one verdict per sample."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from drsft import verify as V

ROOT = Path(__file__).resolve().parents[2]


def _run_pool_with(action, n_items=300, timeout_s=0.5):
    """Run a 2-worker pool on slow-ish items while ``action(pid)`` hits one busy worker."""
    items = [(i, rf"\frac{{{3 * i + 1}}}{{7}}", rf"\frac{{{i}}}{{{7 + i % 5}}}") for i in range(n_items)]
    pool = V._Pool(2, timeout_s)
    hit = []

    def saboteur():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for w in list(pool.workers):
                if w.ready and len(w.pending) > 3:
                    action(w.proc.pid)
                    hit.append(w.proc.pid)
                    return
            time.sleep(0.001)

    th = threading.Thread(target=saboteur)
    th.start()
    try:
        t0 = time.perf_counter()
        out = pool.run(items)
        dt = time.perf_counter() - t0
    finally:
        th.join()
        pool.close()
    return items, out, pool, hit, dt


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_hung_or_dead_worker_is_replaced_and_batch_completes(sig):
    items, out, pool, hit, dt = _run_pool_with(lambda pid: os.kill(pid, sig))
    assert hit, "the saboteur never found a busy worker"
    assert sorted(out) == [i for i, _, _ in items]
    timeouts = [i for i, r in out.items() if r == "timeout"]
    assert 1 <= len(timeouts) <= 2
    assert pool.replaced >= 1
    assert all(r in ("ok", "wrong") for i, r in out.items() if i not in timeouts)
    if sig == signal.SIGKILL:  # dead: noticed at once, not after the bound
        assert dt < 60


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_verify_stage_completes_when_a_worker_dies_or_hangs(tmp_path, monkeypatch, sig, run_verify_stage):
    """The verify stage, in-process: right after the first chunk is handed to a worker, that worker is
    killed (dies) or stopped (hangs). The stage exits 0 with a verdict for every sample; exactly one is
    ``timeout`` (the item the worker was on), the others are the verifier's own verdicts."""
    n = 120
    problems = [{"id": f"p{k}", "problem": "?", "solution": "", "answer": rf"\frac{{{k}}}{{{7 + k % 5}}}",
                 "source": "t"} for k in range(n)]
    samples = [{"problem_id": f"p{k}", "sample_index": 0, "prompt": "P",
                "response": rf"\boxed{{\frac{{{2 * k}}}{{{2 * (7 + k % 5)}}}}}", "response_ids": [1], "logprobs": [-1.0],
                "finish_reason": "stop"} for k in range(n)]
    hit = []
    real_send = V._Worker.send

    def send_then_sabotage(self, chunk):
        real_send(self, chunk)
        if not hit:
            hit.append(self.proc.pid)
            os.kill(self.proc.pid, sig)

    monkeypatch.setattr(V._Worker, "send", send_then_sabotage)
    t0 = time.perf_counter()
    result = run_verify_stage(tmp_path, problems, samples)
    assert result.exit_code == 0, (result.output, result.exception)
    assert hit
    assert time.perf_counter() - t0 < 60
    verdicts = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [v["problem_id"] for v in verdicts] == [f"p{k}" for k in range(n)]
    reasons = [v["reason"] for v in verdicts]
    assert reasons.count("timeout") == 1, reasons
    assert all(r == "ok" for r in reasons if r != "timeout")
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert m["reasons"]["timeout"] == 1 and m["samples"] == n
