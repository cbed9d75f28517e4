"""What a fleet run leaves behind, in the replay report's style: a terminal table, results.json,
PNG plots (mAP against fleet size, mAP per vehicle, the shared resources) and summary.md/.html."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from avcloud.replay.report import (
    POLICY_COLOURS,
    html_images,
    html_table,
    pyplot,
    save_figure,
    write_html_page,
)

EXTRA_COLOURS = {"cell": "#8c564b"}


def _colour(policy: str) -> str:
    return POLICY_COLOURS.get(policy) or EXTRA_COLOURS.get(policy, "#333333")


def _workers(value) -> str:
    return "unlimited" if value is None else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _fixed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    header = ["trace", "GPUs", "vehicles", "policy", "mAP", "worst", "p10", "median", "best", "gain [pt]",
              "Jain mAP", "Jain gain", "GPU util", "goodput [/s]", "deadline miss", "uplink util"]
    rows = []
    for point in document["points"]:
        figures = point["map"]
        rows.append([
            point["trace"], _workers(point["workers"]), str(point["vehicles"]), point["policy"],
            f"{100 * figures['mean']:.1f}", f"{100 * figures['min']:.1f}", f"{100 * figures['p10']:.1f}",
            f"{100 * figures['median']:.1f}", f"{100 * figures['max']:.1f}", f"{point['gain_points']['mean']:+.1f}",
            _fixed(point["jain_map"], 3), _fixed(point.get("jain_gain"), 2), _percent(point["gpu_utilisation"]) if point["workers"] is not None
            else f"{point['gpu_busy_workers_mean']:.1f} busy", f"{point['cloud_goodput_per_s']:.1f}",
            _percent(point["deadline_miss_rate"]), _percent(point["uplink_utilisation"]),
        ])
    return header, rows


def break_even_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    threshold = document["settings"]["break_even_points"]
    header = ["trace", "GPUs", "policy", f"break-even fleet size (gain < {threshold:g} pt)"]
    rows = []
    for entry in document["break_even"]:
        vehicles = entry["vehicles"]
        rows.append([entry["trace"], _workers(entry["workers"]), entry["policy"],
                     str(vehicles) if vehicles is not None else f"> {entry['largest_fleet_tried']}"])
    return header, rows


def caption(document: dict) -> str:
    settings = document["settings"]
    scenes = ", ".join(f"{scene['name']} ({scene['frames']} frames x {len(scene['cameras'])} cameras)"
                       for scene in document["scenes"])
    onboard = {round(100 * point["onboard_map_mean"], 1) for point in document["points"]}
    return (f"fleet: {scenes}; cell scheduler {settings['scheduler']}, phases {settings['phase']}; RTT "
            f"{settings['rtt_ms']:g} ms, SLO {settings['slo_ms']:g} ms, cloud runtimes '{settings['cloud']}'; "
            f"mAP x100 per vehicle (distribution over the fleet); gain over on-car only (on-car mAP "
            f"{', '.join(f'{value:.1f}' for value in sorted(onboard))}); Jain's fairness index of per-vehicle mAP "
            f"and of per-vehicle gain; "
            f"deadline miss = late / sent cloud requests; goodput = cloud results on time per second")


def print_tables(document: dict, console: Console) -> None:
    header, rows = table_rows(document)
    table = Table(title="avcloud fleet", caption=escape_markup(caption(document)))
    for position, column in enumerate(header):
        table.add_column(escape_markup(column), justify="left" if position in (0, 3) else "right")
    for row in rows:
        table.add_row(*(escape_markup(cell) for cell in row))
    console.print(table)
    header, rows = break_even_rows(document)
    table = Table(title="where offloading stops paying")
    for position, column in enumerate(header):
        table.add_column(escape_markup(column), justify="left" if position in (0, 2) else "right")
    for row in rows:
        table.add_row(*(escape_markup(cell) for cell in row))
    console.print(table)


def write_report(document: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    written[0].write_text(json.dumps(document, indent=2) + "\n")
    images = [plot_map_vs_fleet_size(document, out_dir / "map_vs_fleet_size.png"),
              plot_map_per_vehicle(document, out_dir / "map_per_vehicle.png"),
              plot_shared_resources(document, out_dir / "shared_resources.png")]
    written += images
    written.append(write_markdown(document, images, out_dir / "summary.md"))
    written.append(write_html(document, images, out_dir / "summary.html"))
    return written


def _panels(document: dict) -> list[tuple[str, object]]:
    return list(dict.fromkeys((point["trace"], point["workers"]) for point in document["points"]))


def _fleet_size_axis(axis, document: dict) -> None:
    """Fleet sizes on a log-2 axis, labelled with the sizes simulated."""
    sizes = sorted({point["vehicles"] for point in document["points"]})
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.minorticks_off()
    axis.set_xlabel("vehicles in the cell")


def _series(document: dict, trace: str, workers, policy: str) -> list[dict]:
    return sorted((point for point in document["points"]
                   if point["trace"] == trace and point["workers"] == workers and point["policy"] == policy),
                  key=lambda point: point["vehicles"])


def plot_map_vs_fleet_size(document: dict, path: Path) -> Path:
    """Mean mAP per vehicle against fleet size (band: 10th to 90th percentile; dotted: the worst
    vehicle), one panel per trace and pool, with the on-car mAP for reference."""
    plt = pyplot()
    panels = _panels(document)
    policies = document["settings"]["policies"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, (trace, workers) in zip(axes[0], panels, strict=True):
        onboard = None
        for policy in policies:
            series = _series(document, trace, workers, policy)
            if not series:
                continue
            sizes = [point["vehicles"] for point in series]
            colour = _colour(policy)
            axis.plot(sizes, [100 * point["map"]["mean"] for point in series], marker="o", color=colour, label=policy)
            axis.fill_between(sizes, [100 * point["map"]["p10"] for point in series],
                              [100 * point["map"]["p90"] for point in series], color=colour, alpha=0.15)
            axis.plot(sizes, [100 * point["map"]["min"] for point in series], linestyle=":", color=colour)
            onboard = 100 * series[0]["onboard_map_mean"]
        if onboard is not None:
            axis.axhline(onboard, color="#7f7f7f", linestyle="--", linewidth=1, label="on-car only")
        _fleet_size_axis(axis, document)
        axis.set_ylabel("mAP x100 per vehicle")
        axis.set_title(f"{trace}, GPU pool {_workers(workers)}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("mAP against fleet size (line: mean; band: 10th-90th percentile; dotted: worst vehicle)",
                    fontsize=10)
    return save_figure(figure, path)


def plot_map_per_vehicle(document: dict, path: Path) -> Path:
    """The distribution of per-vehicle mAP at each fleet size, one row per policy."""
    plt = pyplot()
    panels = _panels(document)
    policies = document["settings"]["policies"]
    figure, axes = plt.subplots(len(policies), len(panels), figsize=(6.5 * len(panels), 2.8 * len(policies)),
                                squeeze=False)
    for row, policy in enumerate(policies):
        for column, (trace, workers) in enumerate(panels):
            axis = axes[row, column]
            series = _series(document, trace, workers, policy)
            data = [[100 * vehicle["map"] for vehicle in point["per_vehicle"]] for point in series]
            if data:
                parts = axis.boxplot(data, widths=0.6, patch_artist=True, showfliers=True)
                axis.set_xticks(range(1, len(data) + 1), [str(point["vehicles"]) for point in series])
                for box in parts["boxes"]:
                    box.set_facecolor(_colour(policy))
                    box.set_alpha(0.5)
                axis.axhline(100 * series[0]["onboard_map_mean"], color="#7f7f7f", linestyle="--", linewidth=1)
            axis.set_title(f"{policy}: {trace}, GPU pool {_workers(workers)}", fontsize=9)
            axis.set_ylabel("mAP x100")
            axis.grid(axis="y", alpha=0.3)
        axes[row, 0].set_xlabel("vehicles in the cell")
    return save_figure(figure, path)


def plot_shared_resources(document: dict, path: Path) -> Path:
    """GPU utilisation, uplink utilisation and the deadline-miss rate against fleet size."""
    plt = pyplot()
    panels = _panels(document)
    policies = document["settings"]["policies"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ["-", "--", "-.", ":"]
    for number, (trace, workers) in enumerate(panels):
        for policy in policies:
            series = _series(document, trace, workers, policy)
            if not series:
                continue
            sizes = [point["vehicles"] for point in series]
            label = policy if len(panels) == 1 else f"{policy}, {trace}, pool {_workers(workers)}"
            style = dict(color=_colour(policy), linestyle=styles[number % len(styles)], marker="o", label=label)
            gpu = [point["gpu_utilisation"] if point["gpu_utilisation"] is not None else np.nan for point in series]
            axes[0].plot(sizes, [100 * value for value in gpu], **style)
            axes[1].plot(sizes, [100 * (point["uplink_utilisation"] or 0.0) for point in series], **style)
            axes[2].plot(sizes, [100 * (point["deadline_miss_rate"] or 0.0) for point in series], **style)
    for axis, title in zip(axes, ("GPU utilisation [%]", "uplink utilisation [%]", "deadline miss [% of sent]"),
                           strict=True):
        _fleet_size_axis(axis, document)
        axis.set_title(title, fontsize=10)
        axis.set_ylim(0, 105)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(figure, path)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(document: dict, images: Sequence[Path], path: Path) -> Path:
    header, rows = table_rows(document)
    be_header, be_rows = break_even_rows(document)
    parts = ["# avcloud fleet", "", caption(document) + ".", "", _markdown_table(header, rows), "",
             "## Where offloading stops paying", "", _markdown_table(be_header, be_rows), ""]
    parts += [f"![{image.stem}]({image.name})" for image in images] + [""]
    path.write_text("\n".join(parts))
    return path


def write_html(document: dict, images: Sequence[Path], path: Path) -> Path:
    escape = html.escape
    body = ["<h1>avcloud fleet</h1>", f"<p>{escape(caption(document))}.</p>"]
    for title, (header, rows) in (("", table_rows(document)), ("Where offloading stops paying", break_even_rows(document))):
        if title:
            body.append(f"<h2>{escape(title)}</h2>")
        body += html_table(header, rows)
    body += html_images(images)
    return write_html_page(path, "avcloud fleet", body, width_px=1200)
