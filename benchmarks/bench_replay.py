"""Simulated replay speed: scene seconds replayed per wall-clock second, per policy.

Each policy is the shipped onboard agent (onboard.daemon.OnboardAgent) on a simulated clock
with the replay's fake I/O, on the default scene's cached profile (profiling first if it is not
cached yet; that time is reported separately and not counted in the speed). Target: >= 100x
real time per policy run for 5 cameras. The oracle is chosen in hindsight among one run per
capacity fraction: its figure is per run, and its total is reported beside it.

    python benchmarks/bench_replay.py [--quick] [--trace PATH] [--scene PATH] [--profile DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchjson import write_report

from avcloud.replay.inputs import make_case, open_profiled_scene, open_trace
from avcloud.replay.job import (
    DEFAULT_PRESET,
    DEFAULT_RTT_MS,
    DEFAULT_SLO_MS,
    best_oracle_run,
    default_scene_path,
    default_trace_path,
)
from avcloud.replay.metrics import summarise_policies
from avcloud.replay.simulator import simulate_policy
from optimizer.policies import POLICY_NAMES, get_policy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    parser.add_argument("--quick", action="store_true", help="one repetition per policy instead of five")
    parser.add_argument("--trace", type=Path, help="uplink trace (default: the bundled synthetic LTE-like uplink)")
    parser.add_argument("--scene", type=Path, help="scene (default: the bundled synthetic segment)")
    parser.add_argument("--profile", type=Path, help="an existing profile folder instead of the cached demo preset")
    args = parser.parse_args()
    repetitions = 1 if args.quick else 5

    started = time.perf_counter()
    scene = open_profiled_scene(args.scene or default_scene_path(), DEFAULT_PRESET, True, args.profile)
    load_s = time.perf_counter() - started
    trace = open_trace(args.trace or default_trace_path())
    case = make_case(scene, trace, DEFAULT_RTT_MS, DEFAULT_SLO_MS)
    scenario = case.scenario

    policies = {}
    runs = {}
    for name in POLICY_NAMES:
        walls, cpus = [], []
        for _ in range(repetitions):
            started = time.perf_counter()
            started_cpu = time.process_time()
            spec = get_policy(name)
            if spec.planner == "oracle":  # as the replay runs it: one simulation per capacity fraction
                runs[name] = best_oracle_run(case, name=name)
            else:
                runs[name] = simulate_policy(spec, scenario, case.schedule, case.detections_at)
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - started_cpu)
        wall_s = statistics.median(walls)
        cpu_s = statistics.median(cpus)
        agent_runs = len(get_policy(name).oracle_capacity_fractions) if get_policy(name).planner == "oracle" else 1
        policies[name] = {
            "simulate_wall_s_median": wall_s,
            "agent_runs": agent_runs,
            "scene_seconds_per_wall_second": scenario.duration_s * agent_runs / wall_s,
            "scene_seconds_per_wall_second_all_runs": scenario.duration_s / wall_s,
            # CPU time of this process: on a shared machine, wall time also counts other jobs' turns.
            "simulate_cpu_s_median": cpu_s,
            "scene_seconds_per_cpu_second": scenario.duration_s * agent_runs / cpu_s,
            "frames_per_wall_second": scenario.num_frames / wall_s,
            "mean_solve_us": float(runs[name].solve_us.mean()),
        }
    started = time.perf_counter()
    summarise_policies(runs, scenario, case.detections, case.ground_truths)
    metrics_s = time.perf_counter() - started

    result = {
        "benchmark": "replay",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor()},
        "scene": case.scene_name,
        "trace": case.trace_name,
        "frames": scenario.num_frames,
        "cameras": len(scenario.cameras),
        "cloud_configurations": len(scenario.config_names),
        "scene_duration_s": scenario.duration_s,
        "rtt_ms": DEFAULT_RTT_MS,
        "slo_ms": DEFAULT_SLO_MS,
        "repetitions": repetitions,
        "load_profile_and_index_s": load_s,
        "metrics_all_policies_s": metrics_s,
        "policies": policies,
        "slowest_scene_seconds_per_wall_second": min(p["scene_seconds_per_wall_second"] for p in policies.values()),
        "slowest_scene_seconds_per_cpu_second": min(p["scene_seconds_per_cpu_second"] for p in policies.values()),
        "load_average_1min": os.getloadavg()[0],
        "target_scene_seconds_per_wall_second": 100.0,
        "cloud_runtimes": case.cloud.name if case.cloud else None,
        "car_times": case.car.name if case.car else None,
    }
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
