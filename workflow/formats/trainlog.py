"""The training log: loss and learning rate per optimiser step, throughput per log interval, written
through dvclive in its own layout, so DVC shows them natively (`dvc plots show`, `dvc plots diff
<exp> <exp>`, `dvc exp show`) and the report and compare read the very same files.

    <log>/plots/metrics/train/loss.tsv               step, loss            every optimiser step
    <log>/plots/metrics/train/lr.tsv                 step, lr              every optimiser step
    <log>/plots/metrics/train/images_per_second.tsv  step, images_per_second   every log interval
    <log>/metrics.json                               the latest value of each, and the last step
    <log>/summary.json                               the run's figures, device and software (train)
    <log>/grids/step-0000250.png                     a progress grid at each checkpoint (optional)

    live = trainlog.start(folder, history, throughput)   # train, main process: afresh, replaying a resumed run
    trainlog.log(live, [[step, loss, lr], ...], [[step, images_per_second]])
    history = trainlog.parse_history(loss_tsv_text, lr_tsv_text, "reports/train")   # report, compare
    trainlog.write_summary(folder, info); trainlog.read_summary("reports/train", keys)   # train; evaluate, package
    trainlog.progress_grid(folder, step); trainlog.progress_grids("reports/train")     # train; report

The history of a run lives in its checkpoints (progress.json); dvclive's files are re-written from it
whenever training starts, so a resumed run's log holds exactly the uninterrupted run's steps (dvclive's
own `resume=True` would continue after steps logged past the last checkpoint). No timestamps are
written, dvclive writes no dvc.yaml (ours declares the plots) and saves no experiment (`dvc exp run`
records the run), and it is kept from the repository around it (see `_writer`).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from pathlib import Path

import numpy as np

from workflow.core.artifacts import remove, write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record

LOSS, LR, THROUGHPUT = "train/loss", "train/lr", "train/images_per_second"  # dvclive metric names
SUMMARY_FILE = "summary.json"
GRIDS_DIR = "grids"
_GRID_NAME = re.compile(r"step-(\d{7,})\.png")  # 7 digits, more past 9,999,999


def write_summary(folder: str | Path, info: dict) -> None:
    write_json(Path(folder) / SUMMARY_FILE, info)


def read_summary(log: str | Path, keys=()) -> dict:
    return read_record(Path(log) / SUMMARY_FILE, "train", keys)


def progress_grid(grids: str | Path, step: int) -> Path:
    """Where the progress grid of optimiser step `step` goes in a grids folder."""
    return Path(grids) / f"step-{step:07d}.png"


def progress_grids(log: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of the progress grids in a training log folder, oldest first."""
    folder = Path(log) / GRIDS_DIR
    found = folder.iterdir() if folder.is_dir() else ()
    return sorted((int(m.group(1)), p) for p in found if (m := _GRID_NAME.fullmatch(p.name)))


def tsv(metric: str) -> str:
    """A metric's history file, relative to the log folder (dvclive's layout)."""
    return f"plots/metrics/{metric}.tsv"


def start(folder: Path, history: list, throughput: list):
    """A dvclive logger writing into `folder` afresh, holding the steps a resumed run already has."""
    remove(folder)  # afresh even where DVCLIVE_RESUME is set
    live = _writer()(str(folder), save_dvc_exp=False, dvcyaml=None)
    log(live, history, throughput)
    return live


@functools.cache
def _writer() -> type:
    from dvclive import Live

    class Writer(Live):
        """dvclive's Live as the writer of its files, and nothing else. A stage's outputs are a function
        of its declared inputs, so the logger must neither read nor change the repository around it:
        Live's repository set-up would `dvc init` a git repository that has no DVC, fails in one
        without commits ("Empty git repo", where `make run` uses `dvc repro`), takes an experiment name
        from git, and posts to DVC Studio (which `dvc exp run` itself informs)."""

        def _init_dvc(self):
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

        def _init_studio(self):
            self._studio_events_to_skip = {"start", "data", "done"}

    return Writer


def log(live, history: list, throughput: list) -> None:
    """Append [step, loss, lr] rows and [step, images/s] rows (steps increasing) and update the summary."""
    for step, loss, lr in history:
        live.step = step
        live.log_metric(LOSS, loss, timestamp=False)
        live.log_metric(LR, lr, timestamp=False)
    for step, rate in throughput:
        live.step = step
        live.log_metric(THROUGHPUT, rate, timestamp=False)
    live.make_summary()


def _float(text: str | None) -> float:
    return float(text) if text and text.strip() else math.nan


def parse_metric(text: str, column: str, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """One dvclive metric file (step<TAB>value; other columns ignored) -> (steps, values)."""
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    if not {"step", column} <= set(reader.fieldnames or ()):
        raise ConfigError(f"{origin}: header lacks column step or {column}; expected step<TAB>{column}")
    rows = []
    for row in reader:
        try:
            rows.append([_float(row["step"]), _float(row[column])])
        except ValueError:
            raise ConfigError(f"{origin}: line {reader.line_num}: not numbers: {row}") from None
    table = np.array(rows, dtype=float).reshape(-1, 2)
    return table[:, 0], table[:, 1]


def parse_history(loss_text: str, lr_text: str, origin: str) -> dict:
    """The loss and lr files' texts -> {"step", "loss", "lr"} float arrays on the loss's steps (an lr
    the lr file lacks is NaN); `origin` names the log folder in errors."""
    steps, loss = parse_metric(loss_text, LOSS.rsplit("/", 1)[1], f"{origin}/{tsv(LOSS)}")
    lr_steps, lr = parse_metric(lr_text, LR.rsplit("/", 1)[1], f"{origin}/{tsv(LR)}")
    lr_at = dict(zip(lr_steps.tolist(), lr.tolist(), strict=True))
    return {"step": steps, "loss": loss, "lr": np.array([lr_at.get(s, math.nan) for s in steps.tolist()])}
