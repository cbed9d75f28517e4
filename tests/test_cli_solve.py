"""`avcloud solve` and `avcloud allocation-demo`: the I/O contract and one-line errors.

Most tests drive the CLI in-process through `avcloud.cli.main`; one runs the real
`python -m avcloud` entry point in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avcloud.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]

INSTANCE = {
    "budget_mbps": 30.0,
    "rtt_ms": 20.0,
    "slo_ms": 150.0,
    "services": [
        {
            "name": "A",
            "options": [
                {"name": "fb", "size_mbit": 0, "runtime_ms": 0, "utility": 0.3},
                {"name": "a1", "size_mbit": 1.3, "runtime_ms": 65, "utility": 0.5},
            ],
        },
        {
            "name": "B",
            "weight": 2,
            "options": [
                {"name": "fb", "size_mbit": 0, "runtime_ms": 0, "utility": 0.2},
                {"name": "b1", "size_mbit": 0.65, "runtime_ms": 65, "utility": 0.45},
            ],
        },
    ],
}


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_instances_to_output_file(tmp_path):
    smaller = dict(INSTANCE, budget_mbps=12.0)
    instances = write_lines(tmp_path / "in.jsonl", INSTANCE, smaller)
    out = tmp_path / "out.jsonl"
    assert main(["solve", "--instances", str(instances), "--out", str(out)]) == 0
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    # Budget 30 fits a1 (20 Mbps) + b1 (10 Mbps): 0.5 + 2 * 0.45.
    assert first["choices"] == {"A": "a1", "B": "b1"}
    assert first["utility"] == pytest.approx(1.4)
    assert first["bandwidth_mbps"] == pytest.approx({"A": 20.0, "B": 10.0})
    assert first["solve_us"] > 0
    # Budget 12: only b1 fits, and B's weight makes it the better use.
    assert second["choices"] == {"A": "fb", "B": "b1"}
    assert second["utility"] == pytest.approx(0.3 + 0.9)


@pytest.mark.parametrize("method", ["exact", "lp", "milp", "onboard", "naive", "equal", "cell"])
def test_every_method_writes_the_contract_fields(tmp_path, capsys, method):
    instances = write_lines(tmp_path / "in.jsonl", dict(INSTANCE, budget_mbps=20.0))
    assert main(["solve", "--instances", str(instances), "--method", method]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"utility", "choices", "bandwidth_mbps", "solve_us"} <= set(record)
    assert set(record["choices"]) == {"A", "B"}
    if method == "lp":
        assert record["fractional"] is True  # 20 Mbps: b1 (10) plus half of a1's segment
        assert record["relaxation_utility"] == pytest.approx(0.3 + 0.9 + 0.1, abs=1e-6)
    else:
        assert "fractional" not in record


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"budget_mbps": 1', "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        (dict(INSTANCE, budget_mbps=-1), "line 2: field 'budget_mbps': Input should be greater than or equal to 0"),
        ({k: v for k, v in INSTANCE.items() if k != "slo_ms"}, "line 2: field 'slo_ms': Field required"),
        ('{"budget_mbps": NaN, "rtt_ms": 20, "slo_ms": 150, "services": []}', "line 2: field 'budget_mbps': Input should be a finite number"),
        (
            dict(INSTANCE, services=[{"name": "A", "options": [{"name": "fb", "size_mbit": -2, "runtime_ms": 0, "utility": 0}]}]),
            "line 2: field 'services.0.options.0.size_mbit'",
        ),
        (
            dict(INSTANCE, services=[{"name": "A", "options": [{"name": "c", "size_mbit": 1, "runtime_ms": 0, "utility": 0}]}]),
            "line 2: service 'A' has no on-car fallback",
        ),
        (dict(INSTANCE, services=[INSTANCE["services"][0], INSTANCE["services"][0]]), "line 2: service 'A' appears twice"),
    ],
)
def test_bad_instance_lines_fail_with_one_line_naming_the_line(tmp_path, capsys, line, message):
    instances = write_lines(tmp_path / "in.jsonl", INSTANCE, line)
    assert main(["solve", "--instances", str(instances)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing is solved when any line is bad
    assert message in captured.err
    assert str(instances) in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


def test_unknown_method_and_unreadable_file(tmp_path, capsys):
    instances = write_lines(tmp_path / "in.jsonl", INSTANCE)
    assert main(["solve", "--instances", str(instances), "--method", "greedy"]) == 2
    assert "unknown method 'greedy'" in capsys.readouterr().err
    assert main(["solve", "--instances", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: cannot read" in err and len(err.strip().splitlines()) == 1


PROFILE = """Model,Network Transport Size [Mb],Runtime [ms],Utility,Service
onboard,0,0,0.30,
edd4-imgcompNone-inpcomp50,0.65,72.7,0.45,
edd4-imgcompNone-inpcomp90,1.63,70.5,0.50,
edd4-imgcompNone-inpcomp50,0.65,72.7,0.55,FRONT
"""


def test_profile_mode_prints_table_and_json(tmp_path, capsys):
    profile = tmp_path / "profile.csv"
    profile.write_text(PROFILE)
    args = ["solve", "--profile", str(profile), "--budget-mbps", "12", "--rtt-ms", "20", "--slo-ms", "150"]
    assert main([*args, "--cameras", "FRONT,SIDE_LEFT"]) == 0
    table = capsys.readouterr().out
    assert "FRONT" in table and "edd4-imgcompNone-inpcomp50" in table and "total" in table
    assert main([*args, "--cameras", "FRONT,SIDE_LEFT", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    # 12 Mbps fits one inpcomp50 (11.34 Mbps); FRONT gains more from it (0.55 vs 0.45).
    assert record["choices"] == {"FRONT": "edd4-imgcompNone-inpcomp50", "SIDE_LEFT": "onboard"}
    assert record["bandwidth_mbps"]["FRONT"] == pytest.approx(11.344, abs=1e-3)
    # Without --cameras the services are the ones the table names.
    assert main([*args, "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["choices"]) == ["FRONT"]
    assert main([*args, "--services", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["choices"]) == 3


def test_profile_mode_errors(tmp_path, capsys):
    profile = tmp_path / "profile.csv"
    profile.write_text(PROFILE)
    assert main(["solve", "--profile", str(profile), "--rtt-ms", "20", "--slo-ms", "150"]) == 2
    assert "--profile needs --budget-mbps" in capsys.readouterr().err
    assert main(["solve", "--profile", str(profile), "--budget-mbps", "nan", "--rtt-ms", "20", "--slo-ms", "150"]) == 2
    assert "--budget-mbps must be a finite number" in capsys.readouterr().err
    profile.write_text(PROFILE.replace("0.65,72.7,0.45", "0.65,72.7,oops"))
    assert main(["solve", "--profile", str(profile), "--budget-mbps", "5", "--rtt-ms", "20", "--slo-ms", "150"]) == 2
    assert "line 3: column 'Utility': not a number" in capsys.readouterr().err


def test_demo_runs_and_shows_every_budget(capsys):
    assert main(["allocation-demo", "--budgets-mbps", "0,20,80"]) == 0
    out = capsys.readouterr().out
    assert "illustrative" in out
    rows = {cells[0]: cells for cells in (line.split() for line in out.splitlines()) if cells and cells[0] in ("0", "20", "80")}
    assert rows["0"][1:6] == ["car"] * 5  # nothing fits in 0 Mbps
    assert any(choice != "car" for choice in rows["80"][1:6])


def test_real_entry_point_exits_2_with_one_line_and_no_traceback(tmp_path):
    instances = write_lines(tmp_path / "in.jsonl", INSTANCE, dict(INSTANCE, rtt_ms="fast"))
    result = subprocess.run(
        [sys.executable, "-m", "avcloud", "solve", "--instances", str(instances)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"avcloud solve: error: {instances} line 2: field 'rtt_ms': Input should be a valid number"
    ]


def test_profile_only_flags_are_refused_with_instances(tmp_path, capsys):
    instances = write_lines(tmp_path / "in.jsonl", INSTANCE)
    assert main(["solve", "--instances", str(instances), "--budget-mbps", "5"]) == 2
    assert "--budget-mbps goes with --profile" in capsys.readouterr().err
