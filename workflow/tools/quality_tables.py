"""docs/QUALITY.md's tables and figures from `quality matrix` results: mean +- standard deviation over
the training seeds (sample standard deviation, n - 1), one table per resolution (ours and the reference
recipes), one for the sampler sweep and one for the recipe variants (`--variants`) against ours."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from workflow.core.config import params_from_dict
from workflow.pages.curves import errorbar_plot_png
from workflow.tools.quality_jobs import (
    OURS,
    RECIPES,
    RESULTS,
    defaults,
    measured_rate,
    read_results,
    sampled_with,
    sampling_label,
    settings_key,
)

REFERENCE_RECIPE = "tutorial"  # what the target ratio is taken against
COMPARED = {OURS, *(Path(p).stem for p in RECIPES)}  # the budget tables' recipes; any other is a variant of ours


def collect(folders: list[str]) -> list[dict]:
    """Every scored row, by job name and sampler (a later folder's row replaces an earlier one's), each measurement
    once: a sweep job that samples a model as its training job already did (the default sampler in the
    sweep) repeats that row, and the training job's is kept."""
    rows = {}
    for folder in folders:
        if not (Path(folder) / RESULTS).is_file():  # a mistyped folder would otherwise drop its rows unseen
            raise SystemExit(f"quality tables: {folder} has no {RESULTS}: not a `quality matrix` --out folder")
        for row in read_results(folder):  # a job name may be scored under two samplers (the default changed)
            key = (row["name"], sampling_label(row["sampled_with"]))
            if key in rows and rows[key].get("recipe_key") != row.get("recipe_key"):
                raise SystemExit(
                    f"quality tables: {folder} scored job {key[0]} ({key[1]}) with other recorded recipe settings "
                    f"than an earlier folder's job of that name ({settings(row)} against {settings(rows[key])}; "
                    "unrecorded: scored before rows recorded them): table them apart"
                )
            rows[key] = row
    measured = {}
    for row in sorted(rows.values(), key=lambda r: r["sampler"] is not None):  # training jobs first
        key = (row["recipe"], row["resolution"], row["budget"], row["seed"], sampling_label(row["sampled_with"]))
        measured.setdefault(key, row)
    check_alike(list(measured.values()))
    return list(measured.values())


def settings(row: dict) -> str:
    """A row's recipe settings as its `recipe_key`; rows scored before they recorded one say so."""
    return row.get("recipe_key") or "unrecorded"


def check_alike(rows: list[dict]) -> None:
    """The seeds a table cell averages must be one setup: the same steps, sample and reference counts. And a
    recipe's rows must all have trained with one recipe's settings (a row that did not record them differs
    from one that did): "ours" before and after a default changed are two recipes under one name."""
    setups, recipes = defaultdict(set), defaultdict(set)
    for r in rows:
        key = (r["recipe"], r["resolution"], r["budget"], sampling_label(r["sampled_with"]))
        setups[key].add((r["steps"], r.get("fid_num_samples"), r.get("fid_num_reference")))
        recipes[r["recipe"]].add(settings(r))
    unlike = {key: sorted(found) for key, found in setups.items() if len(found) > 1}
    if unlike:
        raise SystemExit(
            "quality tables: these cells would average unlike runs ((steps, samples, reference images) differ "
            f"between seeds): {unlike}; leave out the folder of the older setup"
        )
    renamed = {name: sorted(found) for name, found in recipes.items() if len(found) > 1}
    if renamed:
        raise SystemExit(
            f"quality tables: rows of one recipe name with other recorded recipe settings (recipe_key; "
            f"unrecorded: scored before rows recorded them): {renamed}; table those folders apart"
        )


def spread(values: list) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the finite values; sd is nan below two."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def cell(values: list, digits: int = 1) -> str:
    """mean ± sd to `digits` decimals, or to the sd's first significant digit where it would round to 0;
    n shown unless it is the three seeds."""
    mean, sd, n = spread(values)
    if n == 0:
        return "-"
    if sd <= 1e-9 * max(1.0, abs(mean)):  # equal values, up to the float noise of their mean
        sd = 0.0
    if n > 1 and sd > 0 and round(sd, digits) == 0:
        digits = -math.floor(math.log10(sd))
    text = f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text if n == 3 else f"{text} (n={n})"


def budget_groups(rows: list[dict]) -> dict:
    """{(resolution, budget, recipe, sampling label): [rows over seeds]}: the training jobs under their
    recipe's sampler, and the sweep jobs under theirs."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["resolution"], r["budget"], r["recipe"], sampling_label(r["sampled_with"]))].append(r)
    return groups


def present_defaults(rows: list[dict], key: str) -> list[str]:
    """The variants whose rows trained with params.yaml's present settings (recipe_key `key`), where ours'
    rows did not: a default that moved is measured as a variant, to keep its rows apart from those of the
    default before, and the budget tables and figures show it as today's default."""
    if any(r["recipe"] == OURS and r.get("recipe_key") == key for r in rows):
        return []
    return sorted({r["recipe"] for r in rows if r["recipe"] not in COMPARED and r.get("recipe_key") == key})


def budget_series(rows: list[dict], resolution: int, recipes: list[str], default: str) -> list[tuple[str, str]]:
    """The (recipe, sampling) columns of a resolution's table: each recipe under the samplers its training
    jobs used (the default sampler, params.yaml's, first), and the first recipe (today's default) under the
    default sampler first of all."""
    used = {(r["recipe"], sampling_label(r["sampled_with"])) for r in rows if r["resolution"] == resolution}
    trained = {(r["recipe"], sampling_label(r["sampled_with"])) for r in rows if r["sampler"] is None}
    series = [(recipes[0], default)] if (recipes[0], default) in used else []
    return series + sorted(
        (pair for pair in trained if pair in used and pair not in series),
        key=lambda p: (recipes.index(p[0]), p[1] != default, p[1]),
    )


def budget_curves(rows: list[dict], resolution: int, recipes: list[str], default: str, names: dict) -> list:
    """The budget table's columns as curves: (legend, budgets, mean FIDs, their sds)."""
    groups = budget_groups(rows)
    curves = []
    for recipe, label in budget_series(rows, resolution, recipes, default):
        points = sorted(
            (b, spread([x["fid"] for x in g]))
            for (res, b, *pair), g in groups.items()
            if res == resolution and pair == [recipe, label]
        )
        curves.append(
            (
                f"{names.get(recipe, recipe)} ({label})",
                np.array([b for b, _ in points]),
                np.array([s[0] for _, s in points]),
                np.nan_to_num(np.array([s[1] for _, s in points])),
            )
        )
    return curves


def ratio_cell(ours: list[dict], ref: list[dict]) -> str:
    """Mean FID ratio, and whether the two means are further apart than their error bars (either way)."""
    mo, so, no = spread([r["fid"] for r in ours])
    mr, sr, nr = spread([r["fid"] for r in ref])
    if not (no and nr):
        return "-"
    separated = no > 1 and nr > 1 and abs(mo - mr) > so + sr
    return f"{mo / mr:.2f}x" + (" (separated)" if separated else "")


def budget_table(
    rows: list[dict], resolution: int, recipes: list[str], rates: dict, default: str, names: dict | None = None
) -> str:
    """FID against budget for `recipes`, the first (today's default) against the tutorial's; `names`: what a
    recipe is called in the table, where not its own name."""
    name = lambda recipe: (names or {}).get(recipe, recipe)  # noqa: E731
    groups = budget_groups(rows)
    series = budget_series(rows, resolution, recipes, default)
    reference = next((pair for pair in series if pair[0] == REFERENCE_RECIPE), None)
    budgets = sorted({b for (res, b, _, _) in groups if res == resolution})
    head = ["budget (min)"] + [f"{name(r)} FID ({label})" for r, label in series]
    head += [f"{name(recipes[0])} ({default}) / {REFERENCE_RECIPE}"] if reference else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in budgets:
        cells = [f"{b:g}"] + [cell([x["fid"] for x in groups.get((resolution, b, *pair), [])]) for pair in series]
        if reference:
            ours = groups.get((resolution, b, recipes[0], default), [])
            cells.append(ratio_cell(ours, groups.get((resolution, b, *reference), [])))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| budget (min) | recipe | sampler | steps | FID | KID | precision | recall | FID, 250 vs 250 |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    for b in budgets:
        for r, label in series:
            g = groups.get((resolution, b, r, label), [])
            if not g:
                continue
            lines.append(
                f"| {b:g} | {name(r)} | {label} | {g[0]['steps']:,} | {cell([x['fid'] for x in g])} | "
                f"{cell([x['kid'] for x in g], 4)} | {cell([x['precision'] for x in g], 3)} | "
                f"{cell([x['recall'] for x in g], 3)} | {cell([x.get('fid_default_size') for x in g])} |"
            )
    shown = [r for r in recipes if any(pair[0] == r for pair in series)]
    keys = {r["recipe"]: r.get("recipe_key") for r in rows}  # one per recipe (check_alike)
    rate_line = ", ".join(f"{name(r)} {_num(measured_rate(rates, r, resolution, keys.get(r)), 2)}" for r in shown)
    return "\n".join(lines) + f"\n\nSteps per second on the rates' CPU at {resolution} px: {rate_line}.\n"


def sampler_table(rows: list[dict], rates: dict, default: str) -> tuple[str, list]:
    """Every sampler tried on our models at the sweep's budget and resolution, mean +- sd over the seeds'
    models that have it; the cost is the sample stage's CPU seconds from the rates file."""
    sweep = [r for r in rows if r["sampler"] is not None]
    if not sweep:
        return "", {}
    # the sweep's budget: a sampler also tried on a few shorter-trained models must not move the table there
    labels = defaultdict(set)
    for r in sweep:
        labels[(r["resolution"], r["budget"])].add(sampling_label(r["sampled_with"]))
    where = max(labels, key=lambda k: (len(labels[k]), k[1]))
    groups = defaultdict(list)
    for r in rows:
        if r["recipe"] == OURS and (r["resolution"], r["budget"]) == where:
            groups[sampling_label(r["sampled_with"])].append(r)
    # the rates file timed sampling at one resolution: no cost for a sweep at another
    timed_here = rates.get("sampling_resolution") in (None, where[0])
    per_image = rates.get("sampling_seconds_per_image", {}) if timed_here else {}
    lines = [
        f"Our recipe's {where[1]:g}-minute models at {where[0]} px; a cell is mean ± sd over the seeds' models.",
        "",
        "| sampler | eta | steps | seeds | FID | KID | precision | recall | CPU s / 1000 images | FID x CPU s |",
        "|---|---:|---:|---|---|---|---|---|---:|---:|",
    ]
    series = defaultdict(list)
    for label, g in sorted(groups.items(), key=lambda kv: _order(kv[1][0]["sampled_with"])):
        w = g[0]["sampled_with"]
        key = f"{w['sampler']}-eta{w['eta'] or 0:g}"
        cpu = per_image.get(key, {}).get(str(w["steps"]))
        cpu_k = None if cpu is None else 1000 * cpu
        fid_mean, fid_sd, _ = spread([x["fid"] for x in g])
        sampler = w["sampler"] + (f", {w['spacing']}" if "spacing" in w else "")
        name = f"{sampler}{' (the default)' if label == default else ''}"
        eta = "" if w["eta"] is None else f"{w['eta']:g}"
        lines.append(
            f"| {name} | {eta} | {w['steps']} | {', '.join(str(x['seed']) for x in sorted(g, key=_seed))} | "
            f"{cell([x['fid'] for x in g], 2)} | {cell([x['kid'] for x in g], 4)} | "
            f"{cell([x['precision'] for x in g], 3)} | {cell([x['recall'] for x in g], 3)} | {_num(cpu_k, 1)} | "
            f"{_num(cpu_k and cpu_k * fid_mean, 0)} |"
        )
        legend = sampler if w["eta"] is None else f"{sampler}, eta {w['eta']:g}"
        series[legend].append((w["steps"], fid_mean, np.nan_to_num(fid_sd), cpu_k))
    return "\n".join(lines) + "\n", series


def variants_table(rows: list[dict], default: str) -> str:
    """Each variant of our recipe beside ours trained at the same resolution, budget and seeds (the
    variants' seeds only; under the default sampler, as the variants are sampled), and the ratio of their
    mean FIDs."""
    lines = [
        "| variant | px | budget (min) | seeds | steps | FID | KID | precision | recall | FID / ours (same seeds) |",
        "|---|---:|---:|---|---:|---|---|---|---|---|",
    ]
    # ours under the default sampler may be a sweep job's row (its model trained under an older default)
    usable = [r for r in rows if (r["sampler"] is None or r["recipe"] == OURS)]
    usable = [r for r in usable if sampling_label(r["sampled_with"]) == default]
    variants = sorted({r["recipe"] for r in rows if r["sampler"] is None} - COMPARED)
    for res, budget in sorted({(r["resolution"], r["budget"]) for r in usable if r["recipe"] in variants}):
        here = [r for r in usable if (r["resolution"], r["budget"]) == (res, budget)]
        tried = {r["seed"] for r in here if r["recipe"] in variants}
        for name in [OURS, *variants]:
            g = sorted((r for r in here if r["recipe"] == name and r["seed"] in tried), key=_seed)
            if not g:
                continue
            seeds = {r["seed"] for r in g}
            ours = [r for r in here if r["recipe"] == OURS and r["seed"] in seeds]
            ratio = (
                "-"
                if name == OURS or len(ours) != len(g)
                else f"{spread([r['fid'] for r in g])[0] / spread([r['fid'] for r in ours])[0]:.2f}x"
            )
            lines.append(
                f"| {name} | {res} | {budget:g} | {', '.join(str(r['seed']) for r in g)} | {g[0]['steps']:,} | "
                f"{cell([r['fid'] for r in g], 2)} | {cell([r['kid'] for r in g], 4)} | "
                f"{cell([r['precision'] for r in g], 3)} | {cell([r['recall'] for r in g], 3)} | {ratio} |"
            )
    return "\n".join(lines) + "\n" if variants else ""


def _seed(row: dict) -> int:
    return row["seed"]


def _order(w: dict) -> tuple:
    return (w["sampler"], w.get("spacing", ""), w["eta"] or 0, w["steps"])


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(folders: list[str], rates: dict, figures: str | None) -> str:
    everything = collect(folders)
    today = present_defaults(everything, settings_key(defaults(), {}))
    rows = [r for r in everything if r["recipe"] in COMPARED or r["recipe"] in today]
    recipes = today + [OURS] + sorted({r["recipe"] for r in rows} - {OURS, *today})
    names = {name: f"{name} (params.yaml)" for name in today}
    if today:
        names[OURS] = "ours (earlier params.yaml)"
    default = sampling_label(sampled_with(params_from_dict(defaults()).sample))
    out = []
    for res in sorted({r["resolution"] for r in rows if r["sampler"] is None}):
        out += [
            f"### {res} px: FID against training minutes on the CPU",
            "",
            budget_table(rows, res, recipes, rates, default, names),
        ]
        if figures:
            write(
                figures,
                f"fid_vs_minutes_r{res}.png",
                errorbar_plot_png(
                    budget_curves(rows, res, recipes, default, names),
                    "training minutes on the CPU",
                    "FID (1,000 samples)",
                ),
            )
    variants = variants_table(everything, default)
    if variants:
        out += ["### Recipe variants", "", variants]
    table, series = sampler_table(rows, rates, default)
    if series:
        out += ["### Samplers and steps", "", table]
        if figures:
            lines = [
                (
                    name,
                    np.array([c for *_, c in pts], dtype=float),
                    np.array([f for _, f, _, _ in pts]),
                    np.array([sd for _, _, sd, _ in pts]),
                )
                for name, pts in series.items()
                if all(c is not None for *_, c in pts)
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
