"""Profile tables and utility curves, against hand-computed TURBO figures."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avcloud.errors import DataError
from avcloud.types import Option
from optimizer.curves import best_step_within, load_profile_table, utility_curve

SHARED_PROFILES = Path(__file__).resolve().parents[1].parent / "shared" / "profiles"
HEADER = "Model,Network Transport Size [Mb],Runtime [ms],Utility"

# Sizes and runtimes from TURBO's published table (edd4 rows); utilities illustrative.
TURBO_EDD4_ROWS = """edd1-imgcompNone-inpcompNone,0.00,135.6,0.30
edd4-imgcompNone-inpcomp50,0.65,72.7,0.40
edd4-imgcompNone-inpcomp75,0.97,72.3,0.42
edd4-imgcompNone-inpcomp90,1.63,70.5,0.43
edd4-imgcompNone-inpcomp95,2.37,69.8,0.43
edd4-imgcomp50-inpcompNone,1.89,92.4,0.50
edd4-imgcompPNG-inpcompNone,33.82,284.0,0.60
"""


def write(tmp_path: Path, text: str, name: str = "profile.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_critical_bandwidth_of_turbo_edd4_row(tmp_path):
    table = load_profile_table(write(tmp_path, HEADER + "\n" + TURBO_EDD4_ROWS))
    curve = utility_curve(table.options(), rtt_ms=20.0, slo_ms=150.0)
    by_name = {step.option.name: step for step in curve}
    # 0.65 Mb / ((150 - 72.7 - 20) / 1000 s) = 11.34 Mbps
    assert by_name["edd4-imgcompNone-inpcomp50"].critical_bandwidth_mbps == pytest.approx(11.344, abs=1e-3)
    # 1.89 / ((150 - 92.4 - 20) / 1000) = 50.27 Mbps
    assert by_name["edd4-imgcomp50-inpcompNone"].critical_bandwidth_mbps == pytest.approx(50.266, abs=1e-3)


def test_curve_is_a_staircase_of_non_dominated_options(tmp_path):
    table = load_profile_table(write(tmp_path, HEADER + "\n" + TURBO_EDD4_ROWS))
    curve = utility_curve(table.options(), rtt_ms=20.0, slo_ms=150.0)
    names = [step.option.name for step in curve]
    # inpcomp95 (0.43 at 40.9 Mbps) ties inpcomp90 (0.43 at 27.9 Mbps) and is dropped; PNG runs
    # 284 ms and can never meet a 150 ms SLO; the fallback is first at 0 Mbps.
    assert names == [
        "edd1-imgcompNone-inpcompNone",
        "edd4-imgcompNone-inpcomp50",
        "edd4-imgcompNone-inpcomp75",
        "edd4-imgcompNone-inpcomp90",
        "edd4-imgcomp50-inpcompNone",
    ]
    assert curve[0].critical_bandwidth_mbps == 0.0
    bandwidths = [step.critical_bandwidth_mbps for step in curve]
    utilities = [step.utility for step in curve]
    assert bandwidths == sorted(bandwidths)
    assert all(later > earlier for earlier, later in zip(utilities, utilities[1:], strict=False))
    assert best_step_within(curve, 30.0).option.name == "edd4-imgcompNone-inpcomp90"
    assert best_step_within(curve, 11.0).option.name == "edd1-imgcompNone-inpcompNone"


def test_equal_bandwidth_keeps_the_more_useful_option():
    options = [Option("fb", 0, 0, 0.1), Option("worse", 1.0, 30, 0.2), Option("better", 1.0, 30, 0.3)]
    assert [s.option.name for s in utility_curve(options, 20, 150)] == ["fb", "better"]


def test_option_with_no_slack_is_infeasible():
    # Runtime + RTT == SLO: the denominator is 0, the option can never make it.
    options = [Option("fb", 0, 0, 0.1), Option("edge", 0.5, 130.0, 0.9)]
    assert [s.option.name for s in utility_curve(options, 20, 150)] == ["fb"]


def test_service_and_window_rows_override_generic_rows(tmp_path):
    text = (
        "Model,Network Transport Size [Mb],Runtime [ms],Utility,Service,Window\n"
        "onboard,0,0,0.30,,\n"
        "cloud,1.0,50,0.50,,\n"
        "cloud,1.0,50,0.60,FRONT,\n"
        "cloud,1.0,50,0.70,FRONT,3\n"
        "cloud,1.0,50,0.55,,3\n"
        "extra,2.0,50,0.65,SIDE_LEFT,-1\n"
    )
    table = load_profile_table(write(tmp_path, text))
    def utilities(service, window=None):
        return {o.name: o.utility for o in table.options(service, window)}
    assert utilities("FRONT") == {"onboard": 0.30, "cloud": 0.60}
    assert utilities("FRONT", 3) == {"onboard": 0.30, "cloud": 0.70}
    assert utilities("FRONT_LEFT", 3) == {"onboard": 0.30, "cloud": 0.55}
    assert utilities("SIDE_LEFT") == {"onboard": 0.30, "cloud": 0.50, "extra": 0.65}
    assert table.windows == [3]
    assert table.service_names == ["FRONT", "SIDE_LEFT"]
    services = table.services(["FRONT", "SIDE_LEFT"], window=3, weights={"FRONT": 2.0})
    assert [(s.name, s.weight, len(s.options)) for s in services] == [("FRONT", 2.0, 2), ("SIDE_LEFT", 1.0, 3)]


def test_parquet_table_loads_like_csv(tmp_path):
    path = tmp_path / "profile.parquet"
    pq.write_table(
        pa.table({
            "Model": ["onboard", "cloud"],
            "Network Transport Size [Mb]": [0.0, 0.65],
            "Runtime [ms]": [0.0, 72.7],
            "Utility": [0.3, 0.4],
        }),
        path,
    )
    table = load_profile_table(path)
    assert [o.name for o in table.options()] == ["onboard", "cloud"]


@pytest.mark.parametrize(
    "text, message",
    [
        (HEADER + "\nfb,0,0,0.3\ncloud,-1,50,0.5\n", r"line 3: column 'Network Transport Size \[Mb\]': must be >= 0"),
        (HEADER + "\nfb,0,0,0.3\ncloud,1,abc,0.5\n", r"line 3: column 'Runtime \[ms\]': not a number"),
        (HEADER + "\nfb,0,0,0.3\ncloud,1,50,nan\n", r"line 3: column 'Utility': not a finite number"),
        (HEADER + "\nfb,0,0,0.3\n,1,50,0.5\n", r"line 3: column 'Model': empty"),
        (HEADER + "\nfb,0,0,0.3\ncloud,1,50,\n", r"line 3: column 'Utility': empty"),
        ("Model,Runtime [ms],Utility\nfb,0,0.3\n", r"missing column\(s\) 'Network Transport Size \[Mb\]'"),
        (HEADER + "\nfb,0,0,0.3\nfb,0,0,0.4\n", r"line 3: column 'Model': 'fb' repeats line 2"),
        (HEADER + "\n", "no rows"),
        (HEADER + ",Window\nfb,0,0,0.3,1.5\n", r"line 2: column 'Window': not an integer"),
    ],
)
def test_bad_tables_name_file_line_and_column(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=message) as raised:
        load_profile_table(path)
    assert str(path) in str(raised.value)


def test_missing_fallback_and_missing_file_are_data_errors(tmp_path):
    table = load_profile_table(write(tmp_path, HEADER + "\ncloud,1,50,0.5\n"))
    with pytest.raises(DataError, match="no on-car fallback"):
        table.options("FRONT")
    with pytest.raises(DataError, match="cannot read"):
        load_profile_table(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_profile_table(write(tmp_path, "not parquet", "broken.parquet"))


@pytest.mark.skipif(not (SHARED_PROFILES / "turbo_effdet_sizes_runtimes.csv").exists(), reason="../shared absent")
def test_published_turbo_table_gives_the_documented_critical_bandwidth(tmp_path):
    # The published table has no utilities; add a placeholder column to read it as a profile.
    lines = (SHARED_PROFILES / "turbo_effdet_sizes_runtimes.csv").read_text().splitlines()
    seen, rows = set(), [lines[0] + ",Utility"]
    for line in lines[1:]:
        name = line.split(",")[0]
        if line.strip() and name not in seen:  # the raw rows repeat a name; keep the first
            seen.add(name)
            rows.append(line + ",0.5")
    table = load_profile_table(write(tmp_path, "\n".join(rows) + "\n"))
    option = next(o for o in table.options() if o.name == "edd4-imgcompNone-inpcomp50")
    bandwidth = option.size_mbit / ((150 - option.runtime_ms - 20) / 1000)
    assert bandwidth == pytest.approx(11.34, abs=0.01)
    assert math.isclose(option.size_mbit, 0.65) and math.isclose(option.runtime_ms, 72.7)
