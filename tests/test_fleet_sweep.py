"""Fleet sweeps: the grid, the report, and the same results as Ray tasks as run here."""

from __future__ import annotations

import json

import pytest
import replay_fakes
import test_fleet_fakes
from test_fleet_fakes import FakeFleetInputs

from avcloud.errors import UserError
from avcloud.fleet.job import FleetOptions, FleetPoint, FleetSettings, run_fleet_job, run_points
from avcloud.fleet.report import write_report

TINY = [FleetPoint(vehicles, workers, policy) for policy in ("turbo", "onboard") for workers in (1, None)
        for vehicles in (1, 3)]


def without_timing(results: list[dict]) -> list[dict]:
    return [{key: value for key, value in result.items() if key != "timing"} for result in results]


def test_a_sweep_covers_the_grid_and_writes_the_report(tmp_path):
    options = FleetOptions(vehicles=[4, 1, 2], workers=[1, 2], policies=["turbo-q", "onboard"], executor="local",
                           progress=False)
    document = run_fleet_job(options, inputs=FakeFleetInputs(frames=30, cell_mbps=(8.0, 3.0)))
    points = document["points"]
    assert len(points) == 2 * 2 * 2 * 3  # traces x pools x policies x fleet sizes
    assert [point["vehicles"] for point in points[:3]] == [1, 2, 4]
    assert {point["trace"] for point in points} == {"constant-8mbps", "constant-3mbps"}
    onboard = [point for point in points if point["policy"] == "onboard"]
    assert all(point["requests_sent"] == 0 and point["gain_points"]["mean"] == 0.0 for point in onboard)
    assert {entry["policy"] for entry in document["break_even"]} == {"turbo-q", "onboard"}
    assert all(entry["vehicles"] == 1 for entry in document["break_even"] if entry["policy"] == "onboard")
    written = write_report(document, tmp_path / "report")
    assert {path.name for path in written} == {"results.json", "map_vs_fleet_size.png", "map_per_vehicle.png",
                                               "shared_resources.png", "summary.md", "summary.html"}
    assert json.loads((tmp_path / "report" / "results.json").read_text())["kind"] == "fleet"
    assert "break-even fleet size" in (tmp_path / "report" / "summary.md").read_text()


def test_a_local_sweep_is_the_same_each_time():
    inputs, settings = FakeFleetInputs(frames=30), FleetSettings("equal")
    assert without_timing(run_points(inputs, settings, TINY, "local")) == \
        without_timing(run_points(inputs, settings, list(reversed(TINY)), "local"))[::-1]


def test_points_side_by_side_and_a_split_fleet_give_the_results_of_one_process():
    """Here, small fleets run in a pool of processes and a fleet of 32 vehicles or more alone,
    split over the processes (avcloud/fleet/parallel.py): the same results as one process."""
    inputs = FakeFleetInputs(frames=30)
    points = [*TINY, FleetPoint(32, 2, "turbo")]
    one = run_points(inputs, FleetSettings("pf", processes=1), points, "local")
    two = run_points(inputs, FleetSettings("pf", processes=2), points, "local")
    assert without_timing(two) == without_timing(one)
    assert [result["timing"]["processes"] for result in two] == [1] * len(TINY) + [2]
    assert {result["timing"]["processes"] for result in one} == {1}


def test_an_unknown_executor_is_refused():
    with pytest.raises(UserError, match="--executor"):
        run_points(FakeFleetInputs(frames=30), FleetSettings(), TINY, "threads")


@pytest.mark.slow
def test_ray_tasks_give_the_same_results_as_a_local_sweep():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'avcloud[ray]')")
    inputs, settings = FakeFleetInputs(frames=30), FleetSettings("pf")
    local = run_points(inputs, settings, TINY, "local")
    for module in (test_fleet_fakes, replay_fakes):  # the fake inputs live in the tests, not in a package
        ray.cloudpickle.register_pickle_by_value(module)
    try:
        remote = run_points(inputs, settings, TINY, "ray")
    finally:
        ray.shutdown()
    assert without_timing(remote) == without_timing(local)
