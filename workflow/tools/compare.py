"""Experiment comparison: DVC experiments side by side on one self-contained page.

    python -m workflow compare                    # every experiment of the current commit
    python -m workflow compare lr-1e-3 steps-8    # only these: experiment names, revs or `workspace`
    python -m workflow compare --output reports/experiments.html
    make compare

Reads `dvc exp show --json` (row from the project root), and for each experiment its sample grid
and loss history as that experiment left them: DVC's file system at the experiment's rev, which
reads them from the local DVC cache. Writes reports/experiments.html: one row per experiment with
the params that differ among them, FID, KID, final loss and training images/s (sortable, the best
FID marked), FID against each swept numeric param (the best starred), the grids side by side, and
the loss and learning-rate curves overlaid in one plot.

An output the local cache lacks (a fresh clone, or an experiment pulled without its data) is marked
missing with the command that fetches it from the project's DVC remote: `python -m workflow pull` for the workspace
and the current commit, `dvc exp pull origin <name>` for an experiment. The metrics live in git, so
they are shown all the same.

Without names, the page shows the current commit's experiments, the commit itself if it holds
results, and the workspace if its results are not already one of those. A tool like `bench`, not
a pipeline stage: it reads what the pipeline made and changes nothing but its own page.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow.core.config import ConfigError, dotted_keys, paths_of
from workflow.formats import trainlog
from workflow.pages import curves
from workflow.pages.htmlpage import (
    Missing,
    data_uri,
    esc,
    fmt_number,
    fmt_scalar,
    page,
    pixel_image,
    png_size,
    section,
    write_page,
)

DEFAULT_OUTPUT = "reports/experiments.html"
THUMBNAIL_PX = 180
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)  # matplotlib's tab10: the table, the thumbnails and the curves agree
METRIC_COLUMNS = (  # metrics.json key, column title, format spec
    ("fid", "FID", ".2f"),
    ("kid", "KID", ".4g"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("train_loss_final", "final loss", ".4g"),
    ("train_images_per_second", "train images/s", ",.1f"),
)


@dataclass(frozen=True, eq=False)
class Experiment:
    """One row of `dvc exp show` (an experiment, a commit or the workspace) as it left its outputs."""

    name: str
    rev: str  # a commit sha, or "workspace"
    params: dict  # its params.yaml
    metrics: dict  # its metrics.json ({} when it has none)
    grid_png: bytes | None
    history: dict | None  # trainlog.parse_history's arrays
    problems: tuple = ()  # what could not be read, and why

    @property
    def fid(self) -> float:
        """The FID, or infinity where there is none (it ranks last)."""
        value = self.metrics.get("fid")
        return float(value) if _finite(value) else math.inf


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- what dvc knows


def exp_show(root: Path) -> list:
    """`dvc exp show --json` in `root`, parsed."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True
    )
    if done.returncode:
        raise ConfigError(f"`dvc exp show --json` failed in {root}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)


def exp_show_rows(shown: list) -> list:
    """[{name, rev, data, kind}] for the workspace, the baseline commit and its experiments, in dvc's order.
    An experiment still queued or running, or one that failed, is of kind "unfinished" with its `state`:
    dvc lists it with its new params but reads its outputs at the baseline, so its metrics, grid and
    curves would be the baseline's."""
    rows = []
    for entry in shown:
        if entry["rev"] == "workspace":
            rows.append({"name": "workspace", "rev": "workspace", "data": entry.get("data") or {}, "kind": "workspace"})
            continue
        rows.append(
            {
                "name": entry.get("name") or entry["rev"][:7],
                "rev": entry["rev"],
                "data": entry.get("data") or {},
                "kind": "commit",
            }
        )
        for experiment in entry.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state") or "success"
            for rev in experiment.get("revs") or []:
                done = state == "success" and not rev.get("error")
                rows.append(
                    {
                        "name": rev.get("name") or experiment.get("name") or rev["rev"][:7],
                        "rev": rev["rev"],
                        "data": rev.get("data") or {},
                        "kind": "experiment" if done else "unfinished",
                        "state": "failed" if rev.get("error") else state,
                    }
                )
    return rows


def row_params(row: dict) -> dict:
    return ((row["data"].get("params") or {}).get("params.yaml") or {}).get("data") or {}


def row_metrics(row: dict) -> dict:
    path = paths_of(row_params(row)).metrics
    return ((row["data"].get("metrics") or {}).get(path) or {}).get("data") or {}


def _same_results(a: dict, b: dict) -> bool:
    return row_params(a) == row_params(b) and row_metrics(a) == row_metrics(b)


def select(rows: list, wanted: list) -> list:
    """The rows named in `wanted` (name, rev prefix or `workspace`), in that order; without names, the
    experiments, the baseline commit if it has results, and the workspace if its results are new (not a
    recorded run's metrics, which edited params would otherwise be credited with).
    A run whose params and metrics equal an earlier one's (`make run` twice on one commit records the
    same cached results twice) is shown once, under the name dvc lists first."""
    running_here = any(r["kind"] == "unfinished" and r["rev"] == "workspace" for r in rows)
    if wanted:
        found = [_find(rows, name) for name in wanted]
        for row in found:
            if row["kind"] == "workspace" and running_here:
                raise ConfigError(
                    "the workspace: an experiment is running there, so its params are that run's and its "
                    "metrics an earlier run's; compare it once the run has ended"
                )
            if row["kind"] == "unfinished":
                raise ConfigError(
                    f"experiment {row['name']!r} is {row['state']}: it has no results of its own to compare "
                    "(`dvc queue status`, `dvc queue logs <name>`)"
                )
        return found
    chosen = []
    for row in rows:
        recorded = row["kind"] == "experiment" or (row["kind"] == "commit" and row_metrics(row))
        if recorded and not any(_same_results(row, other) for other in chosen):
            chosen.append(row)
    # an experiment running in the workspace: its params are new, its metrics not yet; and params edited
    # but not yet run: the metrics are still a recorded run's (the same to the last digit), not theirs
    workspace = [
        r
        for r in rows
        if r["kind"] == "workspace"
        and not running_here
        and row_metrics(r)
        and not any(row_metrics(r) == row_metrics(other) for other in chosen)
    ]
    return workspace + chosen


def _find(rows: list, wanted: str) -> dict:
    """The row named `wanted`, or the one whose rev starts with it (4 characters at least, like git's
    short hashes); a prefix two revs share is refused rather than one of them taken."""
    named = [row for row in rows if row["name"] == wanted]
    if named:
        return named[0]
    if len(wanted) >= 4:
        by_rev = [row for row in rows if row["rev"] != "workspace" and row["rev"].startswith(wanted)]
        if len(by_rev) > 1:
            matches = ", ".join(f"{r['name']} ({r['rev'][:12]})" for r in by_rev)
            raise ConfigError(f"{wanted!r} starts more than one experiment's rev: {matches}; give more of it")
        if by_rev:
            return by_rev[0]
    names = ", ".join(r["name"] for r in rows)
    raise ConfigError(f"no experiment {wanted!r} in `dvc exp show` of this commit; there are: {names}")


# ---------------------------------------------------------------- each experiment's files


def load_experiment(root: Path, row: dict) -> Experiment:
    """The row's grid and loss history, read through DVC at its rev (the workspace as it is)."""
    from dvc.api import DVCFileSystem

    params, problems = row_params(row), []
    paths = paths_of(params)
    fs = DVCFileSystem(str(root), rev=None if row["rev"] == "workspace" else row["rev"])
    fetch = fetch_command(row)
    grid = _decodable_png(_read(fs, paths.grid, problems, fetch), paths.grid, problems)
    history = _read_history(fs, paths.train_log, problems, fetch, row["name"])
    if not row_metrics(row):
        problems.append(f"{paths.metrics}: no metrics")
    return Experiment(row["name"], row["rev"], params, row_metrics(row), grid, history, tuple(problems))


def _decodable_png(data: bytes | None, path: str, problems: list) -> bytes | None:
    """`data` if it is a whole PNG; else None, the reason in `problems` (one damaged grid must not cost
    the page)."""
    import io

    from PIL import Image

    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"a {image.format} file, not a PNG")
            image.load()
    except Exception as exc:  # PIL's decode errors are of many types
        problems.append(f"{path}: not a readable PNG ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    return data


def _read_history(fs, log: str, problems: list, fetch: str, name: str) -> dict | None:
    """The loss and lr per step from the run's training log (the lr only when the loss is there); a
    damaged log is a problem of that experiment, not of the page."""
    loss = _read(fs, f"{log}/{trainlog.tsv(trainlog.LOSS)}", problems, fetch)
    lr = None if loss is None else _read(fs, f"{log}/{trainlog.tsv(trainlog.LR)}", problems, fetch)
    if lr is None:
        return None
    try:
        return trainlog.parse_history(loss.decode(), lr.decode(), f"{name}:{log}")
    except (ConfigError, UnicodeDecodeError) as exc:
        problems.append(f"{log}: {exc}")
        return None


def fetch_command(row: dict) -> str:
    """What fetches a row's outputs from the project's DVC remote into the local cache."""
    return f"dvc exp pull origin {row['name']}" if row["kind"] == "experiment" else "python -m workflow pull"


def _read(fs, path: str, problems: list, fetch: str) -> bytes | None:
    """The file at the row's rev, or None with the reason in `problems`: the run did not make it, or
    made it but the local DVC cache lacks it (then: the command that fetches it)."""
    from dvc_data.index import DataIndexDirError

    try:
        return fs.read_bytes(path)
    except DataIndexDirError:  # inside an output folder whose listing the cache lacks
        problems.append(f"{path}: not in the local DVC cache; fetch it with `{fetch}`")
    except (FileNotFoundError, IsADirectoryError) as exc:
        recorded = fs.exists(path)  # an output DVC records, whose data the cache lacks
        problems.append(
            f"{path}: not in the local DVC cache; fetch it with `{fetch}`"
            if recorded
            else f"{path}: {exc.strerror or exc}"
        )
    return None


def collect(root: Path, wanted: list) -> list:
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root}: not the root of a DVC project (no .dvc/); run `python -m workflow compare` there")
    every = exp_show_rows(exp_show(root))
    rows = select(every, wanted)
    unfinished = [f"{r['name']} ({r['state']})" for r in every if r["kind"] == "unfinished"]
    if unfinished and not wanted:
        print(f"compare: not shown, no results of their own yet: {', '.join(unfinished)}", file=sys.stderr)
    if not rows:
        raise ConfigError("no experiments with results in `dvc exp show`: run `make run` or `dvc exp run` first")
    return [load_experiment(root, row) for row in rows]


# ---------------------------------------------------------------- the page


def differing_params(experiments: list) -> list:
    """The dotted keys whose values are not the same in every experiment, in params.yaml order."""
    flats = [dotted_keys(e.params) for e in experiments]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    return [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for flat in flats}) > 1]


def ranked(experiments: list) -> list:
    """Best FID first; those without a FID last, in dvc's order."""
    return sorted(experiments, key=lambda e: e.fid)


def _sort_value(value) -> str:
    return repr(float(value)) if _finite(value) else ""


def _param_cell(value) -> str:
    return f'<td data-sort="{esc(json.dumps(value))}"><code>{fmt_scalar(value)}</code></td>'


def _metric_cell(value, spec: str, extra: str = "") -> str:
    """A number, sortable (an empty sort key, for a missing value, sorts last either way)."""
    return f'<td class="num" data-sort="{esc(_sort_value(value))}">{fmt_number(value, spec)}{extra}</td>'


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def table_section(experiments: list, colours: dict, keys: list, best: Experiment | None) -> str:
    # a long param name may wrap after its dots, so several params fit the width without scrolling;
    # the metrics' headings sit right, over their right-aligned numbers
    heads = [("", h) for h in ("experiment", "rev", *keys)] + [(' class="num"', t) for _, t, _ in METRIC_COLUMNS]
    head = "".join(f'<th{cls}><button type="button">{esc(h).replace(".", ".<wbr>")}</button></th>' for cls, h in heads)
    rows = []
    for e in experiments:
        flat = dotted_keys(e.params)
        cells = [
            f'<td data-sort="{esc(e.name)}">{_swatch(colours[e.name])}<strong>{esc(e.name)}</strong></td>',
            f'<td data-sort="{esc(e.rev)}"><code>{esc(e.rev[:7])}</code></td>',
        ]
        cells += [_param_cell(flat.get(k)) for k in keys]
        cells += [
            _metric_cell(
                e.metrics.get(key), spec, ' <span class="badge">best</span>' if key == "fid" and e is best else ""
            )
            for key, _, spec in METRIC_COLUMNS
        ]
        rows.append(f"<tr{' class=best' if e is best else ''}>{''.join(cells)}</tr>")
    note = "the params that differ among them" if keys else "no param differs among them"
    caption = (
        f'<p class="caption">{len(experiments)} experiment(s); columns: {note}, then the metrics. '
        "Click a column to sort by it.</p>"
    )
    table = (
        f'<div class="scroll"><table class="list sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    return section("Experiments", table + caption)


def grids_section(experiments: list, colours: dict, best: Experiment | None) -> str:
    cards = []
    for e in experiments:
        image = (
            pixel_image(e.grid_png, THUMBNAIL_PX, f"samples of {e.name}")[0]
            if e.grid_png
            else Missing("sample grid", _why_missing(e, paths_of(e.params).grid)).html()
        )
        badge = ' <span class="badge">best FID</span>' if e is best else ""
        cards.append(
            f'<figure class="thumb{" best" if e is best else ""}" style="border-top-color:{colours[e.name]}">'
            f"<figcaption>{_swatch(colours[e.name])}<strong>{esc(e.name)}</strong>{badge}<br>"
            f"FID {fmt_number(e.metrics.get('fid'), '.2f')}</figcaption>{image}</figure>"
        )
    return section("Samples", f'<div class="thumbs">{"".join(cards)}</div>')


def curves_section(experiments: list, colours: dict) -> str:
    rows = [(e.name, colours[e.name], e.history) for e in experiments if e.history is not None]
    lacking = [e.name for e in experiments if e.history is None]
    if not rows:
        return section(
            "Training curves", Missing("loss histories", "no experiment's training log could be read").html()
        )
    png = curves.overlay_plot_png(rows)
    width, height = png_size(png)
    img = (
        f'<img src="{data_uri(png)}" width="{width}" height="{height}" '
        'alt="training loss and learning rate of each experiment">'
    )
    note = f" No history for: {esc(', '.join(lacking))}." if lacking else ""
    caption = (
        "Loss on a log scale (each experiment's moving average; faint: per step) and the learning rate "
        f"below, one colour per experiment.{note}"
    )
    return section("Training curves", f"<figure>{img}<figcaption>{caption}</figcaption></figure>")


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweeps_section(experiments: list, keys: list, best: Experiment | None, comparable: bool = True) -> str:
    """FID against each differing numeric param (a sweep: `dvc exp run --queue -S key=a,b,c`), the best
    experiment starred; nothing when no param is numeric in every experiment with a FID. Points scored
    differently (not `comparable`) are drawn, and the caption says so."""
    scored = [e for e in experiments if math.isfinite(e.fid)]
    figures = []
    for key in keys:
        values = [dotted_keys(e.params).get(key) for e in scored]
        if len(scored) < 2 or not all(_numeric(v) for v in values):
            continue
        star = (dotted_keys(best.params)[key], best.fid) if best in scored else None
        png = curves.sweep_plot_png(key, np.array(values, dtype=float), np.array([e.fid for e in scored]), best=star)
        width, height = png_size(png)
        caption = f"FID against <code>{esc(key)}</code>, one point per experiment" + (
            f"; best: <strong>{esc(best.name)}</strong> ({esc(key)} = {fmt_scalar(star[0])}, FID {best.fid:.2f})"
            if star
            else ""
        )
        caption += "" if comparable else "; <strong>scored differently</strong> (see the title): not comparable"
        figures.append(
            f'<figure><img src="{data_uri(png)}" width="{width}" height="{height}" '
            f'alt="FID against {esc(key)}"><figcaption>{caption}</figcaption></figure>'
        )
    return section("FID against each swept parameter", "".join(figures)) if figures else ""


def _why_missing(e: Experiment, path: str) -> str:
    """Why `path` could not be read, as recorded when the experiment was loaded."""
    return next(
        (p.partition(": ")[2] for p in e.problems if p.startswith(f"{path}: ")),
        "not in this experiment's outputs or the local DVC cache",
    )


def problems_section(experiments: list) -> str:
    items = "".join(f"<li><strong>{esc(e.name)}</strong>: {esc(p)}</li>" for e in experiments for p in e.problems)
    if not items:
        return ""
    note = ""
    if any("not in the local DVC cache" in p for e in experiments for p in e.problems):
        note = (
            '<p class="caption">Outputs not in the local DVC cache are fetched from the project\'s DVC remote '
            "(<code>dvc remote list</code>), where <code>dvc push</code> and <code>dvc exp push origin "
            "&lt;name&gt;</code> put them: <code>python -m workflow pull</code> for the workspace and the current "
            "commit, <code>dvc exp pull origin &lt;name&gt;</code> for an experiment.</p>"
        )
    return section("Not available", f"<ul>{items}</ul>{note}")


CSS = """
.scroll { overflow-x: auto; }
table.sortable th { padding: 0; border-bottom: 2px solid #d5d9e1; vertical-align: bottom; }
table.sortable th.num, table.sortable th.num button { text-align: right; }
table.sortable th button { font: inherit; font-weight: 600; color: #3b4252; background: none; border: 0;
                           padding: 6px 14px 6px 0; cursor: pointer; text-align: left; }
table.sortable th[aria-sort="ascending"] button::after { content: " \\25B2"; font-size: 0.75em; }
table.sortable th[aria-sort="descending"] button::after { content: " \\25BC"; font-size: 0.75em; }
table.sortable td { padding: 6px 14px 6px 0; white-space: nowrap; }
tr.best td { background: #eefaf0; }
.badge { display: inline-block; background: #1f7a3a; color: #fff; border-radius: 10px; padding: 0 8px;
         font-size: 0.78em; font-weight: 600; vertical-align: 1px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 7px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 14px; }
.thumb { flex: 0 1 auto; max-width: 240px; border: 1px solid #e1e4ea; border-top: 4px solid; border-radius: 8px;
         padding: 8px 10px 10px; background: #fafbfc; }
.thumb.best { box-shadow: 0 0 0 2px #1f7a3a; }
.thumb figcaption { margin: 0 0 6px; color: #1d2330; font-size: 0.92em; }
.caption { color: #5a6272; font-size: 0.88em; margin: 6px 0 0; }
"""

# Sorting without any library: a click on a column header sorts the rows by that column's data-sort
# values (numbers as numbers), ascending then descending; empty values stay last.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var body = table.tBodies[0];
  table.querySelectorAll("thead th").forEach(function (th, column) {
    th.querySelector("button").addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) { return order(a.cells[column], b.cells[column], ascending); });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
function order(a, b, ascending) {
  var x = a.getAttribute("data-sort"), y = b.getAttribute("data-sort");
  if (x === "" || y === "") { return (x === "") - (y === ""); }
  var nx = Number(x), ny = Number(y);
  var sign = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
  return ascending ? sign : -sign;
}
"""


# what a FID's value depends on besides the model: FIDs that differ here are not comparable
SCORED_WITH = ("fid_num_samples", "fid_num_reference", "fid_weights_sha256")


def scored_with(e: Experiment) -> tuple:
    """SCORED_WITH's values, and the params that choose the reference images (the data, and the classes
    sampled): FIDs against other images are not comparable either."""
    reference = {"data": e.params.get("data"), "classes": (e.params.get("sample") or {}).get("classes")}
    return (*(e.metrics.get(k) for k in SCORED_WITH), json.dumps(reference, sort_keys=True))


def render_comparison(experiments: list) -> str:
    """The whole page: a pure function of the loaded experiments."""
    shown = ranked(experiments)
    colours = {e.name: PALETTE[i % len(PALETTE)] for i, e in enumerate(shown)}
    scored = [e for e in shown if math.isfinite(e.fid)]
    ways = {scored_with(e) for e in scored}
    best = scored[0] if scored and len(ways) == 1 else None
    keys = differing_params(shown)
    if len(ways) > 1:  # few samples bias FID upwards: the lowest may be the one scored on the most samples
        why = (
            "n/a (scored with different sample or reference counts, reference images (data.*, sample.classes) "
            "or Inception weights: compare runs scored alike)"
        )
    else:
        why = f"{best.fid:.2f}: {best.name}" if best else "n/a (no experiment has a FID)"
    subtitle = f"{len(shown)} experiment(s) from `dvc exp show`; best FID {why}"
    body = (
        table_section(shown, colours, keys, best)
        + sweeps_section(shown, keys, best, comparable=len(ways) <= 1)
        + grids_section(shown, colours, best)
        + curves_section(shown, colours)
        + problems_section(shown)
        + "<footer>Written by <code>python -m workflow compare</code> from <code>dvc exp show --json</code> "
        "and each experiment's outputs in the DVC cache.</footer>\n"
    )
    return page("Experiment comparison", subtitle, body, CSS, SCRIPT)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compare DVC experiments on one self-contained page.")
    parser.add_argument("experiments", nargs="*", help="names, revs or `workspace` (default: all of this commit)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"the page (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    experiments = collect(Path.cwd(), args.experiments)
    write_page(args.output, render_comparison(experiments))
    print(f"compare: {len(experiments)} experiment(s) -> {args.output}")
