"""Live and simulated agree by construction: the live node's agent, fed the events the replay's
agent saw, makes the same per-frame decisions and publishes the same results.

The replay runs a policy on a small fake scene and uplink while every call into its agent is
logged (camera frames, replies, steps, with their simulated times). Then `OnboardNode` is
configured as `avcloud onboard` would be, with the same policy, and its agent is fed the same
calls at the same times on a simulated clock, its sockets and thread pools replaced by fakes.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, Future

import numpy as np
import pytest
from replay_fakes import CAMERAS, constant_opportunities, make_case

from avcloud.clock import SimulatedClock
from avcloud.protocol import PONG, decode_reply, decode_request, encode_reply
from avcloud.replay.simulator import CarSettings, simulate_policy
from onboard.daemon import EncodedFrame, OnboardAgent
from onboard.node import OnboardNode
from onboard.params import OnboardParams, load_params
from optimizer.policies import get_policy


class InlineExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        future.set_result(fn(*args))
        return future


class RecordingLink:
    """The node agent's cloud link: remembers which request id went with which (frame, camera)."""

    def __init__(self) -> None:
        self.ids: dict[tuple[int, str], int] = {}
        self.ping_ids: list[int] = []

    def send(self, frames) -> bool:
        header, _ = decode_request(frames)
        if header.kind == "ping":
            self.ping_ids.append(header.request_id)
        else:
            self.ids[(header.frame, header.task)] = header.request_id
        return True

    def reset(self) -> None:
        pass


def log_agent_calls(monkeypatch, log: list) -> None:
    """Log every call into an agent with the agent's clock time (the replay's inputs)."""
    for name in ("on_camera_frame", "on_reply", "step"):
        original = getattr(OnboardAgent, name)

        def logged(self, *args, _original=original, _name=name, **kwargs):
            log.append((self.clock.now_ms(), _name, args))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(OnboardAgent, name, logged)


def readdressed(reply_frames, link: RecordingLink, pongs_seen: int):
    """The replay's reply, addressed to the node agent's request id for the same (frame, camera)."""
    header, detections = decode_reply(reply_frames)
    if header.kind == PONG:
        request_id = link.ping_ids[pongs_seen] if pongs_seen < len(link.ping_ids) else -1
    else:
        request_id = link.ids.get((header.frame, header.task), -1)
    return encode_reply(dataclasses.replace(header, request_id=request_id), detections)


@pytest.mark.parametrize("policy", ["turbo", "turbo-q", "equal"])
def test_the_live_nodes_agent_decides_as_the_replays_agent(monkeypatch, policy):
    # 6 Mbps for 3 s, then 1.5 Mbps (the trace loops): the estimate must move, decisions with it.
    steady = constant_opportunities(6.0, 3.0)
    slow = 3000 + constant_opportunities(1.5, 3.0)
    case = make_case(np.concatenate([steady, slow]), frames=60)
    scenario = dataclasses.replace(case.scenario, fallback_runtime_ms=0.0, encode_ms=np.zeros(len(case.scenario.config_names)))
    log: list = []
    log_agent_calls(monkeypatch, log)
    car = CarSettings(encode_workers=0)  # compress inline, as the node does by default (encode_workers: 0)
    replay = simulate_policy(get_policy(policy), scenario, case.schedule, case.detections_at, car=car)
    monkeypatch.undo()
    assert replay.counters["requests_sent"] >= 5

    clock = SimulatedClock(0.0)
    frame_position = {int(index): position for position, index in enumerate(scenario.frame_indices)}

    def fallback(image, full_size_wh):
        return case.detections_at(image.frame, image.camera, scenario.fallback_config)

    def encoder(image, config, full_size_wh):
        size = int(scenario.size_bytes[image.frame, image.camera, scenario.config_position[config]])
        return EncodedFrame(scenario.models[config], "jpeg", b"\0" * size, (1280, 1920), (1280, 1920))

    params = load_params(None, [
        f"policy:={policy}", "security.insecure:=true", f"slo_ms:={scenario.slo_ms}", f"rtt_ms:={scenario.rtt_ms}",
        f"cameras:=[{', '.join(CAMERAS)}]", "endpoints.outputs:=tcp://127.0.0.1:*",
        "endpoints.cameras:=tcp://127.0.0.1:9", "endpoints.cloud:=tcp://127.0.0.1:9"])
    node = OnboardNode(params, clock=clock, services=scenario.services, fallback=fallback, encoder=encoder,
                       decoder=object())
    node.configure()
    try:
        agent = node.agent
        link = RecordingLink()
        published = []
        # Only I/O is replaced: sockets, thread pools, the publisher.
        agent.link, agent.executor, agent.publish = link, InlineExecutor(), published.append
        pongs = 0
        choices: dict[int, dict[str, str]] = {}
        for time_ms, name, args in log:
            clock.advance_to(time_ms)
            if name == "on_camera_frame":
                frame_index, camera, image, capture_ms, size_wh = args
                agent.on_camera_frame(frame_index, camera, image, capture_ms, size_wh)
                choices[frame_index] = dict(agent.allocation_for(frame_index).choices)
            elif name == "on_reply":
                agent.on_reply(readdressed(args[0], link, pongs))
                pongs += decode_reply(args[0])[0].kind == PONG
            else:
                agent.step()
    finally:
        node.shutdown()

    for f, frame_index in enumerate(scenario.frame_indices):
        expected = {camera: scenario.config_names[k] if k >= 0 else scenario.fallback_config
                    for camera, k in zip(CAMERAS, replay.planned_config[f], strict=True)}
        assert choices[int(frame_index)] == expected, frame_index
    assert len(published) == len(scenario.frame_indices) * len(CAMERAS)
    sources = np.zeros_like(replay.outcome)
    for result in published:
        sources[frame_position[result.frame_index], CAMERAS.index(result.camera)] = result.source == "cloud"
    assert (sources == (replay.served_config() >= 0)).all()
    assert agent.counters.requests_sent == replay.counters["requests_sent"]
    assert agent.counters.published_cloud == replay.counters["published_cloud"]


def test_the_replayed_car_runs_with_the_daemons_default_settings():
    defaults = OnboardParams(security={"insecure": True})
    car = CarSettings()
    assert car.fallback_workers == defaults.fallback_workers
    assert car.publish_guard_ms == defaults.publish_guard_ms
    # The daemon compresses in its loop (encode_workers 0): one camera at a time, as one worker.
    assert defaults.encode_workers == 0 and car.encode_workers == 1
