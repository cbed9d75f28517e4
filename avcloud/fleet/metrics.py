"""A fleet run's figures: mAP per vehicle and its spread, fairness, and what the shared cell and
GPU pool did.

- mAP per vehicle: the replay's overall mAP (mean over cameras of per-camera mAP over every
  frame) of what that vehicle published, scored exactly as the replay scores (scoring.py).
- gain: a vehicle's mAP over its on-car model's mAP on the same frames, in points (x100).
- Jain's fairness index of x over n vehicles: (sum x)^2 / (n sum x^2), 1 when all are equal,
  1/n when one vehicle has everything; of per-vehicle mAP, of per-vehicle gain (clipped at 0:
  how the benefit of offloading is shared; mAP's index is dominated by the common on-car part)
  and of per-vehicle uplink throughput.
- GPU utilisation: worker time spent on batches over K workers x the horizon (the first capture
  to the end of the last vehicle's scene); with an unlimited pool, busy workers on average.
- cloud: requests sent, results back on time (published from the cloud), late ones (deadline
  miss = late / sent, as the replay), goodput = on-time results per second of the horizon.
- uplink utilisation: packets that left the uplink within the horizon over its opportunities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from avcloud.fleet.scoring import SceneScorer
from avcloud.fleet.simulation import FleetRun
from avcloud.link import BITS_PER_PACKET
from avcloud.replay.metrics import summarise_run


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index of non-negative values (None when all are 0 or there are none)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0 or not np.all(np.isfinite(array)):
        return None
    square_sum = float(np.sum(array * array))
    if square_sum <= 0:
        return None
    return float(np.sum(array) ** 2 / (array.size * square_sum))


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()), "p10": float(np.quantile(values, 0.1)), "median": float(np.median(values)),
        "p90": float(np.quantile(values, 0.9)), "max": float(values.max()), "mean": float(values.mean()),
    }


def summarise_fleet(run: FleetRun, scorers: Sequence[SceneScorer], onboard_maps: dict[tuple[int, int], float]) -> dict:
    """Every figure of one fleet run, JSON-ready. `onboard_maps[(scene, offset)]`: the on-car mAP of
    that scene from that offset (computed once per scene and offset)."""
    vehicles = []
    maps, gains, uplink_mbps = [], [], []
    sent = late = on_time = cells = 0
    horizon_s = run.horizon_ms / 1000.0
    for vehicle, (case, policy_run, delivered_bytes) in enumerate(
            zip(run.cases, run.runs, run.delivered_bytes_per_vehicle, strict=True)):
        scorer = scorers[case.scene]
        per_camera = scorer.map_per_camera(policy_run, case.scenario, case.ground_truths)
        summary = summarise_run(policy_run, case.scenario, per_camera)
        key = (case.scene, case.offset_frames)
        if key not in onboard_maps:
            onboard_maps[key] = scorer.onboard_map(case.scenario, case.ground_truths)
        gain_points = (summary["map"] - onboard_maps[key]) * 100.0
        mbps = delivered_bytes * 8 / horizon_s / 1e6 if horizon_s > 0 else 0.0
        maps.append(summary["map"])
        gains.append(gain_points)
        uplink_mbps.append(mbps)
        sent += summary["requests_sent"]
        late += summary["requests_late"]
        on_time += summary["requests_on_time"]
        cells += policy_run.outcome.size
        vehicles.append({
            "vehicle": f"car-{vehicle}", "scene": case.scene, "offset_frames": case.offset_frames,
            "start_ms": run.start_ms[vehicle], "map": summary["map"], "map_per_camera": per_camera,
            "onboard_map": onboard_maps[key], "gain_points": gain_points,
            "cloud_share": summary["cloud_share"], "requests_sent": summary["requests_sent"],
            "requests_on_time": summary["requests_on_time"], "deadline_miss_rate": summary["deadline_miss_rate"],
            "uplink_mbps": mbps, "offered_mbps": summary["offered_mbps"],
            "mean_planning_budget_mbps": summary["mean_planning_budget_mbps"],
            "agent_counters": summary["agent_counters"],
        })
    map_array = np.array(maps)
    gain_array = np.array(gains)
    worker_ms = (run.workers if run.workers is not None else 1) * run.horizon_ms
    capacity_mbps = run.capacity_packets * BITS_PER_PACKET / run.horizon_ms / 1000.0 if run.horizon_ms > 0 else 0.0
    return {
        "policy": run.policy,
        "scheduler": run.scheduler,
        "vehicles": len(run.runs),
        "workers": run.workers,
        "map": _quantiles(map_array),
        "gain_points": _quantiles(gain_array),
        "onboard_map_mean": float(np.mean([vehicle["onboard_map"] for vehicle in vehicles])),
        "jain_map": jain_index(maps),
        "jain_gain": jain_index(np.maximum(gain_array, 0.0)),
        "jain_uplink": jain_index(uplink_mbps),
        "gpu_utilisation": run.cloud_busy_ms / worker_ms if run.workers is not None and worker_ms > 0 else None,
        "gpu_busy_workers_mean": run.cloud_busy_ms / run.horizon_ms if run.horizon_ms > 0 else 0.0,
        "requests_sent": sent,
        "requests_on_time": on_time,
        "requests_late": late,
        "deadline_miss_rate": late / sent if sent else None,
        "cloud_goodput_per_s": on_time / horizon_s if horizon_s > 0 else 0.0,
        "cloud_share": on_time / cells if cells else 0.0,
        "uplink_utilisation": run.delivered_packets / run.capacity_packets if run.capacity_packets else None,
        "uplink_capacity_mbps": capacity_mbps,
        "uplink_used_mbps": float(np.sum(uplink_mbps)),
        "horizon_s": horizon_s,
        "counters": dict(run.counters),
        "per_vehicle": vehicles,
        "timing": {"simulate_wall_s": run.wall_s, "processes": run.processes,
                   "vehicle_seconds_per_wall_second": len(run.runs) * horizon_s / run.wall_s if run.wall_s > 0 else None,
                   "scene_seconds_per_wall_second": horizon_s / run.wall_s if run.wall_s > 0 else None,
                   "coordinator_solve_us_median": float(np.median(run.solve_us)) if run.solve_us else None,
                   "coordinator_solve_us_max": float(np.max(run.solve_us)) if run.solve_us else None},
    }


def break_even_vehicles(points: Sequence[dict], threshold_points: float) -> int | None:
    """The smallest fleet size among `points` (one trace, pool and policy) whose mean gain over
    on-car falls below `threshold_points`; None if every fleet size tried still gains that much."""
    for point in sorted(points, key=lambda item: item["vehicles"]):
        gain = point["gain_points"]["mean"]
        if not math.isfinite(gain) or gain < threshold_points:
            return int(point["vehicles"])
    return None
