"""How well a car could know its next frame interval's uplink capacity, by how late it learns it.

A car that plans a frame knows its uplink only as of some time ago: a reply tells where an upload
ended an RTT plus the cloud's runtime after it ended (the agent's measurement,
onboard/measurement.py). This script asks, of each measured trace alone: if a planner knew the
true capacity of the 100 ms interval that ended `lag` ms before it plans, how far could the next
100 ms be from it? Per trace and lag it gives the 10th and 90th percentiles of next / known
capacity over the whole trace (every 50 ms), and their ratio (the spread: how wide a calibrated
80% forecast must be). Lag 0 is the bench_policies causal reference (`oracle-past`, which knows the
last interval exactly); a car learning from its replies plans at a lag of about RTT + runtime.
Intervals where either capacity is near zero (an outage) are counted apart.

    python benchmarks/trace_predictability.py [--traces DIR] [--lags-ms 0 50 100 150 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from benchjson import SHARED_TRACES, trace_paths, write_report

from avcloud.errors import DataError
from avcloud.link import DeliverySchedule
from avcloud.replay.inputs import open_trace

INTERVAL_MS = 100.0  # the default scene's frame interval (10 Hz cameras)
STEP_MS = 50.0
OUTAGE_MBPS = 0.05


def predictability(schedule: DeliverySchedule, lags_ms: list[float], interval_ms: float = INTERVAL_MS,
                   step_ms: float = STEP_MS) -> dict:
    """next / known capacity percentiles at each lag, over one period of the schedule."""
    first_ms = max(lags_ms) + interval_ms
    plan_times_ms = np.arange(first_ms, max(first_ms + step_ms, schedule.period_ms - interval_ms), step_ms)
    next_mbps = np.array([schedule.capacity_mbps(t, t + interval_ms) for t in plan_times_ms])
    rows = {}
    for lag_ms in lags_ms:
        known_mbps = np.array([schedule.capacity_mbps(t - lag_ms - interval_ms, t - lag_ms) for t in plan_times_ms])
        usable = (next_mbps > OUTAGE_MBPS) & (known_mbps > OUTAGE_MBPS)
        ratios = next_mbps[usable] / known_mbps[usable]
        row: dict = {"intervals": int(usable.sum()), "outage_intervals": int((~usable).sum())}
        if ratios.size:  # a trace that is all outage has no ratio to give (JSON null, not NaN)
            p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
            row.update(next_over_known_p10=round(float(p10), 3), next_over_known_p50=round(float(p50), 3),
                       next_over_known_p90=round(float(p90), 3), spread_p90_over_p10=round(float(p90 / p10), 3))
        else:
            row.update(next_over_known_p10=None, next_over_known_p50=None, next_over_known_p90=None,
                       spread_p90_over_p10=None)
        rows[f"{lag_ms:g}"] = row
    return {"mean_mbps": round(float(next_mbps.mean()), 3), "by_lag_ms": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=SHARED_TRACES, help="folder of Mahimahi .up / .down traces")
    parser.add_argument("--lags-ms", type=float, nargs="+", default=[0.0, 50.0, 100.0, 150.0, 200.0])
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    args = parser.parse_args()
    if any(not (math.isfinite(lag) and lag >= 0) for lag in args.lags_ms):
        parser.error("--lags-ms must be finite numbers >= 0")
    paths = trace_paths(args.traces)
    if not paths:
        print(f"trace_predictability: no .up or .down traces in {args.traces}; skipped", file=sys.stderr)
        write_report({"benchmark": "trace_predictability", "skipped": f"no traces in {args.traces}"}, args.out)
        return 0
    traces = {}
    for path in paths:
        try:
            schedule = open_trace(path).schedule
        except DataError as error:
            print(f"trace_predictability: {error}", file=sys.stderr)
            return 2
        traces[path.name] = predictability(schedule, args.lags_ms)
    write_report({"benchmark": "trace_predictability", "interval_ms": INTERVAL_MS, "step_ms": STEP_MS,
                  "lags_ms": args.lags_ms, "traces": traces}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
