"""Report stage: every artifact of a run on one self-contained HTML page.

    python -m workflow report [--params params.yaml]

Reads the sample grid, the training log (loss and lr as dvclive wrote them, see workflow/formats/trainlog.py;
summary.json; the progress grids grids/step-XXXXXXX.png that it shows), metrics.json, the preprocessing meta.json,
the download record SOURCE.json, for a fine-tuned pretrained pipeline its record BASE.json (repository and
commit, or local folder), and the params. Writes `paths.report` (reports/index.html) and
`paths.loss_plot` (reports/loss.png, the loss and learning-rate figure the page shows; Snakemake's
report shows it too).

The page needs nothing from the network: images are base64 data URIs and the CSS is inline. An
artifact a run does not have (a partial run, or an older one) is shown as missing, naming the stage
that writes it; one that dvc.lock records but the workspace lacks (a fresh clone) names `python -m
workflow pull` (dvc pull, every object checked), which fetches it from the project's DVC remote; a
damaged one is an error naming the file. The page holds no timestamps and no absolute paths that the
inputs don't already hold, so identical inputs give a byte-identical page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from workflow import STAGES
from workflow.core.artifacts import write_bytes
from workflow.core.config import Params
from workflow.formats import trainlog
from workflow.formats.base_model import BASE_FILE
from workflow.formats.fid_sweeps import Sweep, read_sweep
from workflow.formats.png import read_png
from workflow.formats.raw_dataset import SOURCE_FILE
from workflow.formats.records import read_record
from workflow.pages import curves
from workflow.pages.htmlpage import (
    Missing,
    data_uri,
    esc,
    fmt_bytes,
    fmt_number,
    fmt_scalar,
    fmt_seconds,
    kv_table,
    nested,
    page,
    pixel_image,
    png_size,
    section,
    write_page,
)

GRID_DISPLAY_PX = 480  # the final grid is scaled up by a whole factor to at most this width (a wider one: down)
MAX_PROGRESS_SHOWN = 8
STRIP_PX = 300  # a progress-strip figure's widest (the .strip figure CSS rule)
MAX_SKIPPED_SHOWN = 100
MAX_FILES_SHOWN = 5


@dataclass(frozen=True, eq=False)
class ReportInputs:
    """Everything the page shows, already loaded: render_report does no I/O. Any field but params
    may be Missing."""

    params: dict
    metrics: dict | Missing
    summary: dict | Missing
    history: dict | Missing  # "step", "loss", "lr" -> 1-D float arrays of equal length
    meta: dict | Missing
    source: dict | Missing
    grid_png: bytes | Missing
    progress: list | Missing  # [(optimiser step, PNG bytes)] of the grids shown (shown_progress), oldest first
    progress_total: int  # how many progress grids the run made, shown or not
    sweeps: list = field(default_factory=list)  # the FID sweeps with points (fid_sweep), each a Sweep
    base: dict | Missing | None = None  # the pretrained pipeline's BASE.json; None: the run trains from scratch


# ---------------------------------------------------------------- loading (the only I/O)


def _written_by(stage: str) -> str:
    return f"written by the `{stage}` stage: `python -m workflow {stage}` or `dvc repro`"


def load_history(log: Path) -> dict | Missing:
    """The loss and lr per step from the training log folder `log`."""
    files = [log / trainlog.tsv(metric) for metric in (trainlog.LOSS, trainlog.LR)]
    for path in files:
        if not path.is_file():
            return Missing(str(path), _written_by("train"))
    return trainlog.parse_history(files[0].read_text(), files[1].read_text(), str(log))


def _optional(load, path: str | Path, stage: str):
    path = Path(path)
    return load(path, stage) if path.is_file() else Missing(str(path), _written_by(stage))


def load_progress_grids(log: Path) -> tuple[list | Missing, int]:
    """The training log's progress grids that the page shows, as [(step, png)], oldest first, and how many
    there are: only the shown ones are read (a long run can have thousands)."""
    found = trainlog.progress_grids(log)
    if not found:
        what = "written by the `train` stage at each checkpoint, when the run makes progress grids"
        return Missing(f"{log / trainlog.GRIDS_DIR}/step-*.png", what), 0
    return [(step, read_png(path, "train")) for step, path in shown_progress(found)], len(found)


def load_sweeps(params: Params) -> list:
    """The FID sweeps that have points, and a Missing for each one the params ask for but that is absent."""
    wanted = [
        (Path(params.paths.fid_steps), params.fid.steps_sweep),
        (Path(params.paths.fid_guidance), params.fid.guidance_sweep),
    ]
    sweeps = []
    for path, points in wanted:
        if path.is_file():
            sweeps += [sweep] if len((sweep := read_sweep(path)).values) else []
        elif points:
            sweeps.append(Missing(str(path), _written_by("fid_sweep")))
    return sweeps


def load_inputs(params: Params) -> ReportInputs:
    p = params.paths
    log = Path(p.train_log)
    progress, progress_total = load_progress_grids(log)
    return with_fetch_hints(
        ReportInputs(
            params=params.to_dict(),
            metrics=_optional(read_record, p.metrics, "evaluate"),
            summary=_optional(read_record, log / trainlog.SUMMARY_FILE, "train"),
            history=load_history(log),
            meta=_optional(read_record, p.meta, "preprocess"),
            source=_optional(read_record, Path(p.raw) / SOURCE_FILE, "download"),
            grid_png=_optional(read_png, p.grid, "sample"),
            progress=progress,
            progress_total=progress_total,
            sweeps=load_sweeps(params),
            base=None
            if params.model.pretrained is None
            else _optional(read_record, Path(p.base_model) / BASE_FILE, "download_model"),
        )
    )


FETCH = (
    "recorded by DVC (dvc.lock) but not in this workspace: `python -m workflow pull` fetches it from the project's "
    "DVC remote"
)


def with_fetch_hints(inputs: ReportInputs) -> ReportInputs:
    """Each Missing input that a recorded run made (its DVC output is absent here) says how to pull it."""
    absent = {f.name: getattr(inputs, f.name) for f in fields(inputs) if isinstance(getattr(inputs, f.name), Missing)}
    if not absent and not any(isinstance(s, Missing) for s in inputs.sweeps):
        return inputs  # the usual case: DVC is not consulted
    lacking = absent_outputs()

    def hinted(m):
        recorded = isinstance(m, Missing) and any(o == Path(m.what) or o in Path(m.what).parents for o in lacking)
        return Missing(m.what, FETCH) if recorded else m

    return replace(inputs, **{name: hinted(m) for name, m in absent.items()}, sweeps=[hinted(s) for s in inputs.sweeps])


def absent_outputs() -> list[Path]:
    """The cached outputs that the DVC project here records (dvc.lock) but the workspace lacks."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import SCMError

    try:
        repo = Repo(".")
    except (NotDvcRepoError, SCMError):  # no DVC project, or one outside git without core.no_scm
        return []
    with repo:
        return [Path(out.def_path) for out in repo.index.outs if out.use_cache and out.hash_info and not out.exists]


def loss_plot(inputs: ReportInputs) -> bytes:
    """The loss/lr figure (paths.loss_plot); without a history, an empty figure that says so."""
    history = inputs.history
    if isinstance(history, Missing):
        history = {c: np.array([]) for c in curves.HISTORY_COLUMNS}
    return curves.loss_plot_png(history)


# ---------------------------------------------------------------- the top: final grid and key figures


def _known(value) -> dict:
    return {} if isinstance(value, Missing) else value


def weights_shown(params: dict) -> str:
    """Which weights the samples come from: the EMA's unless the run trained without one."""
    return "EMA weights" if params.get("train", {}).get("ema", True) else "weights without EMA"


def hero_section(inputs: ReportInputs) -> str:
    grid_png = inputs.grid_png
    if isinstance(grid_png, Missing):
        grid = f'<figure class="final">{grid_png.html()}</figure>'
    else:
        img, scale = pixel_image(grid_png, GRID_DISPLAY_PX, "grid of generated samples")
        width, height = png_size(grid_png)
        full = inputs.params.get("paths", {}).get("grid", "the sample stage's grid")
        shown = f"{scale}&times;" if scale >= 1 else f"{scale:.3g}&times; (full size: <code>{esc(full)}</code>)"
        grid = (
            f'<figure class="final">{img}<figcaption>Final samples ({weights_shown(inputs.params)}): '
            f"{width}&times;{height} px, "
            f"shown at {shown}</figcaption></figure>"
        )
    return f'<section class="hero">{grid}<div class="keyfigs">{key_figures(inputs)}</div></section>\n'


def key_figures(inputs: ReportInputs) -> str:
    """The FID card, the headline numbers of metrics.json and what produced them."""
    metrics = inputs.metrics
    if isinstance(metrics, Missing):
        return "<h2>Metrics</h2>" + metrics.html() + kv_table(run_rows(inputs))
    fid, kid = metrics.get("fid"), metrics.get("kid")
    basis = (
        f"over {fmt_number(metrics.get('fid_num_samples'))} samples against "
        f"{fmt_number(metrics.get('fid_num_reference'))} reference images"
    )
    card = (
        f'<div class="fid"><div class="fid-label">FID</div><div class="fid-value">{fmt_number(fid, ".2f")}</div>'
        f'<div class="fid-basis">KID {fmt_number(kid, ".4g")} &middot; precision '
        f"{fmt_number(metrics.get('precision'), '.3f')} &middot; recall {fmt_number(metrics.get('recall'), '.3f')}"
        f" &middot; {basis}</div></div>"
    )
    seconds = [sec for _, sec, _ in stage_timings(metrics, inputs.sweeps) if sec is not None]
    rows = [
        ("final training loss", fmt_number(metrics.get("train_loss_final"), ".4g")),
        ("training steps", fmt_number(metrics.get("train_steps"))),
        ("model parameters", fmt_number(metrics.get("num_parameters"))),
        ("training throughput", fmt_number(metrics.get("train_images_per_second"), ",.1f", " images/s")),
        ("wall time, all timed stages", fmt_seconds(sum(seconds) if seconds else None)),
    ]
    everything = kv_table((key, nested(value)) for key, value in metrics.items())
    return (
        card
        + kv_table(rows + run_rows(inputs))
        + f"<details><summary>all of metrics.json</summary>{everything}</details>"
    )


def run_rows(inputs: ReportInputs) -> list:
    """What produced those numbers, in one line each: device, sampling, data."""
    summary, source = _known(inputs.summary), _known(inputs.source)
    device = summary.get("device_name") or summary.get("device")
    sampling = " ".join(f"{k}={fmt_scalar(v)}" for k, v in inputs.params.get("sample", {}).items())
    data = fmt_scalar(inputs.params.get("data", {}).get("source"))
    if isinstance(source.get("sha"), str):
        data += f" @ {esc(source['sha'][:12])}"
    return [
        ("device", esc(device) if device else "&mdash;"),
        ("sampling", f"<code>{sampling}</code>"),
        ("data", f"<code>{data}</code>"),
    ]


# ---------------------------------------------------------------- progress, curves, timings, environment


def shown_progress(progress: list) -> list:
    """At most MAX_PROGRESS_SHOWN of the grids `progress` (oldest first), evenly spaced, always the first and
    the last."""
    if len(progress) <= MAX_PROGRESS_SHOWN:
        return progress
    picks = np.unique(np.linspace(0, len(progress) - 1, MAX_PROGRESS_SHOWN).round().astype(int))
    return [progress[i] for i in picks]


def progress_section(shown: list | Missing, total: int, weights: str) -> str:
    """The progress grids `shown` (shown_progress) of the run's `total`."""
    title = "Progress over training"
    if isinstance(shown, Missing):
        return section(title, shown.html())
    # The strip fills the width (CSS scales each grid up, pixels kept sharp), never below 1:1; a grid
    # wider than a strip figure's STRIP_PX is embedded downscaled
    figures = "".join(
        f'<figure style="min-width: {min(png_size(png)[0], STRIP_PX)}px">'
        f"{pixel_image(png, STRIP_PX, f'samples at step {step}')[0]}"
        f"<figcaption>step {step:,}</figcaption></figure>"
        for step, png in shown
    )
    note = f"{len(shown)} of {total} checkpoints" if len(shown) < total else f"{total} checkpoint(s)"
    caption = f'<p class="caption">Samples from the {weights} at each checkpoint, from the same noise: {note}.</p>'
    return section(title, f'<div class="strip">{figures}</div>{caption}')


def training_section(history: dict | Missing, summary: dict | Missing, loss_png: bytes) -> str:
    title = "Training curves"
    if isinstance(history, Missing):
        return section(title, history.html())
    bad = int(np.count_nonzero(~np.isfinite(history["loss"])))
    note = f'<p class="warn">{bad} step(s) had a non-finite loss.</p>' if bad else ""
    width, height = png_size(loss_png)
    img = f'<img src="{data_uri(loss_png)}" alt="training loss and learning rate" width="{width}" height="{height}">'
    caption = (
        f"{len(history['loss']):,} logged steps; the loss on a log scale, faint per step and "
        "smoothed by a moving average; the learning rate below"
    )
    details = (
        ""
        if isinstance(summary, Missing)
        else f"<details><summary>training summary (summary.json)</summary>{nested(summary)}</details>"
    )
    return section(title, f"<figure>{img}<figcaption>{caption}</figcaption></figure>{note}{details}")


def stage_timings(metrics: dict, sweeps: list = ()) -> list:
    """[(stage, seconds or None, images/s or None)] from the metrics' `<stage>_seconds` and
    `<stage>_images_per_second` keys, and fid_sweep's from its points, in pipeline order."""
    found: dict = {}
    measured = [s for s in sweeps if isinstance(s, Sweep)]
    if measured:
        found["fid_sweep"] = {"seconds": float(sum(s.seconds.sum() for s in measured))}
    for key, value in metrics.items():
        match = re.fullmatch(r"(\w+?)_(seconds|images_per_second)", key)
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            found.setdefault(match.group(1), {})[match.group(2)] = value
    order = {stage: i for i, stage in enumerate(STAGES)}
    stages = sorted(found, key=lambda s: (order.get(s, len(order)), s))
    return [(s, found[s].get("seconds"), found[s].get("images_per_second")) for s in stages]


def timings_section(metrics: dict | Missing, sweeps: list = ()) -> str:
    title = "Time per stage"
    if isinstance(metrics, Missing):
        return section(title, metrics.html())
    rows = stage_timings(metrics, sweeps)
    if not rows:
        return section(title, Missing("stage timings", "metrics.json records no `<stage>_seconds`").html())
    body = "".join(
        f'<tr><th>{esc(stage)}</th><td class="num">{fmt_seconds(sec)}</td>'
        f'<td class="num">{fmt_number(rate, ",.1f", " images/s")}</td></tr>'
        for stage, sec, rate in rows
    )
    total = sum(sec for _, sec, _ in rows if sec is not None)
    table = (
        f'<table class="list timings"><tr><th>stage</th><th class="num">wall time</th>'
        f'<th class="num">throughput</th></tr>{body}<tr class="total"><th>total</th>'
        f'<td class="num">{fmt_seconds(total)}</td><td></td></tr></table>'
    )
    note = '<p class="caption">Each stage\'s own work as it timed it (process start-up and imports aside).</p>'
    return section(title, table + note)


def environment_section(summary: dict | Missing) -> str:
    title = "Software and device"
    if isinstance(summary, Missing):
        return section(title, summary.html())
    software = summary.get("software")
    rows = [
        ("device", esc(summary.get("device_name") or "not recorded")),
        ("kind", f"<code>{fmt_scalar(summary.get('device'))}</code>"),
        ("processes", fmt_number(summary.get("num_processes"))),
        ("mixed precision", f"<code>{fmt_scalar(summary.get('mixed_precision'))}</code>"),
        ("torch.compile", "on" if summary.get("compiled") else "off"),
        ("torch threads", fmt_number(summary.get("torch_threads"))),
    ]
    if isinstance(software, dict):
        order = {name: i for i, name in enumerate(("python", "torch", "diffusers", "accelerate"))}
        rows += [
            (name, f"<code>{fmt_scalar(software[name])}</code>")
            for name in sorted(software, key=lambda n: (order.get(n, len(order)), n))
        ]
    else:
        rows.append(("software", "not recorded by this run (re-run the <code>train</code> stage to record it)"))
    return section(title, kv_table(rows))


# ---------------------------------------------------------------- dataset provenance

IDENTITY_KEYS = (
    "kind",
    "repo_id",
    "name",
    "path",
    "package",
    "package_version",
    "endpoint",
    "split",
    "revision",
    "sha",
    "data_file_sha256",
)


def _identity_rows(record: dict) -> list:
    return [
        (key, f"<code>{fmt_scalar(record[key])}</code>")
        for key in IDENTITY_KEYS
        if key in record and not isinstance(record[key], (dict, list))
    ]


def _file_entry(entry) -> tuple[str, float | None]:
    if isinstance(entry, dict):
        name = next((entry[k] for k in ("path", "name", "file") if k in entry), entry)
        size = next((entry[k] for k in ("size", "bytes") if k in entry), None)
        return str(name), size if isinstance(size, (int, float)) and not isinstance(size, bool) else None
    return str(entry), None


def files_summary(files) -> str:
    """A long file list as: count, total size, the first few names."""
    if not isinstance(files, list):
        return nested(files)
    entries = [_file_entry(f) for f in files]
    sizes = [size for _, size in entries if size is not None]
    total = f", {fmt_bytes(sum(sizes))} in total" if sizes else ""
    shown = "".join(
        f"<li><code>{esc(name)}</code>" + (f" ({esc(fmt_bytes(size))})" if size is not None else "") + "</li>"
        for name, size in entries[:MAX_FILES_SHOWN]
    )
    more = f"<li>&hellip; and {len(entries) - MAX_FILES_SHOWN:,} more</li>" if len(entries) > MAX_FILES_SHOWN else ""
    return f"{len(entries):,} file(s){esc(total)}<ul>{shown}{more}</ul>"


def skipped_table(skipped, what: str = "skipped") -> str:
    if not skipped:
        return f"<p>No input files were {what}.</p>"
    if not isinstance(skipped, list):
        return nested(skipped)
    rows = "".join(
        f"<tr><td><code>{esc(s.get('file', '?') if isinstance(s, dict) else s)}</code>"
        + (f" row {esc(s['row'])}" if isinstance(s, dict) and "row" in s else "")
        + "</td>"
        f"<td>{esc(s.get('reason', '') if isinstance(s, dict) else '')}</td></tr>"
        for s in skipped[:MAX_SKIPPED_SHOWN]
    )
    more = (
        f"<p>&hellip; and {len(skipped) - MAX_SKIPPED_SHOWN:,} more (see meta.json)</p>"
        if len(skipped) > MAX_SKIPPED_SHOWN
        else ""
    )
    return (
        f'<p>{len(skipped):,} input file(s) {what}:</p><table class="list">'
        f"<tr><th>file</th><th>reason</th></tr>{rows}</table>{more}"
    )


def record_table(record: dict) -> str:
    """A SOURCE/meta record as a nested table, its long lists (files, skipped) summarised."""
    special = {
        "files": files_summary,
        "skipped": skipped_table,
        "ignored": lambda files: skipped_table(files, "ignored"),
    }
    return kv_table((key, special.get(key, nested)(value)) for key, value in record.items())


def dataset_section(meta: dict | Missing, source: dict | Missing) -> str:
    if isinstance(meta, Missing) and isinstance(source, Missing):
        return section("Dataset provenance", source.html() + meta.html())
    meta_d, source_d = _known(meta), _known(source)
    meta_source = meta_d.get("source") if isinstance(meta_d.get("source"), dict) else {}
    rows = _identity_rows(source_d) or _identity_rows(meta_source)
    rows += [
        ("images", fmt_number(meta_d.get("count"))),
        ("resolution", f"{fmt_number(meta_d.get('resolution'))} px"),
        ("channels", fmt_number(meta_d.get("channels"))),
    ]
    if "files" in source_d:
        rows.append(("downloaded files", files_summary(source_d["files"])))
    body = kv_table(rows)
    if isinstance(meta, Missing):
        body += meta.html()
    else:
        preprocessing = {k: v for k, v in meta.items() if k not in ("skipped", "source")}
        body += (
            "<h3>Skipped files</h3>"
            + skipped_table(meta.get("skipped"))
            + f"<details><summary>preprocessing record (meta.json)</summary>{record_table(preprocessing)}"
            "</details>"
        )
    if isinstance(source, Missing):
        body += source.html()
    else:
        body += f"<details><summary>download record (SOURCE.json)</summary>{record_table(source)}</details>"
    return section("Dataset provenance", body)


BASE_IDENTITY_KEYS = ("kind", "repo_id", "endpoint", "revision", "sha", "path", "class_name")


def pretrained_section(base: dict | Missing | None) -> str:
    """Which pretrained pipeline a fine-tuning run started from: the commit it was pinned to (not just the
    branch params.yaml names) or the local folder, and its files' content."""
    if base is None:
        return ""
    if isinstance(base, Missing):
        return section("Pretrained pipeline", base.html())
    rows = [(key, f"<code>{fmt_scalar(base[key])}</code>") for key in BASE_IDENTITY_KEYS if key in base]
    if "files" in base:
        rows.append(("files", files_summary(base["files"])))
    body = kv_table(rows) + f"<details><summary>download record (BASE.json)</summary>{record_table(base)}</details>"
    return section("Pretrained pipeline", body)


def params_section(params: dict) -> str:
    """Every param, one card per section of params.yaml."""
    loose = {k: v for k, v in params.items() if not isinstance(v, dict)}
    groups = ([("general", loose)] if loose else []) + [(k, v) for k, v in params.items() if isinstance(v, dict)]
    cards = "".join(f'<div class="card"><h3>{esc(name)}</h3>{nested(values)}</div>' for name, values in groups)
    return section("Parameters (params.yaml)", f'<div class="params">{cards}</div>')


# ---------------------------------------------------------------- the page

CSS = """
.hero { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
.hero .final { flex: 0 1 auto; max-width: 100%; }
.keyfigs { flex: 1 1 320px; min-width: 300px; }
.fid { background: #eef3ff; border: 1px solid #c9d6f5; border-radius: 10px; padding: 12px 20px; margin-bottom: 12px; }
.fid-label { font-weight: 600; color: #3451a3; letter-spacing: 0.05em; }
.fid-value { font-size: 2.8em; font-weight: 700; line-height: 1.05; }
.fid-basis { color: #5a6272; font-size: 0.9em; }
.strip { display: flex; gap: 14px; overflow-x: auto; align-items: flex-end; padding-bottom: 4px; }
.strip figure { flex: 1 1 0; max-width: 300px; text-align: center; } .strip img { width: 100%; }
.caption { color: #5a6272; font-size: 0.88em; margin: 6px 0 0; }
.row2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 16px; }
.row2 > section { margin-bottom: 16px; }
table.timings { min-width: 60%; } tr.total th, tr.total td { border-top: 2px solid #d5d9e1; }
.params { columns: 330px; column-gap: 12px; }
.card { break-inside: avoid; border: 1px solid #eceef2; border-radius: 8px; padding: 6px 12px 10px;
        background: #fafbfc; margin-bottom: 12px; }
.card table.kv th { white-space: normal; overflow-wrap: break-word; font-weight: 500; }
.card table.kv { width: 100%; } .card code { word-break: normal; overflow-wrap: break-word; }
.card h3 { margin: 0.3em 0 0.4em; color: #3451a3; }
"""


def _title(params: dict, meta: dict | Missing) -> tuple[str, str]:
    title = f"Diffusion run: {params.get('data', {}).get('source', 'unknown dataset')}"
    meta = _known(meta)
    count = meta.get("count", "?")
    count = f"{count:,}" if isinstance(count, int) else count
    subtitle = (
        f"{count} images at {meta.get('resolution', '?')} px, "
        f"{meta.get('channels', '?')} channel(s); seed {params.get('seed', '?')}"
    )
    steps = params.get("train", {}).get("max_steps")
    return title, subtitle + (f"; {steps:,} training steps" if isinstance(steps, int) else "")


def sweeps_section(sweeps: list) -> str:
    """FID against the sampling steps and the guidance scale, when fid_sweep measured them."""
    if not sweeps:
        return ""
    figures = []
    for sweep in sweeps:
        if isinstance(sweep, Missing):
            figures.append(f"<figure>{sweep.html()}</figure>")
            continue
        png = curves.sweep_plot_png(sweep.setting, sweep.values, sweep.fid)
        width, height = png_size(png)
        what = curves.SWEEP_LABELS.get(sweep.setting, sweep.setting)
        best = sweep.values[int(np.nanargmin(sweep.fid))] if np.isfinite(sweep.fid).any() else None
        note = f"lowest FID at {best:g}" if best is not None else "no finite FID"
        figures.append(
            f'<figure><img src="{data_uri(png)}" width="{width}" height="{height}" alt="FID against {esc(what)}">'
            f"<figcaption>FID against the {esc(what)} ({len(sweep.values)} points; {note}).</figcaption></figure>"
        )
    return section("FID sweeps", '<div class="row2">' + "".join(figures) + "</div>")


def render_report(inputs: ReportInputs, loss_png: bytes) -> str:
    """The whole page as a string: a pure function of `inputs` and the loss figure."""
    title, subtitle = _title(inputs.params, inputs.meta)
    body = (
        hero_section(inputs)
        + progress_section(inputs.progress, inputs.progress_total, weights_shown(inputs.params))
        + training_section(inputs.history, inputs.summary, loss_png)
        + sweeps_section(inputs.sweeps)
        + '<div class="row2">'
        + timings_section(inputs.metrics, inputs.sweeps)
        + environment_section(inputs.summary)
        + "</div>\n"
        + dataset_section(inputs.meta, inputs.source)
        + pretrained_section(inputs.base)
        + params_section(inputs.params)
        + "<footer>Written by <code>python -m workflow report</code> from params.yaml and the pipeline's "
        "artifacts.</footer>\n"
    )
    return page(title, subtitle, body, CSS)


def run(params: Params) -> dict:
    inputs = load_inputs(params)
    loss_png = loss_plot(inputs)
    html_text = render_report(inputs, loss_png)  # both made before either is written
    write_bytes(params.paths.loss_plot, loss_png)
    write_page(params.paths.report, html_text)
    return {"report": params.paths.report, "loss_plot": params.paths.loss_plot}


def headline(summary: dict, params: Params) -> str:
    return f"report: {summary['report']}"
