"""A replayed policy run as a recording robotics tools open (`avcloud replay --mcap POLICY`).

The same MCAP layout as `avcloud record` (avcloud/recording.py): the camera images of the scene
(as its JPEGs), each published result with its source and configuration, the allocation of
every frame, and the agent's bandwidth and RTT estimates. Times are scene times from the first
replayed frame.
"""

from __future__ import annotations

import math
from pathlib import Path

from avcloud.errors import UserError
from avcloud.replay.inputs import ReplayCase
from avcloud.replay.simulator import FALLBACK_INDEX, PolicyRun
from avcloud.types import critical_bandwidth_mbps

NS_PER_MS = 1_000_000


def write_policy_mcap(case: ReplayCase, run: PolicyRun, path: Path, images: bool = True) -> Path:
    """Write one policy run of a case as MCAP; the scene is read again for its camera JPEGs."""
    from avcloud.recording import RecordingWriteError, open_recording

    scenario = case.scenario
    if run.published is None or run.latency_ms is None or run.published_config is None:
        raise UserError(f"--mcap {run.policy}: only a simulated run keeps what it published")
    scene_frames = _scene_frames(case) if images else iter(())
    critical = {service.name: {option.name: critical_bandwidth_mbps(option.size_mbit, option.runtime_ms,
                                                                     scenario.rtt_ms, scenario.slo_ms)
                               for option in service.options} for service in scenario.services}
    try:
        with open_recording(path, "mcap") as recording:
            for f, frame_index in enumerate(scenario.frame_indices):
                stamp_ns = int(round(float(scenario.capture_ms[f]) * NS_PER_MS))
                frame = next((frame for frame in scene_frames if frame.index >= frame_index), None)
                if frame is not None and frame.index == frame_index:
                    for camera in scenario.cameras:
                        if camera in frame.cameras:
                            recording.write_camera_image(frame_index=int(frame_index), camera=camera,
                                                         timestamp_ns=stamp_ns, data=frame.cameras[camera].jpeg_bytes)
                choices = {camera: None if k == FALLBACK_INDEX else scenario.config_names[k]
                           for camera, k in zip(scenario.cameras, run.planned_config[f], strict=True)}
                budget = float(run.budget_mbps[f])
                recording.write_allocation(frame_index=int(frame_index), timestamp_ns=stamp_ns, choices=choices,
                                           budget_mbps=budget if math.isfinite(budget) else None,
                                           critical_bandwidth_mbps={camera: critical[camera].get(config, 0.0)
                                                                    for camera, config in choices.items()})
                rtt = float(run.rtt_estimate_ms[f]) if run.rtt_estimate_ms is not None else math.nan
                recording.write_bandwidth(timestamp_ns=stamp_ns, estimate_mbps=float(run.estimate_mbps[f]),
                                          planning_mbps=budget if math.isfinite(budget) else None,
                                          rtt_ms=rtt if math.isfinite(rtt) else None)
                for c, camera in enumerate(scenario.cameras):
                    latency = float(run.latency_ms[f, c])
                    source = "cloud" if run.served_config()[f, c] != FALLBACK_INDEX else "onboard"
                    recording.write_result(frame_index=int(frame_index), camera=camera, timestamp_ns=stamp_ns,
                                           source=source, config=run.published_config[f][c],
                                           latency_ms=latency, deadline_met=latency <= scenario.slo_ms,
                                           detections=run.published[f][c])
                recording.flush()
    except RecordingWriteError:
        raise
    except OSError as error:
        raise UserError(f"--mcap: cannot write {path} ({error.strerror or error})") from None
    return path


def _scene_frames(case: ReplayCase):
    """The scene's frames in order (streamed: a segment's JPEGs are hundreds of MB)."""
    from datasets.scene import open_scene

    return iter(open_scene(Path(case.scene_path)).frames(list(case.scenario.cameras)))
