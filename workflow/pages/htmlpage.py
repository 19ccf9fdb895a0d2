"""Self-contained HTML pages: escaping, number formatting, tables, embedded PNGs, the page shell.

    from workflow.pages import htmlpage
    htmlpage.page("Title", "subtitle", htmlpage.section("Metrics", htmlpage.kv_table(rows)))

Shared by the run report (workflow/stages/report.py) and the experiment comparison (workflow/tools/compare.py).
Pages built with it load nothing from the network: images are base64 data URIs, CSS (and any
script) is inline, so a page works offline and can be mailed around as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from workflow.core.artifacts import atomic_path
from workflow.formats.png import PNG_SIGNATURE


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_scalar(value) -> str:
    """A plain value as YAML would spell it (escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(float(value))  # every digit: 0.9999999 is not 1.0 (float(): numpy's repr names its type)
        return esc(text if any(c in text for c in ".ein") else text + ".0")  # 1.0, not 1
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_scalar(v) for v in value) + "]"
    return esc(value)


def fmt_number(value, spec: str = ",", suffix: str = "") -> str:
    """A number formatted with `spec`; None as a dash; anything else escaped as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&mdash;" if value is None else esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return esc(value)
    return esc(format(value, spec) + suffix)


def fmt_seconds(seconds) -> str:
    """Wall time as a person reads it: 4.5 s, 3 min 12 s, 1 h 05 min (None: a dash)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return fmt_number(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"  # digits and letters only: nothing to escape


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
            return f"<code>{fmt_scalar(value)}</code>"
        return "<ol>" + "".join(f"<li>{nested(v)}</li>" for v in value) + "</ol>"
    return f"<code>{fmt_scalar(value)}</code>"


def kv_table(rows) -> str:
    """rows: (label text, value HTML) pairs; the label is escaped here, the value already is."""
    body = "".join(f"<tr><th>{esc(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<table class="kv">{body}</table>'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE) and len(png) >= 24, "not a PNG"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk always comes first
    return width, height


def pixel_image(png: bytes, target_px: int, alt: str, css_class: str = "") -> tuple[str, float]:
    """An <img> of a sample grid, `target_px` wide at most: a small grid scaled up by the largest whole
    factor that fits (at least 1), pixels kept sharp (nearest neighbour); a wider one shown at
    `target_px`, and embedded as a copy downscaled to twice that (Lanczos; sharp on high-density screens)
    when it is wider still, since a grid of 512 px samples holds megapixels no page shows. Returns the
    tag and the factor shown (below 1 when shrunk)."""
    width, height = png_size(png)
    if target_px and width > target_px:
        scale = target_px / width
        shown = downscaled(png, 2 * target_px) if width > 2 * target_px else png
        return (
            f'<img class="{esc(css_class)}" src="{data_uri(shown)}" width="{target_px}" '
            f'height="{max(1, round(height * scale))}" alt="{esc(alt)}">',
            scale,
        )
    scale = max(1, target_px // max(width, 1))
    tag = (
        f'<img class="pixelated {esc(css_class)}" src="{data_uri(png)}" width="{width * scale}" '
        f'height="{height * scale}" alt="{esc(alt)}">'
    )
    return tag, scale


def downscaled(png: bytes, width: int) -> bytes:
    """The PNG resized to `width` pixels wide (Lanczos, aspect kept), as PNG bytes (the same every time);
    the PNG itself if Pillow cannot decode it (a damaged file, or one past its decompression-bomb size):
    the page still shows what there is."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(png))
        height = max(1, round(image.height * width / image.width))
        buffer = io.BytesIO()
        image.resize((width, height), Image.Resampling.LANCZOS).save(buffer, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError):
        return png
    return buffer.getvalue()


@dataclass(frozen=True)
class Missing:
    """An input a page does not have (a partial run, an older one, an output not fetched): what it is
    (a path or a name) and why it is missing; it shows as a placeholder saying so."""

    what: str
    why: str

    def html(self) -> str:
        return f'<div class="missing"><strong>missing:</strong> {esc(self.what)} <span>({esc(self.why)})</span></div>'


def section(title: str, body: str, css_class: str = "") -> str:
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<section{cls}><h2>{esc(title)}</h2>{body}</section>\n"


BASE_CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       background: #f3f4f7; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 8px; }
h1 { font-size: 1.55em; margin: 0.1em 0; } h2 { font-size: 1.15em; margin: 0 0 0.6em; }
h3 { font-size: 1em; margin: 1em 0 0.3em; }
.subtitle { color: #5a6272; margin: 0 0 1.1em; }
section { background: #fff; border: 1px solid #e1e4ea; border-radius: 10px; padding: 16px 20px;
          margin-bottom: 16px; min-width: 0; }
table { border-collapse: collapse; } th, td { text-align: left; vertical-align: top; padding: 3px 12px 3px 0; }
table.kv th { font-weight: 600; color: #3b4252; white-space: nowrap; }
table.kv table.kv { margin: 0; } table.list td, table.list th { border-bottom: 1px solid #eceef2; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
figure { margin: 0; } figcaption { color: #5a6272; font-size: 0.88em; margin-top: 4px; }
img { max-width: 100%; height: auto; }
img.pixelated { image-rendering: pixelated; border: 1px solid #d5d9e1; background: #000; }
details { margin-top: 10px; } summary { cursor: pointer; color: #3451a3; }
.warn { color: #a33b34; } ol { margin: 0; padding-left: 1.4em; } ul { margin: 0.2em 0; }
.missing { color: #7a5b12; background: #fff8e6; border: 1px dashed #e2c46d; border-radius: 8px;
           padding: 10px 14px; } .missing span { color: #8f7a45; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
footer { color: #5a6272; font-size: 0.85em; padding: 4px 0 16px; }
"""


def write_page(path: str | Path, html: str) -> None:
    """The page, published whole: a reader never sees half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")


def page(title: str, subtitle: str, body: str, css: str = "", script: str = "") -> str:
    """The whole document around `body` (already HTML); `script` is inline JavaScript, if any."""
    script_tag = f"<script>\n{script}</script>\n" if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{BASE_CSS}{css}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{esc(title)}</h1>\n<p class="subtitle">{esc(subtitle)}</p>\n{body}</main>\n'
        f"{script_tag}</body>\n</html>\n"
    )
