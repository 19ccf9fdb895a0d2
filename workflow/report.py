"""Report stage: every artifact of a run on one self-contained HTML page.

    python -m workflow report [--params params.yaml]

Reads the sample grid, the training log (history.csv + summary.json), metrics.json, the
preprocessing meta.json, the download record SOURCE.json and the params, and writes
`paths.report` (reports/index.html). The page needs nothing from the network: images are
base64 data URIs and the CSS is inline. It holds no timestamps and no absolute paths that the
inputs don't already hold, so identical inputs give a byte-identical page.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow.artifacts import atomic_path
from workflow.cli import parse_params
from workflow.config import ConfigError, Params

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID_DISPLAY_PX = 512  # the sample grid is scaled up by a whole factor to about this width
MAX_SKIPPED_SHOWN = 100
MAX_FILES_SHOWN = 5


@dataclass(frozen=True, eq=False)
class ReportInputs:
    """Everything the page shows, already loaded: render_report does no I/O."""
    params: dict
    metrics: dict
    summary: dict
    history: dict  # "step", "loss", "lr" -> 1-D float arrays of equal length
    meta: dict
    source: dict
    grid_png: bytes


# ---------------------------------------------------------------- loading (the only I/O)

def _require(path: str | Path, stage: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing; it is written by the `{stage}` stage "
                          f"(run `python -m workflow {stage}` or `dvc repro`)")
    return path


def _load_json_object(path: str | Path, stage: str) -> dict:
    path = _require(path, stage)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-run the `{stage}` stage") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_png(path: str | Path, stage: str) -> bytes:
    data = _require(path, stage).read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        raise ConfigError(f"{path}: not a PNG image; re-run the `{stage}` stage")
    return data


def _float(text: str) -> float:
    return float(text) if text.strip() else math.nan


def load_history(path: str | Path) -> dict:
    """history.csv (header step,loss,lr; extra columns ignored) -> dict of float arrays."""
    path = _require(path, "train")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"step", "loss", "lr"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path}: header lacks column(s) {', '.join(sorted(missing))}; "
                              f"expected step,loss,lr")
        rows = []
        for row in reader:
            try:
                rows.append([_float(row["step"]), _float(row["loss"]), _float(row["lr"] or "")])
            except (ValueError, AttributeError):
                raise ConfigError(f"{path}: line {reader.line_num}: not numbers: {row}") from None
    table = np.array(rows, dtype=float).reshape(-1, 3)
    return {"step": table[:, 0], "loss": table[:, 1], "lr": table[:, 2]}


def load_inputs(params: Params) -> ReportInputs:
    p = params.paths
    log = Path(p.train_log)
    return ReportInputs(
        params=params.to_dict(),
        metrics=_load_json_object(p.metrics, "evaluate"),
        summary=_load_json_object(log / "summary.json", "train"),
        history=load_history(log / "history.csv"),
        meta=_load_json_object(p.meta, "preprocess"),
        source=_load_json_object(Path(p.raw) / "SOURCE.json", "download"),
        grid_png=_load_png(p.grid, "sample"),
    )


# ---------------------------------------------------------------- formatting helpers

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_scalar(value) -> str:
    """A plain value as YAML would spell it (escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = format(value, ".6g")
        return esc(text if any(c in text for c in ".ein") else text + ".0")  # 1.0, not 1
    return esc(value)


def fmt_number(value, spec: str = ",", suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&mdash;" if value is None else esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return esc(value)
    return esc(format(value, spec) + suffix)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def nested(value) -> str:
    """Any JSON-like value as HTML: dicts become nested tables, lists of scalars a comma list."""
    if isinstance(value, dict):
        if not value:
            return "<em>{}</em>"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{nested(v)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return "[" + ", ".join(fmt_scalar(v) for v in value) + "]"
        return "<ol>" + "".join(f"<li>{nested(v)}</li>" for v in value) + "</ol>"
    return f"<code>{fmt_scalar(value)}</code>"


def kv_table(rows) -> str:
    """rows: (label text, value HTML) pairs; the label is escaped here, the value already is."""
    body = "".join(f"<tr><th>{esc(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<table class="kv">{body}</table>'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk always comes first
    return width, height


# ---------------------------------------------------------------- the loss plot

def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values; the result is len(values) - window + 1 long."""
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def loss_plot_png(history: dict) -> bytes:
    """Loss (log scale, raw faint + moving average) over a small learning-rate panel, as PNG."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):  # ignore any matplotlibrc: same bytes everywhere
        fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        _draw_loss(ax_loss, history["step"], history["loss"])
        _draw_lr(ax_lr, history["step"], history["lr"])
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _draw_loss(ax, steps: np.ndarray, loss: np.ndarray) -> None:
    keep = np.isfinite(steps) & np.isfinite(loss) & (loss > 0)
    steps, loss = steps[keep], loss[keep]
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.25)
    if not len(loss):
        ax.text(0.5, 0.5, "no finite loss values", ha="center", va="center", transform=ax.transAxes)
        return
    window = max(1, len(loss) // 20)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    centre = (window - 1) // 2  # each mean drawn at its window's middle step: no visual lag
    ax.plot(steps[centre:len(steps) - window + 1 + centre], moving_average(loss, window),
            color="tab:blue", linewidth=1.8,
            label=f"moving average ({window} steps)")
    ax.set_yscale("log")
    ax.legend(loc="upper right", frameon=False)


def _draw_lr(ax, steps: np.ndarray, lr: np.ndarray) -> None:
    keep = np.isfinite(steps) & np.isfinite(lr)
    ax.set_ylabel("learning rate")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.25)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if keep.any():
        ax.plot(steps[keep], lr[keep], color="tab:orange", linewidth=1.4)
    else:
        ax.text(0.5, 0.5, "no learning-rate values", ha="center", va="center", transform=ax.transAxes)


# ---------------------------------------------------------------- page sections

METRIC_ROWS = (  # key, label, format spec, suffix; the FID card shows fid/kid/num_* itself
    ("train_loss_final", "final training loss", ".4g", ""),
    ("train_images_per_second", "training throughput", ",.1f", " images/s"),
    ("train_steps", "training steps", ",", ""),
    ("train_seconds", "training time", ",.1f", " s"),
    ("sample_images_per_second", "sampling throughput", ",.1f", " images/s"),
    ("sample_seconds", "sampling time", ",.1f", " s"),
    ("num_parameters", "model parameters", ",", ""),
)
FID_KEYS = ("fid", "kid", "fid_num_samples", "fid_num_reference", "fid_weights_origin", "fid_weights_sha256")


def metrics_section(metrics: dict) -> str:
    fid, kid = metrics.get("fid"), metrics.get("kid")
    basis = (f"on {fmt_number(metrics.get('fid_num_samples'))} generated samples against "
             f"{fmt_number(metrics.get('fid_num_reference'))} reference images")
    card = (f'<div class="fid"><div class="fid-label">FID</div>'
            f'<div class="fid-value">{fmt_number(fid, ".2f")}</div>'
            f'<div class="fid-basis">{basis}<br>KID {fmt_number(kid, ".4g")}</div></div>')
    known = {key for key, *_ in METRIC_ROWS} | set(FID_KEYS)
    rows = [(label, fmt_number(metrics[key], spec, suffix))
            for key, label, spec, suffix in METRIC_ROWS if key in metrics]
    if "fid_weights_origin" in metrics:
        rows.append(("Inception weights", f"<code>{fmt_scalar(metrics['fid_weights_origin'])}</code>"))
    if "fid_weights_sha256" in metrics:
        rows.append(("Inception weights sha256", f"<code>{fmt_scalar(metrics['fid_weights_sha256'])}</code>"))
    rows += [(key, nested(value)) for key, value in metrics.items() if key not in known]
    return _section("Metrics", f'<div class="metrics">{card}{kv_table(rows)}</div>')


def samples_section(grid_png: bytes) -> str:
    width, height = png_size(grid_png)
    scale = max(1, round(GRID_DISPLAY_PX / max(width, 1)))
    img = (f'<img class="pixelated" src="{data_uri(grid_png)}" width="{width * scale}" '
           f'height="{height * scale}" alt="grid of generated samples">')
    caption = f"{width}&times;{height} px, shown at {scale}&times; (nearest-neighbour)"
    return _section("Samples", f"<figure>{img}<figcaption>{caption}</figcaption></figure>")


def training_section(history: dict, summary: dict) -> str:
    loss = history["loss"]
    bad = int(np.count_nonzero(~np.isfinite(loss)))
    note = f'<p class="warn">{bad} step(s) had a non-finite loss.</p>' if bad else ""
    img = f'<img src="{data_uri(loss_plot_png(history))}" alt="training loss and learning rate">'
    caption = f"{len(loss):,} logged steps; loss on a log scale"
    body = (f"<figure>{img}<figcaption>{caption}</figcaption></figure>{note}"
            f"<h3>Training summary</h3>{nested(summary)}")
    return _section("Training", body)


IDENTITY_KEYS = ("kind", "repo_id", "name", "path", "package", "package_version", "endpoint", "split",
                 "revision", "sha", "data_file_sha256")


def _identity_rows(record: dict) -> list:
    return [(key, f"<code>{fmt_scalar(record[key])}</code>") for key in IDENTITY_KEYS
            if key in record and not isinstance(record[key], (dict, list))]


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
    shown = "".join(f"<li><code>{esc(name)}</code>" + (f" ({esc(fmt_bytes(size))})" if size is not None else "")
                    + "</li>" for name, size in entries[:MAX_FILES_SHOWN])
    more = f"<li>&hellip; and {len(entries) - MAX_FILES_SHOWN:,} more</li>" if len(entries) > MAX_FILES_SHOWN else ""
    return f"{len(entries):,} file(s){esc(total)}<ul>{shown}{more}</ul>"


def skipped_table(skipped) -> str:
    if not skipped:
        return "<p>No input files were skipped.</p>"
    if not isinstance(skipped, list):
        return nested(skipped)
    rows = "".join(f"<tr><td><code>{esc(s.get('file', '?') if isinstance(s, dict) else s)}</code></td>"
                   f"<td>{esc(s.get('reason', '') if isinstance(s, dict) else '')}</td></tr>"
                   for s in skipped[:MAX_SKIPPED_SHOWN])
    more = (f"<p>&hellip; and {len(skipped) - MAX_SKIPPED_SHOWN:,} more (see meta.json)</p>"
            if len(skipped) > MAX_SKIPPED_SHOWN else "")
    return (f"<p>{len(skipped):,} input file(s) skipped:</p><table class=\"list\">"
            f"<tr><th>file</th><th>reason</th></tr>{rows}</table>{more}")


def record_table(record: dict) -> str:
    """A SOURCE/meta record as a nested table, its long lists (files, skipped) summarised."""
    special = {"files": files_summary, "skipped": skipped_table}
    return kv_table((key, special.get(key, nested)(value)) for key, value in record.items())


def dataset_section(meta: dict, source: dict) -> str:
    meta_source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    rows = _identity_rows(source) or _identity_rows(meta_source)
    rows += [("images", fmt_number(meta.get("count"))),
             ("resolution", f"{fmt_number(meta.get('resolution'))} px"),
             ("channels", fmt_number(meta.get("channels")))]
    if "files" in source:
        rows.append(("downloaded files", files_summary(source["files"])))
    preprocessing = {k: v for k, v in meta.items() if k not in ("skipped", "source")}
    details = (f"<details><summary>download record (SOURCE.json)</summary>{record_table(source)}</details>"
               f"<details><summary>preprocessing record (meta.json)</summary>{record_table(preprocessing)}"
               "</details>")
    body = kv_table(rows) + "<h3>Skipped files</h3>" + skipped_table(meta.get("skipped")) + details
    return _section("Dataset provenance", body)


def params_section(params: dict) -> str:
    return _section("Parameters", '<div class="params">' + nested(params) + "</div>")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{body}</section>\n"


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       background: #f5f6f8; margin: 0; }
main { max-width: 980px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0.2em 0; } h2 { font-size: 1.25em; margin-top: 0; }
h3 { font-size: 1em; margin: 1em 0 0.3em; }
.subtitle { color: #5a6272; margin: 0 0 1.5em; }
section { background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; padding: 18px 22px;
          margin-bottom: 18px; }
table { border-collapse: collapse; } th, td { text-align: left; vertical-align: top; padding: 3px 10px 3px 0; }
table.kv > tbody > tr > th, table.kv > tr > th { font-weight: 600; color: #3b4252; white-space: nowrap; }
table.kv table.kv { margin: 0; } table.list td, table.list th { border-bottom: 1px solid #eceef2; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
.metrics { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
.fid { background: #eef3ff; border: 1px solid #c9d6f5; border-radius: 8px; padding: 14px 22px; min-width: 200px; }
.fid-label { font-weight: 600; color: #3451a3; letter-spacing: 0.05em; }
.fid-value { font-size: 2.6em; font-weight: 700; line-height: 1.1; }
.fid-basis { color: #5a6272; font-size: 0.9em; max-width: 240px; }
figure { margin: 0 0 12px; } figcaption { color: #5a6272; font-size: 0.9em; }
img { max-width: 100%; height: auto; }
img.pixelated { image-rendering: crisp-edges; image-rendering: pixelated; border: 1px solid #e1e4ea; }
details { margin-top: 10px; } summary { cursor: pointer; color: #3451a3; }
.warn { color: #a33b34; } ol { margin: 0; padding-left: 1.4em; } ul { margin: 0.2em 0; }
"""


def _title(params: dict, meta: dict) -> tuple[str, str]:
    title = f"Diffusion run: {params.get('data', {}).get('source', 'unknown dataset')}"
    count = meta.get("count", "?")
    count = f"{count:,}" if isinstance(count, int) else count
    subtitle = (f"{count} images at {meta.get('resolution', '?')} px, "
                f"{meta.get('channels', '?')} channel(s); seed {params.get('seed', '?')}; "
                f"{params.get('train', {}).get('max_steps', '?')} training steps")
    return title, subtitle


def render_report(inputs: ReportInputs) -> str:
    """The whole page as a string: a pure function of `inputs`."""
    title, subtitle = _title(inputs.params, inputs.meta)
    body = (metrics_section(inputs.metrics) + samples_section(inputs.grid_png)
            + training_section(inputs.history, inputs.summary)
            + dataset_section(inputs.meta, inputs.source) + params_section(inputs.params))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"subtitle\">{esc(subtitle)}</p>\n{body}"
            "<footer><p class=\"subtitle\">Written by <code>python -m workflow report</code> "
            "from params.yaml and the pipeline's artifacts.</p></footer>\n</main>\n</body>\n</html>\n")


def main(argv=None) -> None:
    params = parse_params(argv, "Write the self-contained HTML report of a run.")
    page = render_report(load_inputs(params))
    with atomic_path(params.paths.report) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"report: {params.paths.report}")


if __name__ == "__main__":
    main()
