"""Kernel pieces: critical bandwidth, config loading errors, parameter overrides, clocks."""

import math

import pydantic
import pytest

from avcloud.clock import SimulatedClock
from avcloud.config import load_config, parse_override
from avcloud.errors import ConfigError
from avcloud.types import critical_bandwidth_mbps


def test_critical_bandwidth_matches_the_turbo_example():
    # edd4 input-JPEG-50: 0.65 Mb, 72.7 ms runtime, at SLO 150 ms and RTT 20 ms.
    assert critical_bandwidth_mbps(0.65, 72.7, 20, 150) == pytest.approx(11.34, abs=0.01)


def test_fallback_needs_no_bandwidth_and_hopeless_options_need_infinite():
    assert critical_bandwidth_mbps(0.0, 500, 20, 150) == 0.0
    assert math.isinf(critical_bandwidth_mbps(1.0, 130, 20, 150))


class ExampleConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    slo_ms: float = pydantic.Field(gt=0)
    cameras: list[str] = ["FRONT"]


def test_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("slo_ms: -3\n")
    with pytest.raises(ConfigError, match=r"node.yaml: field 'slo_ms'"):
        load_config(ExampleConfig, path)
    path.write_text("slo_ms: [unclosed\n")
    with pytest.raises(ConfigError, match=r"node.yaml: line \d+ invalid YAML"):
        load_config(ExampleConfig, path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(ExampleConfig, tmp_path / "missing.yaml")


def test_overrides_follow_ros2_key_value_syntax(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("slo_ms: 200\n")
    key, value = parse_override("cameras:=[FRONT, SIDE_LEFT]")
    config = load_config(ExampleConfig, path, {key: value, "slo_ms": parse_override("slo_ms:=250")[1]})
    assert config.cameras == ["FRONT", "SIDE_LEFT"] and config.slo_ms == 250
    with pytest.raises(ConfigError, match="key:=value"):
        parse_override("slo_ms=250")


def test_simulated_clock_never_goes_back():
    clock = SimulatedClock()
    clock.advance_to(5)
    assert clock.now_ms() == 5
    with pytest.raises(ValueError):
        clock.advance_to(4)
