"""The runtime benchmark's scheduling comparison runs and shows what it claims (slow: seconds of load)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_runtime.py"


@pytest.mark.slow
def test_deadline_aware_goodput_beats_fifo_under_overload(monkeypatch):
    # Importable by name: the load generator runs in a spawned process that re-imports it.
    monkeypatch.syspath_prepend(str(BENCH_PATH.parent))
    bench = importlib.import_module("bench_runtime")
    result = bench.deadline_goodput(duration_s=1.5, runtime_ms=10.0, overload=2.0, vehicles=4,
                                    budgets_ms=[50.0, 100.0, 200.0], queue_limit=256, max_batch_size=1,
                                    downlink_allowance_ms=0.0)
    assert result["edf"]["requests"] > 200 and result["fifo"]["requests"] > 200
    assert result["edf"]["statuses"].get("expired", 0) > 0
    assert "expired" not in result["fifo"]["statuses"]
    assert result["edf"]["goodput_rps"] > 1.5 * result["fifo"]["goodput_rps"]
