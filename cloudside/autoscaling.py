"""How many replicas the Ray engine wants: from queue depth and deadline slack.

Each replica reports, every few hundred ms (Ray Serve's custom autoscaling metrics,
`ModelReplica.record_autoscaling_stats`):
- `busy`: the fraction of the last period its worker spent running batches;
- `queued_ms`: the expected runtime of the work waiting on it;
- `held_ms`: the expected runtime of the work the dispatcher holds for the whole fleet (the
  dispatcher sends it along with each request; 0 once nothing was sent for a while);
- `slack_ms`: the least time any of that waiting work can still wait before it would miss its
  deadline (deadline - now - expected runtime).

The fleet needs the replicas it keeps busy now plus enough to clear the waiting work before its
slack runs out, at `target_utilization`:

    needed = (sum(busy) + (sum(queued_ms) + max(held_ms)) / max(min(slack_ms), min_slack_ms)) / target_utilization

Idle replicas report busy 0 and nothing waiting, so the count falls to `min_replicas`. Ray Serve
applies the bounds (`min_replicas`, `max_replicas`) and the up/down delays. `desired_replicas` is
the pure rule; `DeadlineSlackPolicy` is the Ray Serve policy around it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Metric names the replicas report.
BUSY = "busy"
QUEUED_MS = "queued_ms"
HELD_MS = "held_ms"
SLACK_MS = "slack_ms"
METRICS = (BUSY, QUEUED_MS, HELD_MS, SLACK_MS)
# Slack reported when nothing waits (no deadline pressure).
NO_SLACK_MS = 1e9


def desired_replicas(reports: list[Mapping[str, float]], target_utilization: float = 0.7,
                     min_slack_ms: float = 50.0) -> float:
    """Replicas wanted for these per-replica reports (unbounded; the caller clamps)."""
    if not reports:
        return 0.0
    busy = sum(min(1.0, max(0.0, report.get(BUSY, 0.0))) for report in reports)
    waiting_ms = sum(max(0.0, report.get(QUEUED_MS, 0.0)) for report in reports)
    waiting_ms += max(max(0.0, report.get(HELD_MS, 0.0)) for report in reports)
    slack_ms = min(report.get(SLACK_MS, NO_SLACK_MS) for report in reports)
    needed = busy + waiting_ms / max(slack_ms, min_slack_ms)
    return needed / target_utilization


class DeadlineSlackPolicy:
    """Ray Serve custom autoscaling policy (`AutoscalingPolicy(policy_function=
    "cloudside.autoscaling:DeadlineSlackPolicy", policy_kwargs=...)`): `desired_replicas` over
    the replicas' latest reports."""

    def __init__(self, target_utilization: float = 0.7, min_slack_ms: float = 50.0) -> None:
        self.target_utilization = target_utilization
        self.min_slack_ms = min_slack_ms

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
        replicas = list(ctx.running_replicas)
        reports = [{name: float(metrics.get(name, {}).get(replica, 0.0 if name != SLACK_MS else NO_SLACK_MS))
                    for name in METRICS} for replica in replicas]
        state = dict(ctx.policy_state or {})
        if not reports or not any(metrics.get(name) for name in METRICS):
            # Nothing reported yet (replicas starting): keep the current target.
            return ctx.target_num_replicas, state
        wanted = desired_replicas(reports, self.target_utilization, self.min_slack_ms)
        state["last_desired"] = wanted
        return max(0, math.ceil(wanted - 1e-9)), state
