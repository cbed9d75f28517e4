"""The report folder: results.json, plots and a summary that embeds them; the terminal table."""

from __future__ import annotations

import json

from replay_fakes import constant_opportunities, make_case, mean_score_map
from rich.console import Console

from avcloud.replay.job import ReplayOptions, results_document, run_case
from avcloud.replay.report import print_tables, write_report
from optimizer.policies import POLICY_NAMES


def test_report_folder_has_results_plots_and_summaries(tmp_path):
    result = run_case(make_case(constant_opportunities(6.0), frames=40), POLICY_NAMES, map_function=mean_score_map)
    document = results_document([result], ReplayOptions())
    written = write_report(document, [result], tmp_path / "report")
    names = {path.name for path in written}
    assert names == {"results.json", "bandwidth.png", "map.png", "configurations.png", "summary.md", "summary.html"}
    for path in written:
        assert path.stat().st_size > 0
    for image in ("bandwidth.png", "map.png", "configurations.png"):
        assert (tmp_path / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "results.json").read_text())["cases"][0]["frames"] == 40
    markdown = (tmp_path / "report" / "summary.md").read_text()
    html = (tmp_path / "report" / "summary.html").read_text()
    for image in ("bandwidth.png", "map.png", "configurations.png"):
        assert f"]({image})" in markdown and f'src="{image}"' in html
    for name in POLICY_NAMES:
        assert f"| {name} |" in markdown and f"<td>{name}</td>" in html


def test_terminal_table_lists_every_policy_with_its_map():
    result = run_case(make_case(constant_opportunities(6.0), frames=20), ("onboard", "turbo"), map_function=mean_score_map)
    document = results_document([result], ReplayOptions(policies=("onboard", "turbo")))
    console = Console(record=True, width=200)
    print_tables(document, console)
    text = console.export_text()
    assert "onboard" in text and "turbo" in text
    assert f"{100 * result.summaries['turbo']['map']:.1f}" in text
