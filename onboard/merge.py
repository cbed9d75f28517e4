"""The per-frame merge: exactly one published result per camera per frame, cloud or on-car.

A task frame (one camera's image of one frame) is published once, as soon as its answer is
final:
- the cloud result, the moment it arrives, if that is no later than the deadline;
- otherwise the on-car result, as soon as nothing better can come: at the cutoff (the deadline
  less a guard of a few ms, so that the publish itself lands before the deadline), or earlier
  when no cloud request is pending for the frame (not allocated, dropped, or failed);
- if the on-car model is still running at the deadline, the on-car result when it finishes,
  with its real latency and `deadline_met = False`.
Cloud replies after the cutoff or for a frame already published are discarded by the caller
(and counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onboard.topics import DetectionResult


@dataclass(slots=True)
class TaskFrame:
    frame_index: int
    camera: str
    arrival_ms: float  # when the frame reached the node: the start of its latency budget
    deadline_ms: float
    cutoff_ms: float  # when the node stops waiting for the cloud: the deadline less a small guard
    choice: str  # configuration the allocator chose (the fallback's name if none)
    cloud_pending: bool = False  # a request for this frame is waiting to be sent or in flight
    discovery: bool = False  # the request was planned to learn the uplink
    cloud_detections: np.ndarray | None = None
    cloud_config: str = ""
    onboard_detections: np.ndarray | None = None
    onboard_config: str = ""
    published: bool = False

    @property
    def onboard_done(self) -> bool:
        return self.onboard_detections is not None


def decide(task: TaskFrame, now_ms: float) -> DetectionResult | None:
    """The result to publish for this task frame now, or None if it must wait."""
    if task.published:
        return None
    if task.cloud_detections is not None:
        return _result(task, "cloud", task.cloud_config, task.cloud_detections, now_ms)
    if task.onboard_done and (now_ms >= task.cutoff_ms or not task.cloud_pending):
        return _result(task, "onboard", task.onboard_config, task.onboard_detections, now_ms)
    return None


def _result(task: TaskFrame, source: str, config: str, detections: np.ndarray, now_ms: float) -> DetectionResult:
    return DetectionResult(frame_index=task.frame_index, camera=task.camera, source=source,
                           latency_ms=now_ms - task.arrival_ms, config=config,
                           deadline_met=now_ms <= task.deadline_ms, detections=detections)
