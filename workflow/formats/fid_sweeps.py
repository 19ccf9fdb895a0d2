"""The FID sweeps (`paths.fid_steps`, `paths.fid_guidance`): CSV files of the swept sample setting
(num_inference_steps, guidance_scale) with fid, kid and seconds per point, a header alone when the sweep
is empty. Written by fid_sweep; read by `dvc plots` (dvc.yaml declares them) and the report.

    write_sweep("reports/fid_guidance.csv", "guidance_scale", rows)    # rows: dicts of those keys
    sweep = read_sweep("reports/fid_guidance.csv")                       # Sweep(setting, values, fid, seconds)
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow.core.artifacts import atomic_path
from workflow.core.config import ConfigError

SCORES = ("fid", "kid", "seconds")


@dataclass(frozen=True, eq=False)
class Sweep:
    setting: str  # the sample.* setting swept
    values: np.ndarray
    fid: np.ndarray
    seconds: np.ndarray  # each point's sampling and scoring


def write_sweep(path: str | Path, setting: str, rows: list[dict]) -> None:
    lines = [",".join((setting, *SCORES))]
    lines += [f"{r[setting]:g},{r['fid']:.6g},{r['kid']:.6g},{r['seconds']:.3f}" for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_sweep(path: str | Path) -> Sweep:
    reader = csv.reader(io.StringIO(Path(path).read_text()))
    header = next(reader, None)
    if not header or tuple(header[1:]) != SCORES:
        raise ConfigError(f"{path}: not a sweep of the fid_sweep stage (header {header}); re-run it")
    try:
        table = np.array([[float(row[i]) for i in (0, 1, 3)] for row in reader if row], dtype=float).reshape(-1, 3)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{path}: not numbers ({exc}); re-run the fid_sweep stage") from None
    return Sweep(header[0], table[:, 0], table[:, 1], table[:, 2])
