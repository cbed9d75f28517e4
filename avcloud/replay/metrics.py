"""Per-policy figures of a replay: mAP of what was published, and what the uplink did.

mAP is computed per camera over every frame of the published detections (cloud when on time,
else on-car), with the Waymo-style metric of `datasets.metric`; the overall mAP is the mean over
cameras (every camera weighs the same, as every service has weight 1 in the allocation).
Gains are in percentage points (x100).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from avcloud.replay.inputs import DetectionSource
from avcloud.replay.simulator import FALLBACK_INDEX, PolicyRun, ReplayScenario, RequestOutcome
from avcloud.types import GroundTruth

# evaluate(detections per image, ground truth per image) -> mAP in [0, 1]
MapFunction = Callable[[Sequence[np.ndarray], Sequence[GroundTruth]], float]


def datasets_map(detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth]) -> float:
    from datasets.metric import evaluate

    return float(evaluate(detections, ground_truths).map)


class PublishedDetections:
    """Looks up and memoises cache detections; every policy's fallback frames share one copy."""

    def __init__(self, scenario: ReplayScenario, source: DetectionSource) -> None:
        self._scenario = scenario
        self._source = source
        self._memo: dict[tuple[int, int, int], np.ndarray] = {}

    def get(self, frame: int, camera: int, config: int) -> np.ndarray:
        key = (frame, camera, config)
        found = self._memo.get(key)
        if found is None:
            name = self._scenario.fallback_config if config == FALLBACK_INDEX else self._scenario.config_names[config]
            found = self._source.detections(int(self._scenario.frame_indices[frame]), self._scenario.cameras[camera], name)
            self._memo[key] = found
        return found


def map_per_camera(run: PolicyRun, published: PublishedDetections, scenario: ReplayScenario,
                   ground_truths: Mapping[str, Sequence[GroundTruth]], map_function: MapFunction) -> dict[str, float]:
    """mAP per camera of what the run published: the agent's own results where the run kept them
    (a simulated run), else the cached detections of the configuration it served (a recording)."""
    served = run.served_config()
    figures = {}
    for c, camera in enumerate(scenario.cameras):
        detections = []
        for f in range(scenario.num_frames):
            own = run.published[f][c] if run.published is not None else None
            detections.append(own if own is not None else published.get(f, c, int(served[f, c])))
        figures[camera] = float(map_function(detections, list(ground_truths[camera])))
    return figures


# Bins of the planner's predicted chance that a frame's requests all arrive in time.
SUCCESS_BINS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


def plan_success_calibration(run: PolicyRun) -> dict | None:
    """How often a frame that sent to the cloud had every planned request arrive in time, by the
    chance its planner gave it (`SUCCESS_BINS`): per bin the frames, the sum of the predicted
    chances and the frames that succeeded, so that runs add up. None if the planner gives no
    chance (every policy but the quantile planner)."""
    predicted = run.planned_success_probability
    if predicted is None:
        return None
    planned_cloud = run.planned_config != FALLBACK_INDEX
    sending = planned_cloud.any(axis=1) & np.isfinite(predicted)
    if not sending.any():
        return None
    succeeded = ((run.outcome == RequestOutcome.ON_TIME) | ~planned_cloud).all(axis=1)
    # The top bin includes 1: a plan its planner was sure of.
    bins = np.clip(np.searchsorted(SUCCESS_BINS, predicted[sending], side="right") - 1, 0, len(SUCCESS_BINS) - 2)
    count = len(SUCCESS_BINS) - 1
    return {
        "bins": [[SUCCESS_BINS[i], SUCCESS_BINS[i + 1]] for i in range(count)],
        "frames": np.bincount(bins, minlength=count).tolist(),
        "predicted_sum": np.bincount(bins, weights=predicted[sending], minlength=count).tolist(),
        "succeeded": np.bincount(bins, weights=succeeded[sending], minlength=count).astype(int).tolist(),
    }


def summarise_run(run: PolicyRun, scenario: ReplayScenario, map_by_camera: dict[str, float]) -> dict:
    """Every figure of one policy except those relative to other policies."""
    outcome = run.outcome
    cells = outcome.size
    sent = int(np.count_nonzero((outcome == RequestOutcome.ON_TIME) | (outcome == RequestOutcome.LATE)))
    late = int(np.count_nonzero(outcome == RequestOutcome.LATE))
    on_time = int(np.count_nonzero(outcome == RequestOutcome.ON_TIME))
    planned = int(np.count_nonzero(run.planned_config != FALLBACK_INDEX))
    duration_s = scenario.duration_s
    config_use: dict[str, int] = {}
    served = run.served_config()
    for config, count in zip(*np.unique(served, return_counts=True), strict=True):
        name = scenario.fallback_config if config == FALLBACK_INDEX else scenario.config_names[int(config)]
        config_use[name] = int(count)
    budgets = run.budget_mbps[np.isfinite(run.budget_mbps)]
    # Uplink use: bytes that crossed the uplink while the scene lasted (a backlog that drains later
    # was offered, not carried).
    delivered_bytes = sum(size for _, delivered_ms, size in run.transfers if delivered_ms <= duration_s * 1000.0)
    return {
        "policy": run.policy,
        "map": float(np.mean(list(map_by_camera.values()))),
        "map_per_camera": map_by_camera,
        "cloud_share": on_time / cells if cells else 0.0,
        "requests_planned": planned,
        "requests_sent": sent,
        "requests_on_time": on_time,
        "requests_late": late,
        "requests_not_sent": planned - sent,
        "deadline_miss_rate": late / sent if sent else None,
        "mean_uplink_mbps": delivered_bytes * 8 / duration_s / 1e6 if duration_s else 0.0,
        "offered_mbps": run.sent_bytes * 8 / duration_s / 1e6 if duration_s else 0.0,
        "mean_planning_budget_mbps": float(budgets.mean()) if budgets.size else None,
        "mean_allocated_mbps": float(run.allocated_mbps.mean()) if run.allocated_mbps.size else 0.0,
        "mean_solve_us": float(run.solve_us.mean()) if run.solve_us.size else 0.0,
        "served_configurations": config_use,
        "agent_counters": run.counters,
        "simulation_wall_s": run.wall_s,
        "scene_seconds_per_wall_second": duration_s / run.wall_s if run.wall_s > 0 else None,
        "plan_success_calibration": plan_success_calibration(run),
    }


def add_relative_figures(summaries: dict[str, dict]) -> None:
    """Gain over `onboard` (points) and fraction of `oracle`'s gain, where those policies ran."""
    onboard = summaries.get("onboard", {}).get("map")
    oracle = summaries.get("oracle", {}).get("map")
    for summary in summaries.values():
        gain = None if onboard is None else (summary["map"] - onboard) * 100.0
        summary["gain_over_onboard_points"] = gain
        oracle_gain = None if onboard is None or oracle is None else (oracle - onboard) * 100.0
        summary["fraction_of_oracle_gain"] = gain / oracle_gain if gain is not None and oracle_gain and oracle_gain > 0 else None


def summarise_policies(runs: Mapping[str, PolicyRun], scenario: ReplayScenario, source: DetectionSource,
                       ground_truths: Mapping[str, Sequence[GroundTruth]],
                       map_function: MapFunction = datasets_map) -> dict[str, dict]:
    published = PublishedDetections(scenario, source)
    summaries = {}
    for name, run in runs.items():
        per_camera = map_per_camera(run, published, scenario, ground_truths, map_function)
        summaries[name] = summarise_run(run, scenario, per_camera)
    add_relative_figures(summaries)
    return summaries
