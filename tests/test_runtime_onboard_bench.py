"""The onboard overhead benchmark's own loop: every frame's five requests go out (a benchmark
that stalls measures its own timeouts, not the agent)."""

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_onboard.py"


def test_every_frame_sends_all_five_requests(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))  # the benchmark imports its JSON helper
    spec = importlib.util.spec_from_file_location("runtime_onboard", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    frames = 3
    result = module.measure_onboard_overhead(frames)
    warmup = min(5, frames)
    assert result["requests_sent"] == 5 * (frames + warmup)
