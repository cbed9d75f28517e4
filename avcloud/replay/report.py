"""What a replay leaves behind: a terminal table, results.json, PNG plots and a Markdown/HTML summary."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from avcloud.replay.job import CaseResult
from avcloud.replay.simulator import FALLBACK_INDEX, RequestOutcome, true_capacity_mbps

POLICY_COLOURS = {
    "onboard": "#7f7f7f",
    "naive": "#d62728",
    "equal": "#ff7f0e",
    "turbo": "#1f77b4",
    "turbo-q": "#2ca02c",
    "oracle": "#9467bd",
}
TIMELINE_POLICIES = ("turbo", "turbo-q", "oracle")
PLOT_BIN_MS = 1000.0


def _points(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table_rows(case: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-policy table (shared by the terminal, Markdown and HTML)."""
    cameras = case["cameras"]
    header = ["policy", "mAP", *[_short_camera(c) for c in cameras], "gain [pt]",
              "of oracle gain", "cloud-served", "deadline miss", "uplink [Mbps]"]
    rows = []
    for name, summary in case["policies"].items():
        rows.append([
            name,
            _points(100 * summary["map"]),
            *[_points(100 * summary["map_per_camera"][camera]) for camera in cameras],
            _points(summary.get("gain_over_onboard_points"), signed=True),
            _percent(summary.get("fraction_of_oracle_gain")),
            _percent(summary["cloud_share"]),
            _percent(summary["deadline_miss_rate"]),
            f"{summary['mean_uplink_mbps']:.2f}",
        ])
    return header, rows


def _short_camera(camera: str) -> str:
    return "".join(part[0] for part in camera.split("_")) if "_" in camera else camera[:5]


def case_title(case: dict) -> str:
    return (f"{case['scene']} x {case['trace']} ({case['frames']} frames, {len(case['cameras'])} cameras, "
            f"trace mean {case['trace_mean_mbps_over_scene']:.2f} Mbps over the scene)")


def print_tables(document: dict, console: Console) -> None:
    settings = document["settings"]
    for case in document["cases"]:
        header, rows = table_rows(case)
        table = Table(title=case_title(case), caption=(
            f"{document['mode']} replay, RTT {settings['rtt_ms']:g} ms, SLO {settings['slo_ms']:g} ms; "
            f"mAP x100, overall and per camera ({', '.join(case['cameras'])}); gain over onboard in points; "
            f"deadline miss = late / sent cloud requests; {case['profile_note']}"))
        for position, column in enumerate(header):
            table.add_column(column, justify="left" if position == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if "aggregate" in document:
        table = Table(title=f"mean over {len(document['cases'])} scene x trace cases")
        for column in ("policy", "mAP", "gain [pt]", "of oracle gain", "cloud-served", "deadline miss"):
            table.add_column(column, justify="right")
        for name, figures in document["aggregate"].items():
            table.add_row(name, _points(None if figures["map"] is None else 100 * figures["map"]),
                          _points(figures["gain_over_onboard_points"], signed=True),
                          _percent(figures["fraction_of_oracle_gain"]), _percent(figures["cloud_share"]),
                          _percent(figures["deadline_miss_rate"]))
        console.print(table)


def write_report(document: dict, results: Sequence[CaseResult], out_dir: Path) -> list[Path]:
    """results.json, plots per case, summary.md and summary.html; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    written[0].write_text(json.dumps(document, indent=2) + "\n")
    images: list[list[Path]] = []
    for number, (result, case) in enumerate(zip(results, document["cases"], strict=True), start=1):
        prefix = f"case{number}-" if len(results) > 1 else ""
        case_images = [
            plot_bandwidth(result, out_dir / f"{prefix}bandwidth.png"),
            plot_map(case, out_dir / f"{prefix}map.png"),
            plot_configuration_timeline(result, out_dir / f"{prefix}configurations.png"),
        ]
        images.append(case_images)
        written.extend(case_images)
    written.append(write_markdown(document, images, out_dir / "summary.md"))
    written.append(write_html(document, images, out_dir / "summary.html"))
    return written


def pyplot():
    """matplotlib's pyplot on the Agg backend (reports are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out, write (110 dpi) and close a report figure; returns its path."""
    figure.tight_layout(rect=rect)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def _per_bin(times_ms: np.ndarray, values: np.ndarray, duration_ms: float, bin_ms: float) -> np.ndarray:
    bins = np.arange(0.0, duration_ms + bin_ms, bin_ms)
    totals, _ = np.histogram(times_ms, bins=bins, weights=values)
    return totals


def plot_bandwidth(result: CaseResult, path: Path) -> Path:
    """True capacity per second with each policy's planning budget (top) and uplink use (bottom)."""
    plt = pyplot()
    scenario = result.case.scenario
    duration_ms = max(scenario.duration_s * 1000.0, PLOT_BIN_MS)
    starts_ms, capacity = true_capacity_mbps(result.case.schedule, 0.0, duration_ms, PLOT_BIN_MS)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for axis in (top, bottom):
        axis.fill_between(starts_ms / 1000.0, capacity, step="post", color="#d9d9d9", label="true capacity (trace)")
    frame_s = scenario.capture_ms / 1000.0
    for name, run in result.runs.items():
        colour = POLICY_COLOURS.get(name)
        if np.isfinite(run.budget_mbps).any() and name != "onboard":
            top.step(frame_s, run.budget_mbps, where="post", color=colour, linewidth=1.2, label=name)
        if run.transfers:
            delivered_ms = np.array([delivered for _, delivered, _ in run.transfers])
            bits = np.array([size * 8.0 for _, _, size in run.transfers])
            used = _per_bin(delivered_ms, bits, duration_ms, PLOT_BIN_MS)[: len(starts_ms)] / (PLOT_BIN_MS * 1000.0)
            bottom.step(starts_ms / 1000.0, used, where="post", color=colour, linewidth=1.4, label=name)
    top.set_ylabel("planning budget [Mbps]")
    top.set_title(f"{result.case.trace_name}: what each policy planned with (every frame)")
    bottom.set_ylabel("uplink used [Mbps]")
    bottom.set_xlabel("scene time [s]")
    bottom.set_title("bytes each policy actually put through the uplink (per second)")
    ceiling = max(float(capacity.max()) * 1.6, 1.0)
    top.set_ylim(0, ceiling)
    bottom.set_ylim(0, ceiling)
    for axis in (top, bottom):
        axis.legend(loc="upper right", fontsize=8, ncol=4)
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_map(case: dict, path: Path) -> Path:
    plt = pyplot()
    names = list(case["policies"])
    values = [100 * case["policies"][name]["map"] for name in names]
    figure, axis = plt.subplots(figsize=(7.5, 4))
    bars = axis.bar(names, values, color=[POLICY_COLOURS.get(name, "#333333") for name in names])
    for bar, name in zip(bars, names, strict=True):
        gain = case["policies"][name].get("gain_over_onboard_points")
        label = f"{bar.get_height():.1f}" + ("" if gain is None or name == "onboard" else f"\n({gain:+.1f} pt)")
        axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if "onboard" in case["policies"]:
        axis.axhline(100 * case["policies"]["onboard"]["map"], color="#7f7f7f", linestyle="--", linewidth=1)
    axis.set_ylabel("mAP x100 (mean over cameras)")
    axis.set_title(f"mAP per policy: {case['scene']} x {case['trace']}")
    axis.set_ylim(0, max(values + [1.0]) * 1.25)
    axis.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)


def plot_configuration_timeline(result: CaseResult, path: Path) -> Path:
    """Per camera and frame: the planned configuration (colour) and whether it came back in time."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    scenario = result.case.scenario
    shown = [name for name in TIMELINE_POLICIES if name in result.runs] or list(result.runs)[:2]
    used = sorted({int(k) for name in shown for k in np.unique(result.runs[name].planned_config) if k != FALLBACK_INDEX})
    labels = ["on-car fallback"] + [scenario.config_names[k] for k in used]
    palette = ["#f0f0f0"] + [plt.get_cmap("tab20")(i % 20) for i in range(len(used))]
    colour_of = {FALLBACK_INDEX: 0, **{k: i + 1 for i, k in enumerate(used)}}
    figure, axes = plt.subplots(len(shown), 1, figsize=(11, 1.2 + 1.25 * len(shown) + 0.25 * len(labels)), squeeze=False)
    seconds = scenario.capture_ms / 1000.0
    extent = (0.0, float(seconds[-1] + scenario.frame_interval_ms / 1000.0) if len(seconds) else 1.0,
              len(scenario.cameras) - 0.5, -0.5)
    for axis, name in zip(axes[:, 0], shown, strict=True):
        run = result.runs[name]
        codes = np.vectorize(colour_of.get)(run.planned_config).T
        axis.imshow(codes, aspect="auto", interpolation="nearest", cmap=ListedColormap(palette),
                    vmin=0, vmax=len(palette) - 1, extent=extent)
        missed = np.argwhere((run.outcome.T != RequestOutcome.ON_TIME) & (run.planned_config.T != FALLBACK_INDEX))
        if missed.size:
            axis.scatter(seconds[missed[:, 1]] + scenario.frame_interval_ms / 2000.0, missed[:, 0],
                         marker="x", s=10, color="black", linewidths=0.7)
        axis.set_yticks(range(len(scenario.cameras)), scenario.cameras, fontsize=7)
        axis.set_title(f"{name}: planned configuration per camera (x = sent but not back in time, or never sent)", fontsize=9)
    axes[-1, 0].set_xlabel("scene time [s]")
    figure.legend(handles=[Patch(color=palette[i], label=label) for i, label in enumerate(labels)],
                  loc="lower center", ncol=3, fontsize=7, frameon=False)
    return save_figure(figure, path, rect=(0, 0.04 + 0.022 * ((len(labels) + 2) // 3), 1, 1))


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(document: dict, images: Sequence[Sequence[Path]], path: Path) -> Path:
    settings = document["settings"]
    parts = [f"# avcloud replay ({document['mode']})", "",
             f"RTT {settings['rtt_ms']:g} ms, SLO {settings['slo_ms']:g} ms, policies: {', '.join(settings['policies'])}. "
             f"mAP x100; overall = {settings['overall_map']}. Each policy is {settings['agent']}; cloud runtimes: "
             f"`{settings['cloud']}`; every policy's full spec is in results.json.", ""]
    for case, case_images in zip(document["cases"], images, strict=True):
        header, rows = table_rows(case)
        parts += [f"## {case_title(case)}", "", case["profile_note"], "", _markdown_table(header, rows), ""]
        parts += [f"![{image.stem}]({image.name})" for image in case_images] + [""]
    path.write_text("\n".join(parts))
    return path


def write_html(document: dict, images: Sequence[Sequence[Path]], path: Path) -> Path:
    settings = document["settings"]
    escape = html.escape
    body = [f"<h1>avcloud replay ({escape(document['mode'])})</h1>",
            f"<p>RTT {settings['rtt_ms']:g} ms, SLO {settings['slo_ms']:g} ms. mAP x100; overall = "
            f"{escape(settings['overall_map'])}.</p>"]
    for case, case_images in zip(document["cases"], images, strict=True):
        header, rows = table_rows(case)
        body.append(f"<h2>{escape(case_title(case))}</h2><p>{escape(case['profile_note'])}</p>")
        body += html_table(header, rows)
        body += html_images(case_images)
    return write_html_page(path, "avcloud replay", body)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    escape = html.escape
    return (["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
            + ["<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
            + ["</table>"])


def html_images(images: Sequence[Path]) -> list[str]:
    escape = html.escape
    return [f'<p><img src="{escape(image.name)}" alt="{escape(image.stem)}" style="max-width:100%"></p>'
            for image in images]


def show_report(document: dict, out_dir: Path, console: Console, as_json: bool, print_document) -> None:
    """What `replay` and `fleet` print when done: the results JSON (`--json`), or the tables and
    where the report folder is."""
    import json
    import sys

    if as_json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_document(document, console)
        console.print(f"report: {out_dir / 'summary.html'} (results.json, summary.md, plots)")


def write_html_page(path: Path, title: str, body: Sequence[str], width_px: int = 1100) -> Path:
    """A report page: the body parts (already HTML) with the reports' table style."""
    style = (f"body{{font-family:sans-serif;max-width:{width_px}px;margin:2em auto}}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return path
