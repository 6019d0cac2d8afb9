"""The benchmark's outputs: JSON for machines, a Markdown table and a PNG chart for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: list[dict[str, Any]], *, lost: bool = False) -> list[str]:
    head = "| contender | rows/s | vs raw | CPU s / 100k rows | peak RSS MB | p50 ms | p99 ms |"
    if lost:
        head = "| contender | seconds | rows/s | items resent | rows lost | CPU s / 100k rows |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {' '.join(r['error'])[:80]} |")
        elif lost:
            lines.append(
                f"| {r['contender']} | {_fmt(r['seconds'], 2)} | {_fmt(r['rows_per_s'])} | "
                f"{_fmt(r.get('resent_items'))} | {_fmt(r.get('rows_lost'))} | "
                f"{_fmt(r['cpu_s_per_100k'], 2)} |"
            )
        else:
            lines.append(
                f"| {r['contender']} | {_fmt(r['rows_per_s'])} | {_fmt(r.get('vs_raw'), 2)} | "
                f"{_fmt(r['cpu_s_per_100k'], 2)} | {_fmt(r['peak_rss_mb'])} | "
                f"{_fmt(r['p50_ms'], 1)} | {_fmt(r['p99_ms'], 1)} |"
            )
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    machine = report["machine"]
    md = [
        f"# Benchmark results\n\n`{report['command']}` on {machine['cpus']} CPUs, "
        f"Python {machine['python']}, "
        f"{machine['platform']}; {report['rows']:,} rows in {report['tables']} tables.\n",
        "## Un-throttled, fast sink\n",
        *table(report["unthrottled"]),
        "\nSink CPU share (sink CPU seconds / wall seconds), per contender: "
        + ", ".join(
            f"{r['contender']} {_fmt(r.get('sink_cpu_share'), 2)}"
            for r in report["unthrottled"]
            if "error" not in r
        ),
        "\n## 20% of items returned as UnprocessedItems\n",
        *table(report["unprocessed_20pct"], lost=True),
        "\n## Worker write stage by MAX_IN_FLIGHT\n",
        "| MAX_IN_FLIGHT | rows/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {r['max_in_flight']} | {_fmt(r.get('rows_per_s'))} | "
            f"{_fmt(r.get('p50_ms'), 1)} | {_fmt(r.get('p99_ms'), 1)} |"
            for r in report["scaling"]
        ),
        "\n## Against moto's server\n",
        *table(report["moto"]),
        "\n## Memory: peak RSS of `worker load FILE` over a 1,000-row file's\n",
        "| path | decoded MB | rows | peak RSS MB | over baseline / decoded |",
        "|---|---|---|---|---|",
        *(
            f"| {m['path']} | {m['decoded_mb']} | {_fmt(m['rows'])} | {m['peak_rss_mb']} | "
            f"{m['over_baseline_ratio']} |"
            for m in report["memory"]
        ),
        '\n## Cold start\n\n`python -X importtime -c "import lambda_entry"`: '
        f"{report['cold_start']['import_lambda_entry_ms']:.0f} ms "
        f"(wall, measured in-process: {report['cold_start']['import_wall_ms']:.0f} ms).",
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    _chart(report, out / "results.png")


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, key, title in (
        (axes[0], "unthrottled", "un-throttled"),
        (axes[1], "unprocessed_20pct", "20% UnprocessedItems"),
    ):
        rows = [r for r in report[key] if "rows_per_s" in r]
        names = [r["contender"] for r in rows]
        values = [r["rows_per_s"] for r in rows]
        colors = ["#1f77b4" if n.startswith("worker") else "#999999" for n in names]
        axis.barh(names, values, color=colors)
        axis.invert_yaxis()
        axis.set_title(f"{title}: rows/s ({report['rows']:,} rows)")
        axis.set_xlabel("rows per second (higher is better)")
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
