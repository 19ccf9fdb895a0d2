"""docs/QUALITY.md's tables and figures from `quality matrix` results: mean +- standard deviation over
the training seeds (sample standard deviation, n - 1), one table per resolution and one for the
sampler sweep."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from workflow.pages.curves import errorbar_plot_png
from workflow.tools.quality_jobs import OURS, read_results

REFERENCE_RECIPE = "tutorial"  # what the target ratio is taken against


def collect(folders: list[str]) -> list[dict]:
    """Every scored row, by job name (a later folder's row replaces an earlier one's)."""
    rows = {}
    for folder in folders:
        for row in read_results(folder):
            rows[row["name"]] = row
    return list(rows.values())


def spread(values: list) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the finite values; sd is nan below two."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def cell(values: list, digits: int = 1) -> str:
    mean, sd, n = spread(values)
    if n == 0:
        return "-"
    text = f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text if n == 3 else f"{text} (n={n})"


def budget_groups(rows: list[dict]) -> dict:
    """{(resolution, budget, recipe): [rows over seeds]} of the training jobs."""
    groups = defaultdict(list)
    for r in rows:
        if r["sampler"] is None:
            groups[(r["resolution"], r["budget"], r["recipe"])].append(r)
    return groups


def ratio_cell(ours: list[dict], ref: list[dict]) -> str:
    """Mean FID ratio, and whether the two means are further apart than their error bars."""
    mo, so, no = spread([r["fid"] for r in ours])
    mr, sr, nr = spread([r["fid"] for r in ref])
    if not (no and nr):
        return "-"
    separated = no > 1 and nr > 1 and mo + so < mr - sr
    return f"{mo / mr:.2f}x" + (" (separated)" if separated else "")


def budget_table(rows: list[dict], resolution: int, recipes: list[str], steps_per_second: dict) -> str:
    groups = budget_groups(rows)
    budgets = sorted({b for (res, b, _) in groups if res == resolution})
    head = ["budget (min)"] + [f"{r} FID" for r in recipes] + [f"ours / {REFERENCE_RECIPE}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in budgets:
        cells = [f"{b:g}"] + [cell([x["fid"] for x in groups.get((resolution, b, r), [])]) for r in recipes]
        cells.append(
            ratio_cell(groups.get((resolution, b, OURS), []), groups.get((resolution, b, REFERENCE_RECIPE), []))
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| budget (min) | recipe | steps | FID | KID | precision | recall | FID, 250 vs 250 |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for b in budgets:
        for r in recipes:
            g = groups.get((resolution, b, r), [])
            if not g:
                continue
            lines.append(
                f"| {b:g} | {r} | {g[0]['steps']:,} | {cell([x['fid'] for x in g])} | "
                f"{cell([x['kid'] for x in g], 4)} | {cell([x['precision'] for x in g], 3)} | "
                f"{cell([x['recall'] for x in g], 3)} | {cell([x.get('fid_default_size') for x in g])} |"
            )
    rate_line = ", ".join(f"{r} {steps_per_second[r][str(resolution)]:.2f}" for r in recipes)
    return "\n".join(lines) + f"\n\nSteps per second on the rates' CPU at {resolution} px: {rate_line}.\n"


def sampler_table(rows: list[dict], rates: dict) -> tuple[str, list]:
    sweep = [r for r in rows if r["sampler"] is not None]
    per_image = rates.get("sampling_seconds_per_image", {})
    lines = [
        "| sampler | eta | steps | FID | KID | precision | recall | CPU s / 1000 images | FID x CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    series = defaultdict(list)
    for r in sorted(sweep, key=lambda r: (r["sampler"], r["eta"], r["sampling_steps"])):
        key = f"{r['sampler']}-eta{r['eta']:g}"
        cpu = per_image.get(key, {}).get(str(r["sampling_steps"]))
        cpu_k = None if cpu is None else 1000 * cpu
        lines.append(
            f"| {r['sampler']} | {r['eta']:g} | {r['sampling_steps']} | {r['fid']:.2f} | {r['kid']:.4f} | "
            f"{_num(r['precision'], 3)} | {_num(r['recall'], 3)} | {_num(cpu_k, 1)} | "
            f"{_num(cpu_k and cpu_k * r['fid'], 0)} |"
        )
        series[key].append((r["sampling_steps"], r["fid"], cpu_k))
    return "\n".join(lines) + "\n", series


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(folders: list[str], rates: dict, figures: str | None) -> str:
    rows = collect(folders)
    recipes = [OURS] + sorted({r["recipe"] for r in rows} - {OURS})
    out = []
    for res in sorted({r["resolution"] for r in rows if r["sampler"] is None}):
        out += [
            f"### {res} px: FID against training minutes on the CPU",
            "",
            budget_table(rows, res, recipes, rates["steps_per_second"]),
        ]
        if figures:
            groups = budget_groups(rows)
            series = []
            for recipe in recipes:
                points = sorted(
                    (b, spread([x["fid"] for x in g]))
                    for (r_, b, rec), g in groups.items()
                    if r_ == res and rec == recipe
                )
                if points:
                    x = np.array([b for b, _ in points])
                    series.append(
                        (
                            recipe,
                            x,
                            np.array([s[0] for _, s in points]),
                            np.nan_to_num(np.array([s[1] for _, s in points])),
                        )
                    )
            write(
                figures,
                f"fid_vs_minutes_r{res}.png",
                errorbar_plot_png(series, "training minutes on the CPU", "FID (1,000 samples)"),
            )
    table, series = sampler_table(rows, rates)
    if series:
        out += ["### Samplers on one model", "", table]
        if figures:
            lines = [
                (
                    name,
                    np.array([c for _, _, c in pts], dtype=float),
                    np.array([f for _, f, _ in pts]),
                    np.zeros(len(pts)),
                )
                for name, pts in series.items()
                if all(c is not None for _, _, c in pts)
            ]
            write(
                figures,
                "fid_vs_sampling_seconds.png",
                errorbar_plot_png(lines, "CPU seconds per 1,000 images", "FID (1,000 samples)", log_x=True),
            )
    return "\n".join(out)


def write(folder: str, name: str, png: bytes) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / name).write_bytes(png)
